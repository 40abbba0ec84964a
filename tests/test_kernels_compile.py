"""CPU test: every Hare kernel variant compiles for sm_90a with nvcc (skipped only where nvcc is absent)."""

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from hare.gpu import _build

NVCC = _build.find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_all_kernels_compile_for_sm90a(tmp_path):
    out, debug_out = tmp_path / "hare_kernels.cubin", tmp_path / "hare_kernels-debug.cubin"
    with ThreadPoolExecutor(2) as pool:  # the release and the checked debug build (HARE_DEBUG=1) side by side
        release = pool.submit(_build.compile_cubin, out, NVCC, (), True)
        debug = pool.submit(_build.compile_cubin, debug_out, NVCC, _build.DEBUG_FLAGS)
        report, _ = release.result(), debug.result()
    checks = (b"hare device check failed", b"block_idx entry", b"topk_ids[", b"gather_index[", b"row_assignment[")
    debug_data, data = debug_out.read_bytes(), out.read_bytes()
    assert all(c in debug_data for c in checks), "the debug build must carry its index checks"
    assert not any(c in data for c in checks), "the release build must not"
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF"
    for name in _build.KERNEL_NAMES:
        assert name.encode() in data, f"kernel {name} missing from the cubin"
        assert f"Compiling entry function '{name}' for 'sm_90a'" in report, name
    # the matrix kernels must use the Hopper tensor-core path (wgmma -> HGMMA in SASS) and honour setmaxnreg
    assert "C7508" not in report, "setmaxnreg ignored by ptxas"
    cuobjdump = NVCC.replace("nvcc", "cuobjdump")
    try:
        sass = subprocess.run([cuobjdump, "-sass", "-fun", "hare_gateup_silu_bn128", str(out)],
                              capture_output=True, text=True, timeout=300).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return
    if sass:
        assert "HGMMA" in sass
        assert re.search(r"UTMALDG", sass), "weight tiles should be loaded by TMA"
