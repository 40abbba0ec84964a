"""Hare: fast sparse Mixture-of-Experts inference on Hopper GPUs.

Two ideas at once: Hierarchical Block N:M expert weights (``sparsify``, ``BlockNM``) and padding-free execution
over the residual blocked routing layout (``route``). ``moe`` runs the experts of a layer on either.
"""

from .blocknm import BlockNM, sparsify
from .checkpoint import load, save
from .distributed import ep_group, ep_moe, shard_experts
from .errors import CheckpointError, DistributedError, HareError, InvalidArgumentError, UnsupportedDeviceError
from .moe import moe
from .models import UnsupportedModelError, calibrate, patch
from .models.hare_folder import load_model
from .routing import RoutingLayout, route

__all__ = [
    "BlockNM", "sparsify", "save", "load", "moe", "route", "RoutingLayout", "ep_moe", "ep_group", "shard_experts",
    "patch", "calibrate", "load_model", "UnsupportedModelError",
    "HareError", "InvalidArgumentError", "CheckpointError", "DistributedError", "UnsupportedDeviceError",
]
__version__ = "0.1.0"
