"""fastbptt: fast backpropagation through time for recurrent networks on the CPU.

    h_t = φ(W_hx x_t + W_hh h_{t-1} + b_h)        o_t = W_qh h_t + b_q        L = mean_t ℓ(o_t, y_t)

Public API: ``RNN``, ``Workspace``, ``loss_and_grad``, ``forward``, ``backward``;
``fastbptt.reference`` is the plain NumPy oracle. For training loops: ``data``
(d2l's character corpus and minibatches), ``optim`` (clipping and optimizers over
the flat buffer), ``training`` (truncated BPTT steps and epochs), ``diagnostics``
(gradient flow through time), ``checkpoint`` (save and resume), ``predict``.
"""

from . import core, training
from .core import api, kernels, model, reference, threads, workspace
from .core.api import backward, forward, loss_and_grad
from .core.model import RNN
from .core.workspace import Workspace
from .training import data, diagnostics, generate, optim
from .training import saving as checkpoint
from .training.generate import predict

__version__ = "0.1.0"
__all__ = ["RNN", "Workspace", "loss_and_grad", "forward", "backward", "predict", "reference",
           "data", "optim", "training", "diagnostics", "checkpoint", "__version__"]
