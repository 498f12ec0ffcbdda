"""The old path of ``fastbptt.core.kernels``, kept for compatibility: the same modules, not copies.

``fastbptt.kernels`` and each ``fastbptt.kernels.X`` name the module ``fastbptt.core.kernels.X``
itself, so no kernel file is loaded (and compiled by Numba) twice.
"""
import sys

from ..core import kernels as _kernels
from ..core.kernels import losses, primitives, sweep

for _m in (losses, primitives, sweep):
    sys.modules[f"{__name__}.{_m.__name__.rsplit('.', 1)[1]}"] = _m
sys.modules[__name__] = _kernels
