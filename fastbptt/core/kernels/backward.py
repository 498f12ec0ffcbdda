"""The reverse sweep: compiled kernels that only compute.

Backwards from t = T to 1, with ∂L/∂z_{T+1} = 0::

    ∂L/∂h_t = c_{t+1} W_hhᵀ ∂L/∂z_{t+1} + W_qhᵀ ∂L/∂o_t      ∂L/∂z_t = φ'(z_t) ⊙ ∂L/∂h_t

where the carry weights c are 1 for full BPTT; 0 cuts the graph (truncation) and
other values give randomized truncation (Tallec & Ollivier, 2017).

The direct terms W_qhᵀ ∂L/∂o_t of all steps are one GEMM done before the sweep and
written into ``dz``; the sweep adds the recurrent term and multiplies by φ' in
place, leaving ∂L/∂z_t in ``dz``: either fused (``reverse_sweep``, one compiled
loop over t for the batch) or with one GEMM per step done by the caller
(``reverse_step``). The weight gradients are then sums over t of
outer products, done afterwards as single GEMMs over all T·B rows by the caller
(or, for token inputs, by ``scatter_input_grad``). φ' is read off h_t = φ(z_t):
tanh' = 1 - h², relu' = [h > 0], identity' = 1.
"""

from numba import njit, prange

from .primitives import matmat_acc


@njit(inline="always", error_model="numpy")
def _dphi(g, h, act):
    """g *= φ'(z) in place, with φ' read off h = φ(z). g, h (H,)"""
    if act == 1:
        one = g.dtype.type(1)
        for j in range(g.shape[0]):
            g[j] *= one - h[j] * h[j]
    elif act == 2:
        for j in range(g.shape[0]):
            if h[j] <= 0:
                g[j] = 0


@njit(inline="always", error_model="numpy")
def _reverse_block(dz, dh0, hs, carry, W_hh, act, b0, b1):
    """Reverse sweep of sequences b0 .. b1-1, step by step.

    dz    (T, B, H)   in: W_qhᵀ ∂L/∂o_t; out: ∂L/∂z_t
    dh0   (B, H)      out: ∂L/∂h_0 = c_1 W_hhᵀ ∂L/∂z_1
    hs    (T+1, B, H) h_0 .. h_T from the forward pass
    carry (T, B)      carry[t, b] weighs what step t sends back to the state before it
    W_hh  (H, H)
    """
    T, _, H = dz.shape
    for t in range(T - 1, -1, -1):
        g = dz[t]
        if t < T - 1:
            matmat_acc(g, W_hh, dz[t + 1], carry[t + 1], b0, b1)   # += c W_hhᵀ ∂L/∂z_{t+1}
        for b in range(b0, b1):
            _dphi(g[b], hs[t + 1, b], act)
    for b in range(b0, b1):
        out = dh0[b]
        for j in range(H):
            out[j] = 0
    matmat_acc(dh0, W_hh, dz[0], carry[0], b0, b1)


@njit(cache=True, nogil=True, error_model="numpy")
def reverse_sweep(dz, dh0, hs, carry, W_hh, act):
    """The fused reverse sweep over the whole batch on one thread (see ``_reverse_block``)."""
    _reverse_block(dz, dh0, hs, carry, W_hh, act, 0, dz.shape[1])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def reverse_sweep_parallel(dz, dh0, hs, carry, W_hh, act, n_blocks):
    """``reverse_sweep`` with the sequences split into ``n_blocks`` blocks, one per thread;
    bitwise the same."""
    B = dz.shape[1]
    n = min(B, n_blocks)
    for k in prange(n):
        _reverse_block(dz, dh0, hs, carry, W_hh, act, k * B // n, (k + 1) * B // n)


@njit(cache=True, nogil=True, error_model="numpy")
def scatter_input_grad(dW_hx, dz, tokens):
    """dW_hx[:, tokens[t, b]] += dz[t, b] for every position, in order: ∂L/∂W_hx for one-hot inputs.

    dW_hx  (H, D)    accumulated into (zeroed by the caller)
    dz     (T, B, H) ∂L/∂z_t
    tokens (T, B)    int, every id in [0, D) (checked by the caller)
    """
    T, B, H = dz.shape
    for t in range(T):
        for b in range(B):
            k = tokens[t, b]
            for i in range(H):
                dW_hx[i, k] += dz[t, b, i]


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def scatter_input_grad_parallel(dW_hx, dz, tokens):
    """``scatter_input_grad`` with the rows of dW_hx spread over threads.

    Each thread owns whole rows i of dW_hx and adds into them in the same (t, b)
    order as the serial kernel, so the result is bitwise the same.
    """
    T, B, H = dz.shape
    for i in prange(H):
        for t in range(T):
            for b in range(B):
                dW_hx[i, tokens[t, b]] += dz[t, b, i]


@njit(cache=True, nogil=True, error_model="numpy")
def reverse_step(g, back, carry, h, act):
    """One step of the per-step BLAS sweep: g = φ'(z_t) ⊙ (g + c back).

    g     (B, H) in: W_qhᵀ ∂L/∂o_t; out: ∂L/∂z_t
    back  (B, H) ∂L/∂z_{t+1} W_hh, from the caller's GEMM (any layout)
    carry (B,)   c, the weights of step t+1
    h     (B, H) h_t
    act   int
    """
    B, H = g.shape
    for b in range(B):
        row = g[b]
        r = back[b]
        c = carry[b]
        for j in range(H):
            row[j] += c * r[j]
        _dphi(row, h[b], act)


@njit(cache=True, nogil=True, error_model="numpy")
def scale_rows(a, c):
    """a[b] *= c[b] for every row b.

    a (B, H) in/out
    c (B,)
    """
    B, H = a.shape
    for b in range(B):
        for j in range(H):
            a[b, j] *= c[b]
