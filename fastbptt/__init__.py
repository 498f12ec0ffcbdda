"""fastbptt: fast backpropagation through time for recurrent networks on the CPU.

    h_t = cell(x_t, h_{t-1})        o_t = W_qh h_t + b_q        L = mean_t ℓ(o_t, y_t)

Models: ``RNN`` (Elman, h_t = φ(W_hx x_t + W_hh h_{t-1} + b_h)), ``GRU`` and ``LSTM``
(PyTorch's cells and weight layout); ``CELLS`` maps "rnn", "gru", "lstm" to them.
Public API: ``Workspace``, ``loss_and_grad``, ``forward``, ``backward``, and the
recurrent layer alone, ``layer_forward``/``layer_backward`` (∂L/∂H in, for any head);
``fastbptt.reference`` and ``fastbptt.reference_cells`` are the plain NumPy oracles. For training loops: ``data``
(d2l's character corpus and minibatches), ``optim`` (clipping and optimizers over
the flat buffer), ``training`` (truncated BPTT steps and epochs), ``diagnostics``
(gradient flow through time), ``checkpoint`` (save and resume), ``predict``.
From PyTorch: ``fastbptt.torch.RNN``, ``GRU``, ``LSTM``, drop-ins for ``torch.nn``'s (PyTorch
is optional: ``import fastbptt`` never imports it).
"""

from . import core, training
from .core import api, kernels, model, reference, reference_cells, threads, workspace
from .core.api import backward, forward, layer_backward, layer_forward, loss_and_grad
from .core.model import CELLS, GRU, LSTM, RNN, RNNBase
from .core.workspace import Workspace
from .training import data, diagnostics, generate, optim
from .training import saving as checkpoint
from .training.generate import predict

__version__ = "0.1.0"
__all__ = ["RNN", "GRU", "LSTM", "RNNBase", "CELLS", "Workspace", "loss_and_grad", "forward", "backward",
           "layer_forward", "layer_backward", "predict", "reference", "reference_cells",
           "data", "optim", "training", "diagnostics", "checkpoint", "__version__"]
