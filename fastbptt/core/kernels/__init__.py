"""Compiled (@njit) kernels: they only compute, in place, over buffers the caller owns.

- ``forward``: the input projection for token ids and the forward recurrence.
- ``backward``: the reverse sweep and the input-weight gradient for token ids.
- ``losses``: cross-entropy and squared error with their ∂L/∂o.

Nothing here validates its arguments: ``fastbptt.api`` does, before calling.
"""
