"""CPU test: every Hare kernel variant compiles for sm_90a with nvcc (skipped only where nvcc is absent)."""

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from hare.gpu import _build, plan

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
    for name in plan.kernel_names():
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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_shared_memory_of_every_gemm_variant_matches_the_plan(tmp_path):
    """The plan's shared-memory size for each GEMM variant equals GemmConfig<BN, SPARSE, SHARED_B>::kSmemBytes, read
    back from a host program compiled against the kernel headers (the kernel traps if launched with less)."""
    for name, text in plan.generated_sources().items():
        (tmp_path / name).write_text(text)
    variants = [(n, kind) for n in plan.TILE_NS for kind in plan.WEIGHT_KINDS]
    targs = {kind: ", ".join(plan.WEIGHT_KINDS[kind][1:]) for kind in plan.WEIGHT_KINDS}  # SPARSE, SHARED_B
    prints = "".join(f'  std::printf("%d\\n", hare::GemmConfig<{n}, {targs[kind]}>::kSmemBytes);\n'
                     for n, kind in variants)
    (tmp_path / "smem.cu").write_text(f'#include <cstdio>\n#include "moe_gemm.cuh"\nint main() {{\n{prints}}}\n')
    exe = tmp_path / "smem"
    subprocess.run([NVCC, *_build.ARCH_FLAGS, "-std=c++17", "-I", str(_build.CSRC), "-I", str(tmp_path), "-o", str(exe),
                    str(tmp_path / "smem.cu")], check=True, capture_output=True, timeout=600)
    got = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == [plan.gemm_smem_bytes(n, kind) for n, kind in variants]
