"""GPU tests: collected everywhere, skipped without an sm_90 device (tests/conftest.py marks `gpu` items)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    ok = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    if ok:
        from hare.gpu import availability

        ok, why = availability()
    else:
        why = "needs an sm_90 CUDA GPU"
    if not ok:
        skip = pytest.mark.skip(reason=why)
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_tf32():
    if torch.cuda.is_available():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = old
    else:
        yield
