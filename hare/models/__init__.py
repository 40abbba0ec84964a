"""Hare inside transformers models: patching, calibration, pruned checkpoints."""

from .architectures import ARCHITECTURES, NOT_SUPPORTED, UnsupportedModelError
from .experts import HareExperts
from .patch import Calibration, calibrate, experts_modules, patch

__all__ = ["patch", "calibrate", "Calibration", "HareExperts", "experts_modules", "ARCHITECTURES", "NOT_SUPPORTED",
           "UnsupportedModelError"]
