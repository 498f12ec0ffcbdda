"""The old path of ``fastbptt.core.reference_cells``, kept for compatibility: the same module, not a copy."""
import sys

from .core import reference_cells as _m

sys.modules[__name__] = _m
