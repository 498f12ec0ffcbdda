"""The old path of ``fastbptt.training.charrnn``, kept for compatibility: the same module, not a copy."""
import sys

from .training import charrnn as _m

sys.modules[__name__] = _m
