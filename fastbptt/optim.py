"""The old path of ``fastbptt.training.optim``, kept for compatibility: the same module, not a copy."""
import sys

from .training import optim as _m

sys.modules[__name__] = _m
