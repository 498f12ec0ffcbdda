"""The old path of ``fastbptt.core.reference``, kept for compatibility: the same module, not a copy."""
import sys

from .core import reference as _m

sys.modules[__name__] = _m
