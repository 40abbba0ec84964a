"""Exception types. Every bad input is reported before any work starts, naming the argument at fault."""


class HareError(Exception):
    """Base class of every error Hare raises on purpose."""


class InvalidArgumentError(HareError, ValueError):
    """An argument has the wrong type, dtype, rank, shape, device or value."""


class CheckpointError(HareError, ValueError):
    """A file is not a Hare checkpoint, is of an unknown version, or is corrupt."""


class UnsupportedDeviceError(HareError, RuntimeError):
    """The fast path cannot run on this device (not Hopper, no nvcc); the reference path still can."""


class DistributedError(HareError, RuntimeError):
    """A collective of expert parallelism failed: a peer died, hung past the timeout, or holds a different shard."""
