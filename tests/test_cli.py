import subprocess
import sys

from typer.testing import CliRunner

from hare.cli import app
from hare.demo import RATIOS, run_demo


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_demo_runs_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "hare.cli", "demo", "--tokens", "64"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1:10" in proc.stdout and "activation-aware" in proc.stdout


def test_demo_table_measures_real_effects():
    rows = run_demo(tokens=128, device="cpu")
    dense, sparse = rows[0], rows[1:]
    assert dense["rel_error"] == 0 and len(sparse) == 2 * len(RATIOS)
    ratios = [r["bytes_ratio"] for r in sparse[::2]]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] < 0.6
    assert all(0 < r["rel_error"] < 2 for r in sparse)
    # calibration-aware pruning must beat magnitude pruning at 50% on this layer
    by = {(r["weights"], r["criterion"]): r["rel_error"] for r in sparse}
    assert by[("1:1 bw16", "activation-aware")] < by[("1:1 bw16", "magnitude")]


def test_bad_option_exits_nonzero():
    result = CliRunner().invoke(app, ["demo", "--tokens", "0"])
    assert result.exit_code != 0
