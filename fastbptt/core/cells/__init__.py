"""The cells: each one's parameters, buffers and pointwise math, in one module.

- ``elman``: h_t = φ(W_hx x_t + W_hh h_{t-1} + b_h) (the textbook's RNN)
- ``gru``: PyTorch's and cuDNN's GRU (gates r, z, n)
- ``lstm``: PyTorch's LSTM (gates i, f, g, o), state (h, c)

``base`` says what a cell provides; ``fastbptt.core.kernels.sweep`` runs the recurrence
and the reverse sweep, written once, over any of them. ``CELLS`` maps each cell's name
to its module (the registry the tests are parametrized over).
"""

from . import base, elman, gru, lstm

CELLS = {module.NAME: module for module in (elman, gru, lstm)}

__all__ = ["CELLS", "base", "elman", "gru", "lstm"]
