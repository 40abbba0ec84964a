"""Build the CUDA sources of ``hare/gpu/csrc`` into one sm_90a cubin, cached on disk.

The sources are ``csrc/`` plus what ``plan.generated_sources`` writes from the Python tables (the kernels' argument
structs and GEMM entry points). The cache key is the SHA-256 of every source, generated ones included, the nvcc
command line and ``nvcc --version``: never the token count, the routing or anything else known only at run time,
so serving never recompiles. ``HARE_DEBUG=1`` builds (and caches apart) a debug cubin whose kernels check every
index they turn into an address and trap with a message naming it (``HARE_DEVICE_CHECK`` in ``csrc/common.cuh``).
The cache lives in ``$HARE_CACHE_DIR`` (default ``~/.cache/hare/kernels``); a build writes a temporary file and
renames it, so concurrent first uses are safe.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import plan

CSRC = Path(__file__).resolve().parent / "csrc"
MAIN_SOURCE = "hare_kernels.cu"
ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)
NVCC_FLAGS = ("-cubin", *ARCH_FLAGS, "-O3", "-std=c++17", "-lineinfo")
DEBUG_FLAGS = ("-DHARE_DEBUG=1",)


def debug_build() -> bool:
    """Whether this process uses the checked debug kernels (HARE_DEBUG=1)."""
    return os.environ.get("HARE_DEBUG") == "1"


def find_nvcc() -> str | None:
    """nvcc from $HARE_NVCC, $CUDA_HOME/bin, the PATH or /usr/local/cuda/bin; None when absent."""
    candidates = [os.environ.get("HARE_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout


def source_files() -> list[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh"))


def cache_key(nvcc: str, extra_flags: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for name, text in sorted(plan.generated_sources().items()):
        h.update(name.encode())
        h.update(text.encode())
    h.update(" ".join(NVCC_FLAGS + extra_flags).encode())
    h.update(_nvcc_version(nvcc).encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    return Path(os.environ.get("HARE_CACHE_DIR", Path.home() / ".cache" / "hare" / "kernels"))


def compile_cubin(out_path: Path, nvcc: str, extra_flags: tuple[str, ...] = (), verbose: bool = False) -> str:
    """Compile the kernels to ``out_path``; returns nvcc's output (the -Xptxas -v report when verbose)."""
    with tempfile.TemporaryDirectory(prefix="hare-gen-") as gen:
        for name, text in plan.generated_sources().items():  # the argument structs and GEMM entry points
            Path(gen, name).write_text(text)
        cmd = [nvcc, *NVCC_FLAGS, *extra_flags, "-I", str(CSRC), "-I", gen, "-o", str(out_path),
               str(CSRC / MAIN_SOURCE)]
        if verbose:
            cmd.insert(1, "-Xptxas=-v")
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


@functools.lru_cache(maxsize=None)
def cubin_path(nvcc: str | None = None) -> Path:
    """Path of the cached cubin for the current sources, compiling it on first use."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set HARE_NVCC or CUDA_HOME)")
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    flags = DEBUG_FLAGS if debug_build() else ()
    path = d / f"hare_kernels{'-debug' if flags else ''}-{cache_key(nvcc, flags)}.cubin"
    if not path.exists():
        tmp = d / f".{path.name}.{os.getpid()}.tmp"
        compile_cubin(tmp, nvcc, flags)
        os.replace(tmp, path)
    return path
