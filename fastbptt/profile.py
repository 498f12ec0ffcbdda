"""The old path of ``fastbptt.benchmarking.profile``, kept for compatibility: the same module, not a copy."""
import sys

from .benchmarking import profile as _m

sys.modules[__name__] = _m
