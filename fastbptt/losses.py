"""Losses: compiled kernels that turn outputs into per-row losses and ∂L/∂o, in place.

Each kernel writes the loss of every row into ``row_loss`` and overwrites the
outputs with ∂L/∂o; the caller sums ``row_loss`` in a fixed order, so the
parallel and serial kernels give bitwise the same loss and gradient.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _cross_entropy_row(do, row_loss, targets, n):
    """Row n of ``cross_entropy`` (see there)."""
    N, O = do.shape
    row = do[n]
    m = row[0]
    for k in range(1, O):
        if row[k] > m:
            m = row[k]
    s = 0.0
    for k in range(O):
        s += np.exp(row[k] - m)
    lse = m + np.log(s)
    y = targets[n]
    row_loss[n] = lse - row[y]
    inv_n = 1.0 / N
    for k in range(O):
        row[k] = np.exp(row[k] - lse) * inv_n
    row[y] -= inv_n


@njit(cache=True)
def cross_entropy(do, row_loss, targets):
    """Softmax cross-entropy, stable for large logits (log-sum-exp).

    do       (N, O) in: logits o; out: ∂L/∂o with L the mean over the N rows
    row_loss (N,)   out: -log softmax(o_n)[y_n]
    targets  (N,)   int, every class in [0, O) (checked by the caller)
    """
    for n in range(do.shape[0]):
        _cross_entropy_row(do, row_loss, targets, n)


@njit(cache=True, parallel=True)
def cross_entropy_parallel(do, row_loss, targets):
    """``cross_entropy`` with the rows spread over threads."""
    for n in prange(do.shape[0]):
        _cross_entropy_row(do, row_loss, targets, n)


@njit(cache=True, inline="always")
def _mse_row(do, row_loss, targets, n):
    """Row n of ``mse`` (see there)."""
    N, O = do.shape
    row = do[n]
    target = targets[n]
    scale = 2.0 / (N * O)
    s = 0.0
    for k in range(O):
        d = row[k] - target[k]
        s += d * d
        row[k] = d * scale
    row_loss[n] = s / O


@njit(cache=True)
def mse(do, row_loss, targets):
    """Squared error averaged over all N·O elements.

    do       (N, O) in: outputs o; out: ∂L/∂o
    row_loss (N,)   out: mean over the row of (o - y)²
    targets  (N, O) y
    """
    for n in range(do.shape[0]):
        _mse_row(do, row_loss, targets, n)


@njit(cache=True, parallel=True)
def mse_parallel(do, row_loss, targets):
    """``mse`` with the rows spread over threads."""
    for n in prange(do.shape[0]):
        _mse_row(do, row_loss, targets, n)
