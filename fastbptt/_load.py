"""The old path of ``fastbptt.benchmarking._load``, kept for compatibility: the same module, not a copy."""
import sys

from .benchmarking import _load as _m

sys.modules[__name__] = _m
