import os

import pytest
import torch

# rich sizes the CLI's tables and help to the terminal; a fixed width makes their text the same in every runner
# (a terminal, CI, pytest-xdist workers)
os.environ["COLUMNS"] = "100"


def pytest_collection_modifyitems(config, items):
    """GPU tests run on the device (scripts/device_run.sh); elsewhere they are reported as skipped."""
    ok = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    skip = pytest.mark.skip(reason="needs an sm_90 CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not ok:
            item.add_marker(skip)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """A tiny random Qwen3-MoE checkpoint with its tokenizer ('dense'), its 25% Hare checkpoint ('hare', magnitude
    pruning) and a calibration text ('calib.txt'); tests that change a folder work on a copy."""
    from hare.models.hare_folder import sparsify_checkpoint
    from hare.models.configs import WORDS, save_tiny_model

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    save_tiny_model("qwen3_moe", root / "dense")
    sparsify_checkpoint(root / "dense", root / "hare", 0.25, calib_tokens=64, progress=False)
    (root / "calib.txt").write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(200)))
    return root
