"""The old path of ``fastbptt.benchmarking._loadbench``, kept for compatibility: the same module, not a copy."""
import sys

from .benchmarking import _loadbench as _m

sys.modules[__name__] = _m
