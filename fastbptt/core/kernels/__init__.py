"""Compiled (@njit) kernels: they only compute, in place, over buffers the caller owns.

- ``sweep``: the recurrence and the reverse sweep, written once over any cell
  (``fastbptt.core.cells``), and the input projection and its gradient for token ids.
- ``losses``: cross-entropy and squared error with their ∂L/∂o.
- ``primitives``: tanh, exp and the small matrix products the fused loops inline.

Nothing here validates its arguments: ``fastbptt.core.api`` does, before calling.
"""
