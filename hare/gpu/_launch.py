"""Load the cubin and launch its kernels with the CUDA driver API, on torch's current stream.

Imported lazily (only when a kernel runs): a CPU-only machine without cuda-bindings can import hare.gpu.
Kernel argument structs are packed from their one table (``plan.py``; the C++ side is generated from it) into
byte buffers, and the ``void**`` argument array is handed to cuLaunchKernelEx as a raw address. TMA descriptors
(CUtensorMap, 128 bytes) are encoded with cuTensorMapEncodeTiled and cached per weight tensor (pointer, dtype,
shape, box).

The fused MoE's launches go through ``_Module.run``: a call's prepared launches (``hare.gpu._Program``) with their
functions and launch configs resolved once per stream, the ``void**`` arrays once per argument buffer, and then one
cuLaunchKernelEx each. That call goes to libcuda through ctypes (``LaunchConfig``/``LaunchAttribute`` mirror
cuda.h's CUlaunchConfig/CUlaunchAttribute; tests/test_host_path.py compiles a program that checks the layout),
which costs ~1.3 us less per launch than cuda-bindings' wrapper on the H200 host measured (4.5 against 5.8 us);
where libcuda cannot be opened that way, cuda-bindings launches instead.

Each device also has the id check's two words of state (``hare.gpu``'s module docstring): ``first_bad`` (device
memory) and the error record ``status`` (host memory mapped into the device's address space, written by the
layout kernel, read by the host without a sync).
"""

from __future__ import annotations

import ctypes
import threading

import torch
from cuda.bindings import driver as cu

from . import _build, plan

_lock = threading.Lock()
_modules: dict[int, "_Module"] = {}


def _check(result, what: str):
    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        _, msg = cu.cuGetErrorString(err)
        raise RuntimeError(f"{what} failed: {err} ({msg.decode() if msg else '?'})")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def params(struct: "plan.ParamStruct", *values) -> ctypes.Array:
    """A kernel argument struct (its table in plan.py) packed into a buffer passed by value to cuLaunchKernelEx."""
    data = struct.pack(*values)
    return ctypes.create_string_buffer(data, len(data))


# ---------------------------------------------------------------- module per device
class _Module:
    def __init__(self, device_index: int):
        self.device_index = device_index
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
            self.configs: dict[tuple, object] = {}  # launch configs by (grid, block, smem, stream, pdl)
            props = torch.cuda.get_device_properties(device_index)
            self.num_sms = props.multi_processor_count
            # layout ticket: zero once here, reset to zero by the kernel that uses it
            self.ticket = torch.zeros(1, dtype=torch.int32, device=f"cuda:{device_index}")
            # the id check: first_bad at rest (INT_MAX, reset by the kernel that sets it) and the error record in
            # pinned host memory mapped into the device's address space (cuMemHostAlloc DEVICEMAP: a kernel writes
            # it through the pointer cuMemHostGetDevicePointer gives, the host reads it in place, no copy or sync)
            self.first_bad = torch.full((1,), 2 ** 31 - 1, dtype=torch.int32, device=f"cuda:{device_index}")
            flags = cu.CU_MEMHOSTALLOC_DEVICEMAP | cu.CU_MEMHOSTALLOC_PORTABLE
            self._status_host = _check(cu.cuMemHostAlloc(STATUS_WORDS * 8, flags), "cuMemHostAlloc")
            self.status = (ctypes.c_longlong * STATUS_WORDS).from_address(int(self._status_host))
            ctypes.memset(self.status, 0, STATUS_WORDS * 8)
            self.status_ptr = int(_check(cu.cuMemHostGetDevicePointer(self._status_host, 0),
                                         "cuMemHostGetDevicePointer"))
            self._counters: list[torch.Tensor] = []

    def decode_counters(self, n: int) -> int:
        """Address of at least n int32 counters of the fused decode kernel, zero at rest (each call resets what it
        used, csrc/decode.cuh). A larger need gets a new buffer; the old ones stay allocated, as the programs and
        captured graphs that hold their addresses may still run."""
        if not self._counters or self._counters[-1].numel() < n:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("hare.gpu: a call of these shapes must run once before CUDA-graph capture (the "
                                   "fused decode kernel's counters are allocated at first use)")
            self._counters.append(torch.zeros(max(n, 1 << 16), dtype=torch.int32,
                                              device=f"cuda:{self.device_index}"))
        return self._counters[-1].data_ptr()

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


    def launch(self, name: str, grid: int, block: int, smem: int, stream: int, pdl: bool, *params) -> None:
        """Launch kernel `name` with ctypes objects `params` (passed by value) on CUDA stream handle `stream`, with
        programmatic dependent launch when `pdl`."""
        fn = self.functions.get(name)
        if fn is None or (smem > 48 * 1024 and self.smem_set.get(name, 0) < smem):
            fn = self.function(name, smem)
        ptrs = (ctypes.c_void_p * len(params))(*[ctypes.addressof(p) for p in params])
        key = (grid, block, smem, stream, pdl)
        config = self.configs.get(key)
        if config is None:
            config = self.configs[key] = _launch_config(grid, block, smem, stream, pdl)
        err = cu.cuLaunchKernelEx(config, fn, ctypes.addressof(ptrs), 0)
        if err[0] != _SUCCESS:
            raise RuntimeError(f"cuLaunchKernelEx({name}) failed: {err[0]}")

    def run(self, prog, stream: int, buf) -> None:
        """The launches of a prepared fused MoE call (``hare.gpu._Program``) on stream handle `stream`, each with
        its TMA descriptors and its argument struct in the call's buffer `buf` (a ``_CallBuffer``)."""
        handles = prog.handles.get(stream)
        if handles is None:
            handles = prog.handles[stream] = self._prepare(prog, stream)
        kparams = buf.kparams
        if kparams is None:
            kparams = buf.kparams = self._kernel_params(prog, buf)
        for (name, fn, config, _), kp in zip(handles, kparams[0]):
            err = _launch_kernel(config, fn, kp)
            if err:
                raise RuntimeError(f"cuLaunchKernelEx({name}) failed: {_error_name(err)}")

    def _prepare(self, prog, stream: int) -> list:
        """(name, function, launch config, what keeps it valid) of each launch of `prog` on `stream`, in the form
        _launch_kernel takes."""
        out = []
        for launch in prog.launches:
            fn = self.function(launch.kernel, launch.smem)
            if _LIBCUDA is not None:
                config = _native_config(launch.grid, launch.block, launch.smem, stream, prog.pdl)
                out.append((launch.kernel, int(fn), config[0], config))
            else:
                config = _launch_config(launch.grid, launch.block, launch.smem, stream, prog.pdl)
                out.append((launch.kernel, fn, config, None))
        return out

    @staticmethod
    def _kernel_params(prog, buf) -> tuple:
        """The void** array of each launch (its TMA descriptors, then its struct inside `buf`): (addresses, the arrays
        that keep them valid)."""
        base = ctypes.addressof(buf.data)
        arrays = [(ctypes.c_void_p * (len(launch.maps) + len(launch.structs)))(
            *(ctypes.addressof(m) for m in launch.maps), *(base + offset for offset, _ in launch.structs))
            for launch in prog.launches]
        return [ctypes.addressof(a) for a in arrays], arrays


def _launch_config(grid: int, block: int, smem: int, stream: int, pdl: bool):
    """A 1-D launch, with programmatic stream serialization when `pdl` (the kernels' griddepcontrol, common.cuh), so
    under CUDA graphs and eagerly a kernel's prologue overlaps the previous kernel's tail instead of waiting for it
    to drain."""
    attr = cu.CUlaunchAttribute()
    attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = int(pdl)
    config = cu.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
    config.sharedMemBytes, config.hStream = smem, stream
    config.attrs, config.numAttrs = [attr], 1
    return config


_SUCCESS = cu.CUresult.CUDA_SUCCESS


# ---------------------------------------------------------------- cuLaunchKernelEx through ctypes
class LaunchAttribute(ctypes.Structure):
    """cuda.h's CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union (here its first int)."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class LaunchConfig(ctypes.Structure):
    """cuda.h's CUlaunchConfig."""

    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("numAttrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _open_libcuda():
    """cuLaunchKernelEx of the process's libcuda through ctypes, or None (then cuda-bindings launches)."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_LIBCUDA = _open_libcuda()


def _native_config(grid: int, block: int, smem: int, stream: int, pdl: bool) -> tuple:
    """(address of a ctypes CUlaunchConfig, the objects that keep it valid) for the ctypes launch."""
    attr = LaunchAttribute(PROGRAMMATIC_STREAM_SERIALIZATION, b"", int(pdl), b"")
    config = LaunchConfig(grid, 1, 1, block, 1, 1, smem, stream, ctypes.addressof(attr), 1)
    return ctypes.addressof(config), config, attr


if _LIBCUDA is not None:
    def _launch_kernel(config: int, fn: int, kparams: int) -> int:
        return _LIBCUDA(config, fn, kparams, None)
else:
    def _launch_kernel(config, fn, kparams: int) -> int:
        err = cu.cuLaunchKernelEx(config, fn, kparams, 0)[0]
        return 0 if err == _SUCCESS else int(err)


def _error_name(err: int) -> str:
    try:
        return str(cu.CUresult(err))
    except ValueError:
        return str(err)


# ---------------------------------------------------------------- the id check's error record
STATUS_WORDS = 16  # long long words of the record (csrc/layout.cuh StatusWord)
STATUS_ERRORS, STATUS_REPORTED, STATUS_CODE, STATUS_TOKEN, STATUS_SLOT, STATUS_VALUE, STATUS_OTHER_SLOT, \
    STATUS_EXPERTS, STATUS_TOKENS, STATUS_TOP_K, STATUS_SEQ = range(11)
ID_OUT_OF_RANGE, ID_REPEATED = 1, 2  # BadIdCode


def current_stream(device: torch.device) -> int:
    """Raw handle of torch's current stream on `device` (cheaper than torch.cuda.current_stream)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(idx)


def loaded(device: torch.device) -> "_Module | None":
    """The module of `device` if a kernel ran there, else None (loads nothing)."""
    return _modules.get(device.index if device.index is not None else torch.cuda.current_device())


def module(device: torch.device) -> _Module:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    m = _modules.get(idx)
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
