"""The old path of ``fastbptt.benchmarking.benchmark``, kept for compatibility: the same module, not a copy."""
import sys

from .benchmarking import benchmark as _m

sys.modules[__name__] = _m
