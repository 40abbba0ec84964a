import pytest
import torch


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
