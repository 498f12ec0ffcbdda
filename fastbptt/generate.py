"""The old path of ``fastbptt.training.generate``, kept for compatibility: the same module, not a copy."""
import sys

from .training import generate as _m

sys.modules[__name__] = _m
