import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from hare.cli import app
from hare.demo import RATIOS, run_demo
from hare.errors import CheckpointError
from hare.models.hare_folder import MANIFEST, load_model


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_demo_runs_from_the_command_line():
    result = CliRunner().invoke(app, ["demo", "--small", "--tokens", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "1:10" in out and "activation-aware" in out and "4 experts, top-2, hidden 128, ffn 256, 64 tokens" in out
    assert "Hare demo, end to end" in out and "8 experts, top-2, hidden 64" in out  # the small model ran too
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│ hare ")}
    assert list(rows) == ["hare dense", "hare 1:1", "hare 1:2", "hare 1:5"]
    dense = [c.strip() for c in rows["hare dense"].split("│")]
    # patched dense: the same logits (up to float32 summation order, which differs between CPUs) and tokens
    assert float(dense[4]) < 1e-5 and dense[5] == "100%"


def test_demo_table_measures_real_effects():
    rows = run_demo(tokens=128, device="cpu")
    dense, sparse = rows[0], rows[1:]
    assert dense["rel_error"] == 0 and len(sparse) == 2 * len(RATIOS)
    # stored densities, not the nominal ones: at in = 256 / 512 the last window of 1:5 is partial, so gate_up keeps
    # 4 of 16 blocks (12.5%) and down 7 of 32 (10.9%), 12.0% of both together; 1:10 keeps 2 of 16 and 4 of 32
    assert [round(r["density"], 4) for r in sparse[::2]] == [0.5, 0.25, 0.1198, 0.0625]
    ratios = [r["bytes_ratio"] for r in sparse[::2]]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] < 0.6
    assert all(0 < r["rel_error"] < 2 for r in sparse)
    # calibration-aware pruning must beat magnitude pruning at 50% on this layer
    by = {(r["weights"], r["criterion"]): r["rel_error"] for r in sparse}
    assert by[("1:1 bw16", "activation-aware")] < by[("1:1 bw16", "magnitude")]


def test_bad_option_exits_nonzero():
    result = CliRunner().invoke(app, ["demo", "--tokens", "0"])
    assert result.exit_code != 0


# ---- checkpoints from the command line: one-line errors (exit 2), checked before any model loads ----------------

def _error(code: int, stderr: str, pattern: str, status: int = 2) -> None:
    """The command failed with ``status`` and exactly one line 'error: …' matching ``pattern``, no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == status and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert re.search(pattern, lines[0]), lines[0]


def _hare(*args):
    return subprocess.run([sys.executable, "-m", "hare.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    """tiny_checkpoints plus: 'unloadable' (the dense folder with its weights cut in half: any command that got as
    far as loading it would say so), 'notok' (no tokenizer files), 'latin1.txt' and 'three.txt'."""
    root = tmp_path_factory.mktemp("cli")
    for name in ("dense", "hare", "calib.txt"):
        (root / name).symlink_to(tiny_checkpoints / name)
    shutil.copytree(tiny_checkpoints / "dense", root / "unloadable")
    shard = root / "unloadable" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shutil.copytree(tiny_checkpoints / "dense", root / "notok", ignore=shutil.ignore_patterns("tokenizer*"))
    (root / "latin1.txt").write_bytes("caf\xe9 the water".encode("latin-1"))
    (root / "three.txt").write_text("the water is")
    return root


def _nothing_written(out) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def test_resparsifying_a_hare_folder_is_refused_and_writes_nothing(folders, tmp_path):
    proc = _hare("sparsify", folders / "hare", tmp_path / "out", "--density", "0.1")
    _error(proc.returncode, proc.stderr, r"hare: a Hare checkpoint \(its experts are already pruned\); pass the "
                                         "dense transformers folder it was made from")
    assert _nothing_written(tmp_path / "out")


CUDA_MISSING = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


@pytest.mark.parametrize("args,pattern", [
    (["sparsify", "{unloadable}", "{out}", "--bw", "8"], r"bw: expected one of \(16, 32, 64\), got 8"),
    (["sparsify", "{unloadable}", "{out}", "--density", "0.3"], r"density: expected one of"),
    (["sparsify", "{unloadable}", "{out}", "--device", "foo"], r"device: 'foo' is not a device"),
    pytest.param(["sparsify", "{unloadable}", "{out}", "--device", "cuda"], r"device: 'cuda' asked, but",
                 marks=CUDA_MISSING),
    pytest.param(["eval", "{unloadable}", "--text", "{calib.txt}", "--device", "cuda"], r"device: 'cuda' asked",
                 marks=CUDA_MISSING),
    (["generate", "{unloadable}", "--prompt", "the", "--device", "cuda:x"], r"device: 'cuda:x' is not a device"),
    (["sparsify", "{unloadable}", "{out}", "--calib", "{latin1.txt}"],
     r"--calib .*latin1.txt: not UTF-8 text \(invalid continuation byte at byte 3\)"),
    (["eval", "{unloadable}", "--text", "{latin1.txt}"], r"--text .*latin1.txt: not UTF-8 text"),
    (["eval", "{unloadable}", "--text", "{calib.txt}", "--window", "100000"],
     r"window: 100000 tokens exceed the model's max_position_embeddings \(256\)"),
    (["generate", "{notok}", "--prompt", "the water"], r"notok: no tokenizer \(looked for tokenizer.json, "
                                                       r"tokenizer.model, vocab.json"),
    (["eval", "{notok}", "--text", "{calib.txt}"], r"notok: no tokenizer \(looked for tokenizer.json"),
    (["sparsify", "{notok}", "{out}", "--calib", "{calib.txt}"], r"notok: no tokenizer \(looked for"),
    (["generate", "{dense}", "--prompt", "   "], r"--prompt: it encodes to no tokens"),
    (["eval", "{unloadable}", "--text", "{calib.txt}"],
     r"unloadable: transformers could not load it: .*incomplete metadata"),
])
def test_bad_input_is_one_line_before_any_model_loads(folders, tmp_path, args, pattern):
    paths = {f"{{{p.name}}}": str(p) for p in folders.iterdir()} | {"{out}": str(tmp_path / "out")}
    result = _invoke(*(paths.get(a, a) for a in args))
    _error(result.exit_code, result.stderr, pattern)
    assert _nothing_written(tmp_path / "out")


def test_model_combine_names_what_a_results_file_lacks(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"commit": "abc", "records": []}))
    result = _invoke("bench", "model-combine", tmp_path / "a.json", "--out-json", tmp_path / "out.json")
    _error(result.exit_code, result.stderr, r"model-combine: results 1 is not from `hare bench model`: no gpu, torch, date")
    assert not (tmp_path / "out.json").exists()


def test_unexpected_errors_are_one_line_unless_debug(tmp_path):
    run = {"gpu": "H100", "commit": "abc", "torch": "2.11", "date": "d", "wall_s": 1.0, "records": [{"model": "a"}]}
    (tmp_path / "a.json").write_text(json.dumps(run))
    args = ["bench", "model-combine", tmp_path / "a.json", "--out-json", tmp_path / "out.json"]
    result = _invoke(*args)
    _error(result.exit_code, result.stderr, r"unexpected KeyError: .* \(`hare --debug bench …` shows the traceback\)",
           status=1)
    assert isinstance(_invoke("--debug", *args).exception, KeyError)


def test_killed_sparsify_leaves_nothing_loadable_and_a_rerun_works(folders, tmp_path):
    """SIGKILL while the expert files are written (the second safetensors write kills the process), then again."""
    out = tmp_path / "out"
    kill_on_second_write = (
        "import os, signal, sys\n"
        "import hare.checkpoint as c\n"
        "save, calls = c.save_file, []\n"
        "def dying_save(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return save(*a, **k)\n"
        "c.save_file = dying_save\n"
        "from hare.cli import app\n"
        "app(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", kill_on_second_write, "sparsify", str(folders / "dense"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    partial = list(tmp_path.glob(".out.partial-*"))
    assert not out.exists() and len(partial) == 1 and any(partial[0].glob("hare-experts-*"))
    with pytest.raises(CheckpointError, match="no config.json|no hare_model.json"):
        load_model(partial[0])
    result = _invoke("sparsify", folders / "dense", out, "--calib-tokens", "64")
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob(".out.partial-*")), "the dead run's folder is still there"
    assert load_model(out).get_submodule("model.layers.1.mlp.experts").sparse


def test_short_calibration_text_is_warned_with_the_real_numbers(folders, tmp_path):
    result = _invoke("sparsify", folders / "dense", tmp_path / "out", "--calib", folders / "three.txt",
                     "--calib-tokens", "100000")
    assert result.exit_code == 0, result.output
    assert "warning: calibration text: 3 tokens, fewer than the 100000 asked; calibrating on 3" in result.stderr
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["calibration"]["tokens"] == 3


def test_eval_shows_its_progress_and_generate_streams(folders):
    from hare.models.generation import generate, load_tokenizer

    result = _invoke("eval", folders / "hare", "--text", folders / "calib.txt", "--window", "64")
    assert result.exit_code == 0 and re.search(r"scoring: 100%.* 4/4", result.stderr), result.output

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, ids):
            self.puts.append(ids.numel())

        def end(self):
            self.ended = True

    recorder = Recorder()
    _, new = generate(load_model(folders / "hare"), load_tokenizer(folders / "hare"), "the water", 5, streamer=recorder)
    assert recorder.puts[1:] == [1] * new.numel() and recorder.ended  # the prompt first, then one token at a time


def test_version_help_and_info(folders):
    version = _invoke("--version")
    assert version.exit_code == 0 and re.match(r"hare \d+\.\d+\.\d+ \(torch .*, transformers .*\)", version.stdout)
    for args in (["-h"], ["sparsify", "-h"]):
        result = _invoke(*args)
        assert result.exit_code == 0 and "Usage" in result.stdout
    assert "--density" in _invoke("sparsify", "-h").stdout
    kernels = _invoke("bench", "kernels", "--help")
    assert kernels.exit_code == 0 and "--density" in kernels.stdout and "--suite" in kernels.stdout
    ep = _invoke("bench", "ep", "--help").stdout
    assert max(map(len, ep.splitlines())) <= 100 and "mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite" in ep
    info = _invoke("info", folders / "hare", "--device", "cpu")
    assert info.exit_code == 0 and "kernel cache" in info.stdout and "nvcc" in info.stdout
    assert re.search(r"model.layers.1.mlp.experts\s*│\s*1:2 bw16\s*│\s*reference\s*│\s*tensors on cpu", info.stdout)
