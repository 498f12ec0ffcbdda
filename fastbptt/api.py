"""The old path of ``fastbptt.core.api``, kept for compatibility: the same module, not a copy."""
import sys

from .core import api as _m

sys.modules[__name__] = _m
