"""What every results file records about the run (GPU, commit, date, torch version), how a benchmark with a summary
writes it, and the median timer."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import time
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


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def write_results(device, summary: dict, records: list[dict], out_json=None) -> dict:
    """The results file of a benchmark run (``run_info``, summary, records), written to ``out_json`` if given; the
    summary is printed."""
    result = {**run_info(device), "summary": summary, "records": records}
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary))
    return result


def median_ms(fn, device, warmup: int = 2, reps: int = 5) -> float:
    """Median time of ``fn()`` in ms after ``warmup`` calls: CUDA events on a GPU, the host clock elsewhere."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]
