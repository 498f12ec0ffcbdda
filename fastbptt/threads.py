"""The old path of ``fastbptt.core.threads``, kept for compatibility: the same module, not a copy."""
import sys

from .core import threads as _m

sys.modules[__name__] = _m
