"""The old path of ``fastbptt.training.saving``, kept for compatibility: the same module, not a copy."""
import sys

from .training import saving as _m

sys.modules[__name__] = _m
