"""fastbptt: fast backpropagation through time for recurrent networks on the CPU.

    h_t = φ(W_hx x_t + W_hh h_{t-1} + b_h)        o_t = W_qh h_t + b_q        L = mean_t ℓ(o_t, y_t)

Public API: ``RNN``, ``Workspace``, ``loss_and_grad``, ``forward``, ``backward``;
``fastbptt.reference`` is the plain NumPy oracle.
"""

from . import reference
from .api import backward, forward, loss_and_grad
from .model import RNN
from .workspace import Workspace

__version__ = "0.1.0"
__all__ = ["RNN", "Workspace", "loss_and_grad", "forward", "backward", "reference", "__version__"]
