"""Load the cubin and launch its kernels with the CUDA driver API (cuda.bindings), on torch's current stream.

Imported lazily (only when a kernel runs): a CPU-only machine without cuda-bindings can import hare.gpu.
Kernel arguments are packed once per call into ctypes structures that mirror the C++ parameter structs, and the
``void**`` argument array is handed to cuLaunchKernel as a raw address. TMA descriptors (CUtensorMap, 128 bytes)
are encoded with cuTensorMapEncodeTiled and cached per weight tensor (pointer, shape, strides, box).
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading

import torch
from cuda.bindings import driver as cu

from . import _build

_lock = threading.Lock()
_modules: dict[int, "_Module"] = {}


def _check(result, what: str):
    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        _, msg = cu.cuGetErrorString(err)
        raise RuntimeError(f"{what} failed: {err} ({msg.decode() if msg else '?'})")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


# ---------------------------------------------------------------- parameter structs (mirror csrc)
class GemmParams(ctypes.Structure):
    _fields_ = [
        ("b_src", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("gather_index", ctypes.c_void_p),
        ("row_assignment", ctypes.c_void_p),
        ("topk_weights", ctypes.c_void_p),
        ("block_expert", ctypes.c_void_p),
        ("block_start", ctypes.c_void_p),
        ("block_height", ctypes.c_void_p),
        ("num_blocks", ctypes.c_void_p),
        ("block_idx", ctypes.c_void_p),
        ("out_split_stride", ctypes.c_longlong),
        ("K", ctypes.c_int),
        ("M", ctypes.c_int),
        ("a_rows_per_expert", ctypes.c_int),
        ("a_box1_offset", ctypes.c_int),
        ("m_tile", ctypes.c_int),
        ("num_m", ctypes.c_int),
        ("splits", ctypes.c_int),
        ("k_blocks_per_split", ctypes.c_int),
        ("top_k", ctypes.c_int),
        ("num_rows", ctypes.c_int),
        ("group", ctypes.c_int),
        ("k_stages", ctypes.c_int),
        ("kept", ctypes.c_int),
        ("bw_log2", ctypes.c_int),
        ("panels", ctypes.c_int),
        ("shared_b", ctypes.c_int),
        ("num_experts", ctypes.c_int),
        ("num_slots", ctypes.c_int),
    ]


class LayoutParams(ctypes.Structure):
    _fields_ = [
        ("topk_ids", ctypes.c_void_p),
        ("counts", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("gather_index", ctypes.c_void_p),
        ("row_assignment", ctypes.c_void_p),
        ("assignment_row", ctypes.c_void_p),
        ("block_expert", ctypes.c_void_p),
        ("block_start", ctypes.c_void_p),
        ("block_height", ctypes.c_void_p),
        ("num_blocks", ctypes.c_void_p),
        ("tile_base", ctypes.c_void_p),
        ("ticket", ctypes.c_void_p),
        ("ids_is_64", ctypes.c_int),
        ("num_rows", ctypes.c_int),
        ("top_k", ctypes.c_int),
        ("num_experts", ctypes.c_int),
        ("block", ctypes.c_int),
        ("num_slots", ctypes.c_int),
        ("tile_items", ctypes.c_int),
        ("num_tiles", ctypes.c_int),
    ]


class CombineParams(ctypes.Structure):
    _fields_ = [
        ("y", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("split_stride", ctypes.c_longlong),
        ("num_tokens", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("top_k", ctypes.c_int),
        ("splits", ctypes.c_int),
    ]


# Fast packing (ctypes.Structure construction costs several us per launch): struct formats with the same
# layout as the ctypes mirrors above (checked at import).
_GEMM_FMT = struct.Struct("<10Qq18i")
_LAYOUT_FMT = struct.Struct("<12Q8i")
_COMBINE_FMT = struct.Struct("<2Qq4i")
_GLU_FMT = struct.Struct("<2Qq3i4x")  # GluCombineParams: part, h, split_stride, num_rows, ffn, splits
assert _GEMM_FMT.size == ctypes.sizeof(GemmParams)
assert _LAYOUT_FMT.size == ctypes.sizeof(LayoutParams)
assert _COMBINE_FMT.size == ctypes.sizeof(CombineParams)


def gemm_params(*values) -> ctypes.Array:
    return ctypes.create_string_buffer(_GEMM_FMT.pack(*values), _GEMM_FMT.size)


def layout_params(*values) -> ctypes.Array:
    return ctypes.create_string_buffer(_LAYOUT_FMT.pack(*values), _LAYOUT_FMT.size)


def combine_params(*values) -> ctypes.Array:
    return ctypes.create_string_buffer(_COMBINE_FMT.pack(*values), _COMBINE_FMT.size)


def glu_params(*values) -> ctypes.Array:
    return ctypes.create_string_buffer(_GLU_FMT.pack(*values), _GLU_FMT.size)


def gemm_smem_bytes(bn: int, sparse: bool = False) -> int:
    """Mirror of GemmConfig<BN, SPARSE>::kSmemBytes in moe_gemm.cuh (the kernel traps if given less)."""
    limit = 232448
    if sparse:  # compressed A boxes, a token tile per box, metadata boxes
        stage, max_stages = 256 * 32 * 2 + 2 * bn * 64 * 2 + 2 * 1024, 8
    else:
        stage, max_stages = 256 * 64 * 2 + bn * 64 * 2, 6
    epi, aux, bars = 2 * bn * 128, 2 * bn * 8, 256
    stages = min(max_stages, (limit - epi - aux - bars) // stage)
    return stages * stage + epi + aux + bars


# ---------------------------------------------------------------- module per device
class _Module:
    def __init__(self, device_index: int):
        _check(cu.cuInit(0), "cuInit")
        torch.cuda.init()
        with torch.cuda.device(device_index):
            torch.empty(1, device=f"cuda:{device_index}")  # make torch's primary context current
            ctx = _check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
            if int(ctx) == 0:
                dev = _check(cu.cuDeviceGet(device_index), "cuDeviceGet")
                ctx = _check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
                _check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            image = _build.cubin_path().read_bytes()
            self.module = _check(cu.cuModuleLoadData(image), "cuModuleLoadData")
            self.functions: dict[str, object] = {}
            self.smem_set: dict[str, int] = {}
            self.configs: dict[tuple[int, int, int, int], object] = {}  # launch configs by (grid, block, smem, stream)
            props = torch.cuda.get_device_properties(device_index)
            self.num_sms = props.multi_processor_count
            # layout ticket: zero once here, reset to zero by the kernel that uses it
            self.ticket = torch.zeros(1, dtype=torch.int32, device=f"cuda:{device_index}")

    def function(self, name: str, smem: int = 0):
        fn = self.functions.get(name)
        if fn is None:
            fn = _check(cu.cuModuleGetFunction(self.module, name.encode()), f"cuModuleGetFunction({name})")
            self.functions[name] = fn
        if smem > 48 * 1024 and self.smem_set.get(name, 0) < smem:
            attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(cu.cuFuncSetAttribute(fn, attr, smem), "cuFuncSetAttribute")
            self.smem_set[name] = smem
        return fn


    def launch(self, name: str, grid: int, block: int, smem: int, stream: int, *params) -> None:
        """Launch kernel `name` with ctypes objects `params` (passed by value) on CUDA stream handle `stream`."""
        fn = self.functions.get(name)
        if fn is None or (smem > 48 * 1024 and self.smem_set.get(name, 0) < smem):
            fn = self.function(name, smem)
        ptrs = (ctypes.c_void_p * len(params))(*[ctypes.addressof(p) for p in params])
        key = (grid, block, smem, stream)
        config = self.configs.get(key)
        if config is None:
            config = self.configs[key] = _launch_config(grid, block, smem, stream)
        err = cu.cuLaunchKernelEx(config, fn, ctypes.addressof(ptrs), 0)
        if err[0] != _SUCCESS:
            raise RuntimeError(f"cuLaunchKernelEx({name}) failed: {err[0]}")


def _launch_config(grid: int, block: int, smem: int, stream: int):
    """A 1-D launch with programmatic stream serialization (the kernels' griddepcontrol, common.cuh), so under CUDA
    graphs and eagerly a kernel's prologue overlaps the previous kernel's tail instead of waiting for it to drain."""
    attr = cu.CUlaunchAttribute()
    attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = int(PROGRAMMATIC_LAUNCH)
    config = cu.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
    config.sharedMemBytes, config.hStream = smem, stream
    config.attrs, config.numAttrs = [attr], 1
    return config


_SUCCESS = cu.CUresult.CUDA_SUCCESS
# Programmatic dependent launch for every kernel; HARE_PDL=0 launches them plainly (to compare, or to rule it out).
PROGRAMMATIC_LAUNCH = os.environ.get("HARE_PDL", "1") != "0"


def current_stream(device: torch.device) -> int:
    """Raw handle of torch's current stream on `device` (cheaper than torch.cuda.current_stream)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(idx)


def module(device: torch.device) -> _Module:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    m = _modules.get(idx)
    if m is not None:
        return m
    if m is None:
        with _lock:
            m = _modules.get(idx)
            if m is None:
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(
                        "hare.gpu: kernels are loaded at first use; call the op once before CUDA-graph capture"
                    )
                m = _Module(idx)
                _modules[idx] = m
    return m


def launch(device: torch.device, name: str, grid: int, block: int, smem: int, *params) -> None:
    """Launch kernel `name` with ctypes objects `params` (each passed by value) on torch's current stream."""
    module(device).launch(name, grid, block, smem, current_stream(device), *params)


# ---------------------------------------------------------------- TMA descriptors
_tmaps: dict[tuple, ctypes.Array] = {}


_DTYPES = {torch.bfloat16: (cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2),
           torch.uint8: (cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8, 1)}
_SWIZZLES = {0: cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_NONE,
             64: cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_64B,
             128: cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B}


def weight_tensor_map(w: torch.Tensor, rows: int, cols: int) -> ctypes.Array:
    """Dense weight tiles: bf16 (rows, cols), box 64 x 128 rows, 128B swizzle."""
    return tensor_map_2d(w, rows, cols, 64, 128, 128)


def sparse_tensor_maps(values: torch.Tensor, meta: torch.Tensor) -> tuple[ctypes.Array, ctypes.Array]:
    """Block N:M weight tiles: values (E*out, kept*bw/2) bf16 in 32 x 128-row boxes with 64B swizzle; metadata
    (E*out/16, steps*64) uint8 in 128-byte x 8 boxes (two steps of one 128-row panel), unswizzled."""
    E, out, width = values.shape
    return (tensor_map_2d(values, E * out, width, 32, 128, 64),
            tensor_map_2d(meta, meta.shape[0] * meta.shape[1], meta.shape[2], 128, 8, 0))


def tensor_map_2d(t: torch.Tensor, rows: int, cols: int, box_cols: int, box_rows: int, swizzle: int) -> ctypes.Array:
    """2-D TMA descriptor over a contiguous tensor viewed as (rows, cols); reads past its end fill zeros.

    Cached by (pointer, dtype, shape, box, device), everything the descriptor encodes: a tensor that is freed and
    reallocated at the same address with the same dtype and shape gets the same (still valid) descriptor.
    """
    key = (t.data_ptr(), t.dtype, rows, cols, box_cols, box_rows, swizzle, t.device.index)
    tm = _tmaps.get(key)
    if tm is not None:
        return tm
    dt, size = _DTYPES[t.dtype]
    res = cu.cuTensorMapEncodeTiled(
        dt,
        2,
        t.data_ptr(),
        [cu.cuuint64_t(cols), cu.cuuint64_t(rows)],
        [cu.cuuint64_t(cols * size)],
        [cu.cuuint32_t(box_cols), cu.cuuint32_t(box_rows)],
        [cu.cuuint32_t(1), cu.cuuint32_t(1)],
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        _SWIZZLES[swizzle],
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    tmap = _check(res, "cuTensorMapEncodeTiled")
    buf = (ctypes.c_ubyte * 128)()
    ctypes.memmove(buf, tmap.getPtr(), 128)
    if len(_tmaps) > 4096:
        _tmaps.clear()
    _tmaps[key] = buf
    return buf
