"""The old path of ``fastbptt.training.diagnostics``, kept for compatibility: the same module, not a copy."""
import sys

from .training import diagnostics as _m

sys.modules[__name__] = _m
