"""The old path of ``fastbptt.benchmarking.compare``, kept for compatibility: the same module, not a copy."""
import sys

from .benchmarking import compare as _m

sys.modules[__name__] = _m
