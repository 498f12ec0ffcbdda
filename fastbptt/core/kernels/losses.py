"""Losses: compiled kernels that turn outputs into per-row losses and ∂L/∂o, in place.

Each kernel writes the loss of every row into ``row_loss``, overwrites the
outputs with ∂L/∂o and returns the mean loss, summed in float64 in row order
after the rows are done, so the parallel and serial kernels give bitwise the
same loss and gradient.
"""

import numpy as np
from numba import njit, prange

from .primitives import exp


@njit(inline="always", error_model="numpy")
def _sum(row):
    """Σ row in float64, four running sums combined in a fixed order."""
    n = row.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    k = 0
    while k + 4 <= n:
        s0 += row[k]
        s1 += row[k + 1]
        s2 += row[k + 2]
        s3 += row[k + 3]
        k += 4
    while k < n:
        s0 += row[k]
        k += 1
    return (s0 + s1) + (s2 + s3)


@njit(inline="always", error_model="numpy")
def _exp_row(row, y):
    """row[k] = e^(row[k] - max) in (0, 1]; return (-log softmax(row)[y], Σ_k e^(row[k] - max))."""
    O = row.shape[0]
    m = row[0]
    for k in range(1, O):
        if row[k] > m:
            m = row[k]
    target_logit = row[y]
    for k in range(O):
        row[k] = exp(row[k] - m)
    s = _sum(row)
    return (m - target_logit) + np.log(s), s      # log-sum-exp minus the target's logit


@njit(inline="always", error_model="numpy")
def _sq_row(row, target):
    """row -= target; return the mean of the squares (in float64)."""
    O = row.shape[0]
    for k in range(O):
        row[k] -= target[k]                      # o - y
    s = 0.0
    for k in range(O):
        s += row[k] * row[k]
    return s / O


@njit(inline="always", error_model="numpy")
def _cross_entropy_row(do, row_loss, targets, n):
    """Row n of ``cross_entropy`` (see there)."""
    N, O = do.shape
    row = do[n]
    y = targets[n]
    row_loss[n], s = _exp_row(row, y)
    scale = row.dtype.type(1.0 / (s * N))
    for k in range(O):
        row[k] *= scale                          # softmax / N
    row[y] -= row.dtype.type(1.0 / N)


@njit(inline="always", error_model="numpy")
def _mean(row_loss):
    """The mean of row_loss, summed in float64 in a fixed order."""
    total = 0.0
    for n in range(row_loss.shape[0]):
        total += row_loss[n]
    return total / row_loss.shape[0]


@njit(cache=True, nogil=True, error_model="numpy")
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


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def cross_entropy_parallel(do, row_loss, targets):
    """``cross_entropy`` with the rows spread over threads."""
    for n in prange(do.shape[0]):
        _cross_entropy_row(do, row_loss, targets, n)
    return _mean(row_loss)


@njit(inline="always", error_model="numpy")
def _mse_row(do, row_loss, targets, n):
    """Row n of ``mse`` (see there)."""
    N, O = do.shape
    row = do[n]
    row_loss[n] = _sq_row(row, targets[n])
    scale = row.dtype.type(2.0 / (N * O))
    for k in range(O):
        row[k] *= scale


@njit(cache=True, nogil=True, error_model="numpy")
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


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def mse_parallel(do, row_loss, targets):
    """``mse`` with the rows spread over threads."""
    for n in prange(do.shape[0]):
        _mse_row(do, row_loss, targets, n)
    return _mean(row_loss)


# ----------------------------------------------------------------------------- weighted
# With per-position weights w (the valid positions of sequences of different lengths, or
# the caller's loss_weights): L = Σ_n w_n ℓ_n / Σ_n w_n. A row of weight 0 is not read
# (its label may be anything) and its ∂L/∂o is zero.


@njit(inline="always", error_model="numpy")
def _weighted_rows(do, row_loss, w, n):
    """Zero row n (∂L/∂o and loss) when its weight is 0; return whether it was."""
    if w[n] == 0:
        row = do[n]
        for k in range(row.shape[0]):
            row[k] = 0
        row_loss[n] = 0
        return True
    return False


@njit(inline="always", error_model="numpy")
def _cross_entropy_row_weighted(do, row_loss, targets, w, total, n):
    """Row n of ``cross_entropy_weighted``."""
    if _weighted_rows(do, row_loss, w, n):
        return
    O = do.shape[1]
    row = do[n]
    y = targets[n]
    row_loss[n], s = _exp_row(row, y)
    wn = w[n] / total
    scale = row.dtype.type(wn / s)
    for k in range(O):
        row[k] *= scale                          # w softmax / Σ w
    row[y] -= row.dtype.type(wn)


@njit(inline="always", error_model="numpy")
def _weighted_mean(row_loss, w, total):
    """Σ w ℓ / Σ w, summed in float64 in a fixed order."""
    acc = 0.0
    for n in range(row_loss.shape[0]):
        if w[n] != 0:
            acc += w[n] * row_loss[n]
    return acc / total


@njit(cache=True, nogil=True, error_model="numpy")
def cross_entropy_weighted(do, row_loss, targets, w, total):
    """Softmax cross-entropy weighted by position.

    do       (N, O) in: logits; out: ∂L/∂o with L = Σ w ℓ / total
    row_loss (N,)   out: -log softmax(o_n)[y_n] (0 where w is 0)
    targets  (N,)   int, in [0, O) where w > 0 (not read elsewhere)
    w        (N,)   weights >= 0
    total    float  Σ w (> 0)
    """
    for n in range(do.shape[0]):
        _cross_entropy_row_weighted(do, row_loss, targets, w, total, n)
    return _weighted_mean(row_loss, w, total)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def cross_entropy_weighted_parallel(do, row_loss, targets, w, total):
    """``cross_entropy_weighted`` with the rows spread over threads."""
    for n in prange(do.shape[0]):
        _cross_entropy_row_weighted(do, row_loss, targets, w, total, n)
    return _weighted_mean(row_loss, w, total)


@njit(inline="always", error_model="numpy")
def _mse_row_weighted(do, row_loss, targets, w, total, n):
    """Row n of ``mse_weighted``."""
    if _weighted_rows(do, row_loss, w, n):
        return
    O = do.shape[1]
    row = do[n]
    row_loss[n] = _sq_row(row, targets[n])
    scale = row.dtype.type(2.0 * w[n] / (total * O))
    for k in range(O):
        row[k] *= scale


@njit(cache=True, nogil=True, error_model="numpy")
def mse_weighted(do, row_loss, targets, w, total):
    """Squared error weighted by position: L = Σ_n w_n mean_k (o_nk - y_nk)² / total.

    do (N, O) in/out; row_loss (N,); targets (N, O) (rows of weight 0 not read); w (N,); total Σ w
    """
    for n in range(do.shape[0]):
        _mse_row_weighted(do, row_loss, targets, w, total, n)
    return _weighted_mean(row_loss, w, total)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def mse_weighted_parallel(do, row_loss, targets, w, total):
    """``mse_weighted`` with the rows spread over threads."""
    for n in prange(do.shape[0]):
        _mse_row_weighted(do, row_loss, targets, w, total, n)
    return _weighted_mean(row_loss, w, total)
