"""The old path of ``fastbptt.training.data``, kept for compatibility: the same module, not a copy."""
import sys

from .training import data as _m

sys.modules[__name__] = _m
