"""The forward recurrence: compiled kernels that only compute.

Nothing here validates or allocates; ``fastbptt.api`` checks every argument and
owns the buffers. Arguments go outputs first, then inputs, then weights.

The input projection W_hx x_t of all T·B positions is computed before the
recurrence (one GEMM for dense inputs, a gather of W_hx's columns for token ids)
and written into ``hs[1:]``; the recurrence then adds b_h + W_hh h_{t-1} and
applies φ in place, so ``hs`` ends up holding h_0 .. h_T.

Activation codes: 0 identity, 1 tanh, 2 relu (``fastbptt.model.ACTIVATIONS``).
"""

import numpy as np
from numba import njit, prange


@njit(cache=True)
def gather_input(zx, tokens, W_hx):
    """zx[t, b] = W_hx[:, tokens[t, b]]: the input projection of one-hot inputs.

    zx     (T, B, H) out
    tokens (T, B)    int, every id in [0, D) (checked by the caller)
    W_hx   (H, D)
    """
    T, B, H = zx.shape
    for t in range(T):
        for b in range(B):
            k = tokens[t, b]
            for i in range(H):
                zx[t, b, i] = W_hx[i, k]


@njit(cache=True, inline="always")
def _recur_one(hs, b_h, W_hhT, act, b):
    """Run sequence b: hs[t+1, b] = φ(hs[t+1, b] + b_h + W_hh hs[t, b]) for t = 0 .. T-1.

    hs    (T+1, B, H) in/out: hs[0] = h_0, hs[1:] hold the input projections W_hx x_t
    b_h   (H,)        zeros when the model has no bias
    W_hhT (H, H)      W_hh transposed, so the inner loop runs over contiguous rows
    """
    T = hs.shape[0] - 1
    H = hs.shape[2]
    for t in range(T):
        prev = hs[t, b]
        cur = hs[t + 1, b]
        for i in range(H):
            cur[i] += b_h[i]
        for j in range(H):
            hj = prev[j]
            row = W_hhT[j]
            for i in range(H):
                cur[i] += row[i] * hj
        if act == 1:
            for i in range(H):
                cur[i] = np.tanh(cur[i])
        elif act == 2:
            for i in range(H):
                if cur[i] < 0:
                    cur[i] = 0


@njit(cache=True)
def recurrence(hs, b_h, W_hhT, act):
    """The recurrence over every sequence of the batch, one after the other.

    hs    (T+1, B, H) in/out (see ``_recur_one``)
    b_h   (H,)
    W_hhT (H, H)
    act   int, the activation code
    """
    for b in range(hs.shape[1]):
        _recur_one(hs, b_h, W_hhT, act, b)


@njit(cache=True, parallel=True)
def recurrence_parallel(hs, b_h, W_hhT, act):
    """``recurrence`` with the sequences spread over threads; each writes only its own hs[:, b]."""
    for b in prange(hs.shape[1]):
        _recur_one(hs, b_h, W_hhT, act, b)


@njit(cache=True)
def add_rows(a, v):
    """a[n] += v for every row n: the readout bias.

    a (N, K) in/out
    v (K,)
    """
    N, K = a.shape
    for n in range(N):
        for k in range(K):
            a[n, k] += v[k]
