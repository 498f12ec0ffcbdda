"""The old path of ``fastbptt.benchmarking._machine``, kept for compatibility: the same module, not a copy."""
import sys

from .benchmarking import _machine as _m

sys.modules[__name__] = _m
