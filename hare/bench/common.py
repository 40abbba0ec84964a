"""The results files of the benchmarks: what each records about the run (GPU, commit, date, torch version), the
one writer every suite saves through, and the backend of the plots saved beside them."""

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


def gpu_slug(gpu: str) -> str:
    """The short GPU name of results files: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100"."""
    return gpu.replace("NVIDIA ", "").split()[0].lower()


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def pyplot():
    """matplotlib's pyplot on the Agg backend: the benchmarks' plots go to files, never to a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def results(device, summary: dict, records: list[dict], **fields) -> dict:
    """A benchmark run's results: ``run_info``, the suite's own ``fields``, its summary and its records."""
    return {**run_info(device), **fields, "summary": summary, "records": records}


def save_results(result: dict, out_json) -> Path:
    """Writes ``result`` as JSON to ``out_json`` through a rename, so a run killed mid-write (or a suite that rewrites
    its file as it goes) leaves the previous complete file."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_suffix(out_json.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out_json)
    return out_json


def write_results(device, summary: dict, records: list[dict], out_json=None, **fields) -> dict:
    """The results of a finished run (``results``), saved to ``out_json`` if given; the summary is printed."""
    result = results(device, summary, records, **fields)
    if out_json:
        save_results(result, out_json)
    print(json.dumps(summary))
    return result


def save_progress(result: dict, summary: dict, t_start: float, out_json=None) -> None:
    """A run that rewrites its results as it goes (so a run cut short keeps what it measured): its wall time since
    ``t_start`` (time.perf_counter) and ``summary`` brought up to date, the whole saved to ``out_json`` if given."""
    result["wall_s"] = time.perf_counter() - t_start
    result["summary"] = summary
    if out_json:
        save_results(result, out_json)


def report_run(result: dict, out_json, plot_dir, stem: str, plot, tables, say=print) -> None:
    """The end of such a run: the plots, ``plot(result, folder, stem)`` -> their paths, in ``plot_dir`` or beside
    the JSON and named after it (``stem`` without a JSON) when either is given; the summary printed as JSON; then,
    unless ``tables`` is None, the tables (texts) and a line per error in ``result["errors"]``."""
    if out_json or plot_dir:
        try:
            for path in plot(result, Path(plot_dir or Path(out_json).parent), Path(out_json or stem).stem):
                say(f"plot: {path}")
        except Exception as exc:  # noqa: BLE001 - the records are written already
            print(f"plot failed: {exc}")
    print(json.dumps(result["summary"]))
    if tables is None:
        return
    for text in tables:
        print(text)
    for e in result["errors"]:
        print(f"ERROR {e['case']} T={e['tokens']} density {e['density']}: {e['error']}")
