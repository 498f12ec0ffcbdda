"""fastbptt from PyTorch: ``RNN``, ``GRU`` and ``LSTM``, drop-ins for ``torch.nn``'s.

    from fastbptt.torch import LSTM          # instead of torch.nn.LSTM

They are subclasses of ``torch.nn.RNN``, ``GRU`` and ``LSTM`` with the same constructor,
parameters (names, shapes, ``state_dict``) and ``forward``. On CPU float32/float64 tensors
they run fastbptt's compiled recurrence and reverse sweep through one ``torch.autograd``
node; on any other device or dtype they run PyTorch's own implementation with the same
parameters, so a model moves between devices unchanged. See ``fastbptt.torch.modules``.
"""

try:
    import torch as _torch  # noqa: F401  (PyTorch itself: the name is the top-level package)
except ImportError as e:     # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fastbptt.torch needs PyTorch, which is not installed: pip install \"fastbptt[torch]\" "
        "(for the CPU-only build: pip install torch --index-url https://download.pytorch.org/whl/cpu); "
        "the rest of fastbptt works without it") from e

from .modules import GRU, LSTM, RNN, WorkspaceCache

__all__ = ["RNN", "GRU", "LSTM", "WorkspaceCache"]
