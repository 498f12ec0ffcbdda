"""The forward recurrence: compiled kernels that only compute.

Nothing here validates or allocates; ``fastbptt.api`` checks every argument and
owns the buffers. Arguments go outputs first, then inputs, then weights.

The input projection W_hx x_t of all T·B positions is computed before the
recurrence (one GEMM for dense inputs, a gather of W_hx's columns for token ids)
and written into ``hs[1:]``; the recurrence then adds b_h + W_hh h_{t-1} and
applies φ in place, so ``hs`` ends up holding h_0 .. h_T.

Two ways to run the recurrence:

- fused (``recurrence``): one compiled loop over t for the whole batch, the product
  W_hh h_{t-1} done inline; best when a step is too small for BLAS to pay off.
  ``recurrence_parallel`` gives each thread a block of whole sequences, with no
  barrier per step.
- per-step BLAS (``activate_step``): the caller computes h_{t-1} W_hhᵀ for the whole
  batch with one GEMM per step and this kernel adds it and applies φ.

Activation codes: 0 identity, 1 tanh, 2 relu (``fastbptt.model.ACTIVATIONS``).
"""

from numba import njit, prange

from .primitives import matmat_acc, tanh


@njit(cache=True, nogil=True, error_model="numpy")
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


@njit(inline="always", error_model="numpy")
def _activate(cur, act):
    """cur = φ(cur) in place. cur (H,)"""
    if act == 1:
        for i in range(cur.shape[0]):
            cur[i] = tanh(cur[i])
    elif act == 2:
        for i in range(cur.shape[0]):
            if cur[i] < 0:
                cur[i] = 0


@njit(inline="always", error_model="numpy")
def _recur_block(hs, b_h, W_hhT, ones, act, b0, b1):
    """Run sequences b0 .. b1-1 together, step by step:
    hs[t+1, b] = φ(hs[t+1, b] + b_h + W_hh hs[t, b]) for t = 0 .. T-1.

    hs    (T+1, B, H) in/out: hs[0] = h_0, hs[1:] hold the input projections W_hx x_t
    b_h   (H,)        zeros when the model has no bias
    W_hhT (H, H)      W_hh transposed, so the inner loop runs over contiguous rows
    ones  (B,)        ones (the weights ``matmat_acc`` takes)
    Each block of W_hh's rows is used for every sequence of the block while in L1.
    """
    T = hs.shape[0] - 1
    H = hs.shape[2]
    for t in range(T):
        cur = hs[t + 1]
        for b in range(b0, b1):
            row = cur[b]
            for i in range(H):
                row[i] += b_h[i]
        matmat_acc(cur, W_hhT, hs[t], ones, b0, b1)
        for b in range(b0, b1):
            _activate(cur[b], act)


@njit(cache=True, nogil=True, error_model="numpy")
def recurrence(hs, b_h, W_hhT, ones, act):
    """The fused recurrence over the whole batch on one thread.

    hs    (T+1, B, H) in/out (see ``_recur_block``)
    b_h   (H,)
    W_hhT (H, H)
    ones  (B,)
    act   int, the activation code
    """
    _recur_block(hs, b_h, W_hhT, ones, act, 0, hs.shape[1])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def recurrence_parallel(hs, b_h, W_hhT, ones, act, n_blocks):
    """``recurrence`` with the sequences split into ``n_blocks`` blocks, one per thread.

    Each block writes only its own hs[:, b]; a sequence's arithmetic does not depend
    on its block, so the result is bitwise that of ``recurrence``.
    """
    B = hs.shape[1]
    n = min(B, n_blocks)
    for k in prange(n):
        _recur_block(hs, b_h, W_hhT, ones, act, k * B // n, (k + 1) * B // n)


@njit(cache=True, nogil=True, error_model="numpy")
def activate_step(cur, rec, b_h, act):
    """One step of the per-step BLAS recurrence: cur = φ(cur + b_h + rec).

    cur (B, H) in: W_hx x_t; out: h_t
    rec (B, H) h_{t-1} W_hhᵀ, from the caller's GEMM (any layout)
    b_h (H,)
    act int
    """
    B, H = cur.shape
    for b in range(B):
        row = cur[b]
        r = rec[b]
        for i in range(H):
            row[i] += b_h[i] + r[i]
        _activate(row, act)


@njit(cache=True, nogil=True, error_model="numpy")
def add_rows(a, v):
    """a[n] += v for every row n: the readout bias.

    a (N, K) in/out
    v (K,)
    """
    N, K = a.shape
    for n in range(N):
        for k in range(K):
            a[n, k] += v[k]
