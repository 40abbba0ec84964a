"""What every results file records about the run: GPU, commit, date, torch version."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """The commit under test: $HARE_COMMIT (set it where the tree travels without .git), else git's HEAD."""
    if os.environ.get("HARE_COMMIT"):
        return os.environ["HARE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_info(device=None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__}
