"""Losses: compiled kernels that turn outputs into per-row losses and ∂L/∂o, in place.

Each kernel writes the loss of every row into ``row_loss``, overwrites the
outputs with ∂L/∂o and returns the mean loss, summed in float64 in row order
after the rows are done, so the parallel and serial kernels give bitwise the
same loss and gradient.
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
        p = np.exp(row[k] - lse)      # softmax, in float64 until the one rounding below
        if k == y:
            p -= 1.0
        row[k] = p * inv_n


@njit(cache=True, inline="always")
def _mean(row_loss):
    """The mean of row_loss, summed in float64 in a fixed order."""
    total = 0.0
    for n in range(row_loss.shape[0]):
        total += row_loss[n]
    return total / row_loss.shape[0]


@njit(cache=True)
def cross_entropy(do, row_loss, targets):
    """Softmax cross-entropy, stable for large logits (log-sum-exp).

    do       (N, O) in: logits o; out: ∂L/∂o with L the mean over the N rows
    row_loss (N,)   out: -log softmax(o_n)[y_n]
    targets  (N,)   int, every class in [0, O) (checked by the caller)
    returns  float  the mean loss
    """
    for n in range(do.shape[0]):
        _cross_entropy_row(do, row_loss, targets, n)
    return _mean(row_loss)


@njit(cache=True, parallel=True)
def cross_entropy_parallel(do, row_loss, targets):
    """``cross_entropy`` with the rows spread over threads."""
    for n in prange(do.shape[0]):
        _cross_entropy_row(do, row_loss, targets, n)
    return _mean(row_loss)


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
    returns  float  the mean loss
    """
    for n in range(do.shape[0]):
        _mse_row(do, row_loss, targets, n)
    return _mean(row_loss)


@njit(cache=True, parallel=True)
def mse_parallel(do, row_loss, targets):
    """``mse`` with the rows spread over threads."""
    for n in prange(do.shape[0]):
        _mse_row(do, row_loss, targets, n)
    return _mean(row_loss)
