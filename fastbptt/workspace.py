"""The old path of ``fastbptt.core.workspace``, kept for compatibility: the same module, not a copy."""
import sys

from .core import workspace as _m

sys.modules[__name__] = _m
