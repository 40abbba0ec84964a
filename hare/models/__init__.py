"""Hare inside transformers models: patching, calibration, pruned checkpoints."""

from .attention import use_packed_gqa_attention
from .architectures import ARCHITECTURES, NOT_SUPPORTED, UnsupportedModelError
from .experts import HareExperts
from .patch import Calibration, calibrate, experts_modules, patch

__all__ = ["patch", "calibrate", "Calibration", "HareExperts", "experts_modules", "ARCHITECTURES", "NOT_SUPPORTED",
           "UnsupportedModelError", "use_packed_gqa_attention"]
