"""The old path of ``fastbptt.core.model``, kept for compatibility: the same module, not a copy."""
import sys

from .core import model as _m

sys.modules[__name__] = _m
