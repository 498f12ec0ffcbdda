"""fastbptt from PyTorch: ``RNN``, ``GRU`` and ``LSTM``, drop-ins for ``torch.nn``'s.

    from fastbptt.torch import LSTM          # instead of torch.nn.LSTM

They are subclasses of ``torch.nn.RNN``, ``GRU`` and ``LSTM`` with the same constructor,
parameters (names, shapes, ``state_dict``) and ``forward``. On CPU float32/float64 tensors
they run fastbptt's compiled recurrence and reverse sweep through one ``torch.autograd``
node; on any other device or dtype they run PyTorch's own implementation with the same
parameters, so a model moves between devices unchanged. See ``fastbptt.torch.modules``.

``convert(model)`` swaps every ``torch.nn.RNN``/``GRU``/``LSTM`` of an existing model for these (weights,
``Parameter`` objects and all, kept); ``convert(model, to="torch")`` swaps them back (for export, or for
a process without fastbptt). ``torch.save(model)`` of a model holding them and ``torch.load(f)``
(``weights_only=True``, PyTorch's default) in a process that has imported ``fastbptt.torch`` give
fastbptt's modules back; ``weights_only=False`` imports fastbptt itself. See ``fastbptt.torch.convert``.
"""

try:
    import torch as _torch     # PyTorch itself (the name fastbptt.torch is this package)
except ImportError as e:     # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fastbptt.torch needs PyTorch, which is not installed: pip install \"fastbptt[torch]\" "
        "(for the CPU-only build: pip install torch --index-url https://download.pytorch.org/whl/cpu); "
        "the rest of fastbptt works without it") from e

from .convert import convert
from .modules import GRU, LSTM, RNN, WorkspaceCache

__all__ = ["GRU", "LSTM", "RNN", "WorkspaceCache", "convert"]


def _register_safe_globals():
    """``torch.load(f)`` (``weights_only=True``, PyTorch's default) of a saved module takes fastbptt's
    classes once ``fastbptt.torch`` is imported, as it takes the ``torch.nn`` classes a program allowlists.
    Registered by full name (the pair form): a ``with torch.serialization.safe_globals([LSTM])`` block
    removes only its own entries at its end, not these. Their unpickling builds nothing beyond the file's
    tensors: torch.nn's own state, two checked strings/bools, and an empty workspace cache."""
    add = getattr(getattr(_torch, "serialization", None), "add_safe_globals", None)
    if add is not None:                    # PyTorch >= 2.4
        add([(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in (RNN, GRU, LSTM, WorkspaceCache)])


_register_safe_globals()
