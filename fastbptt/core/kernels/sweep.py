"""The recurrence and the reverse sweep, written once for every cell.

A cell (``fastbptt.core.cells``) is a NamedTuple of named views plus three pointwise
functions overloaded on its type; these kernels run the time loops around them::

    forward   rec = b_hh + W_hh h_{t-1};  step_forward(cell, t, b, rec[b])           t = 0 .. T-1
    backward  dh[t] += c_{t+1} W_hhᵀ drec[t+1];  step_backward(cell, t, b, c_{t+1})  t = T-1 .. 0
              dh0 = c_0 W_hhᵀ drec[0];  state0_backward(cell, b, c_0)

The carry weights c are 1 for full BPTT; 0 cuts the graph (truncation) and other values
give randomized truncation (Tallec & Ollivier, 2017); c_T is taken as 1.

Two ways to run each loop:

- fused (``recurrence``, ``reverse_sweep``): one compiled loop over t for a block of
  sequences, the product done inline by ``matmat_acc`` (each block of W_hh's rows reused
  for every sequence while in L1); best when a step is too small for BLAS to pay off.
  The ``_parallel`` twins give each thread a block of whole sequences, with no barrier
  per step; a sequence's arithmetic does not depend on its block, so the bits are those
  of the serial kernel.
- per-step BLAS (``forward_step``, ``backward_step``): the caller computes the step's
  product for the whole batch with one GEMM and these add it and run the pointwise math.
  A faster per-step product drops in there.

The serial and parallel kernels are separate functions on purpose: one Python function
jitted twice with ``cache=True`` would collide in Numba's cache. Dispatch is on the
cell's NamedTuple type, so each cell compiles once per dtype and is cached on disk.
Nothing here validates or allocates; the API does both. The weight gradients are not
here: they are sums over all T·B positions, single GEMMs done by the caller (or
``scatter_input_grad`` for token ids).
"""

from numba import njit, prange

from .. import cells as _cells  # noqa: F401  (importing the cells registers their overloads)
from ..cells.base import state0_backward, step_backward, step_forward
from .primitives import matmat_acc


# ----------------------------------------------------------------------------- forward


@njit(inline="always", error_model="numpy")
def _forward_block(cell, rec, ones, counts, b0, b1):
    """Steps 0 .. T-1 of sequences b0 .. b1-1, each row b only while b < counts[t].

    rec (B, G·H) scratch; ones (B,) ones; counts (T,) the active rows of each step,
    non-increasing (the API sorts sequences by length, longest first).
    """
    hs = cell.hs
    b_hh = cell.b_hh
    T = hs.shape[0] - 1
    for t in range(T):
        e = min(b1, counts[t])
        if e <= b0:                                          # counts never grow again
            break
        for b in range(b0, e):
            r = rec[b]
            for k in range(b_hh.shape[0]):
                r[k] = b_hh[k]
        matmat_acc(rec, cell.W_hhT, hs[t], ones, b0, e)      # rec[b] += W_hh h_{t-1}
        for b in range(b0, e):
            step_forward(cell, t, b, rec[b])


@njit(cache=True, nogil=True, error_model="numpy")
def recurrence(cell, rec, ones, counts):
    """The fused recurrence over the whole batch on one thread.

    cell    a cell's NamedTuple, with hs[0] = h_0 (and the cell's other state) and the
            input projection in place
    rec     (B, G·H) scratch
    ones    (B,) ones
    counts  (T,) int: step t runs rows 0 .. counts[t]-1 (B for every t: full lengths)
    """
    _forward_block(cell, rec, ones, counts, 0, cell.hs.shape[1])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def recurrence_parallel(cell, rec, ones, counts, n_blocks):
    """``recurrence`` with the sequences split into ``n_blocks`` blocks, one per thread; bitwise the same."""
    B = cell.hs.shape[1]
    n = min(B, n_blocks)
    for k in prange(n):
        _forward_block(cell, rec, ones, counts, k * B // n, (k + 1) * B // n)


@njit(cache=True, nogil=True, error_model="numpy")
def forward_step(cell, t, rec, row):
    """One step of the per-step BLAS recurrence, for the whole batch.

    rec (B, G·H) W_hh h_{t-1} from the caller's GEMM (any layout; only read)
    row (G·H,)   scratch: b_hh + rec[b], contiguous for the cell's step (rec is
                 usually a transposed view, whose rows are strided)
    """
    b_hh = cell.b_hh
    for b in range(rec.shape[0]):
        r = rec[b]
        for k in range(b_hh.shape[0]):
            row[k] = b_hh[k] + r[k]
        step_forward(cell, t, b, row)


# ----------------------------------------------------------------------------- backward


@njit(inline="always", error_model="numpy")
def _backward_block(cell, carry, counts, b0, b1):
    """Steps T-1 .. 0 of sequences b0 .. b1-1 backwards, then ∂L/∂(state_0). carry (T, B);
    counts (T,) as in ``_forward_block``: a row whose last step is t (b >= counts[t+1]) gets
    no product and a carry weight of 1 there, as every row at t = T-1."""
    dh = cell.dh
    drec = cell.drec
    T = dh.shape[0]
    one = carry.dtype.type(1)
    for t in range(T - 1, -1, -1):
        e = min(b1, counts[t])
        if e <= b0:
            continue
        n = min(b1, counts[t + 1]) if t < T - 1 else b0      # rows that go on to step t+1
        if n > b0:
            matmat_acc(dh[t], cell.W_hh, drec[t + 1], carry[t + 1], b0, n)   # += c W_hhᵀ drec
        for b in range(b0, e):
            if b < n:
                step_backward(cell, t, b, carry[t + 1, b])
            else:
                step_backward(cell, t, b, one)
    dh0 = cell.dh0
    for b in range(b0, b1):
        row = dh0[b]
        for j in range(row.shape[0]):
            row[j] = 0
    matmat_acc(dh0, cell.W_hh, drec[0], carry[0], b0, min(b1, counts[0]))
    for b in range(b0, b1):
        state0_backward(cell, b, carry[0, b])


@njit(cache=True, nogil=True, error_model="numpy")
def reverse_sweep(cell, carry, counts):
    """The fused reverse sweep over the whole batch on one thread.

    cell    a cell's NamedTuple after its forward pass, with ∂L/∂h_t from above in ``dh``
            and the cell's state-gradient scratch (``ds``, if any) holding what arrives at
            the last state (zeros, or the LSTM's ∂L/∂c_T)
    carry   (T, B) carry weights
    counts  (T,) int, as in ``recurrence``
    """
    _backward_block(cell, carry, counts, 0, cell.dh.shape[1])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def reverse_sweep_parallel(cell, carry, counts, n_blocks):
    """``reverse_sweep`` with the sequences split into ``n_blocks`` blocks, one per thread; bitwise the same."""
    B = cell.dh.shape[1]
    n = min(B, n_blocks)
    for k in prange(n):
        _backward_block(cell, carry, counts, k * B // n, (k + 1) * B // n)


@njit(cache=True, nogil=True, error_model="numpy")
def backward_step(cell, t, back, c, n_add, n_active):
    """One step of the per-step BLAS sweep: rows b < n_add get dh[t, b] += c[b] back[b] and the
    cell's step with c[b]; rows n_add <= b < n_active end at step t (the cell's step with 1).

    back (n_add, H) W_hhᵀ drec[t+1] from the caller's GEMM (any layout)
    c    (B,)       the carry weights of step t+1
    """
    dh = cell.dh[t]
    for b in range(n_add):
        cb = c[b]
        row = dh[b]
        r = back[b]
        for j in range(row.shape[0]):
            row[j] += cb * r[j]
        step_backward(cell, t, b, cb)
    one = c.dtype.type(1)
    for b in range(n_add, n_active):
        step_backward(cell, t, b, one)


@njit(cache=True, nogil=True, error_model="numpy")
def backward_state0(cell, c0):
    """After the per-step BLAS sweep: dh0 (holding W_hhᵀ drec[0]) times c_0, then the cell's part.

    c0 (B,) the carry weights of step 0
    """
    dh0 = cell.dh0
    for b in range(dh0.shape[0]):
        row = dh0[b]
        for j in range(row.shape[0]):
            row[j] *= c0[b]
        state0_backward(cell, b, c0[b])


@njit(cache=True, nogil=True, error_model="numpy")
def zero_padding(a, counts):
    """a[t, b] = 0 for every row b >= counts[t]: the positions past each sequence's end.

    a      (T, B, K) in/out
    counts (T,) int
    """
    T, B, K = a.shape
    for t in range(T):
        for b in range(counts[t], B):
            row = a[t, b]
            for k in range(K):
                row[k] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def reverse_in_time(dst, src, lengths):
    """dst[s, b] = src[lengths[b]-1-s, b] for s < lengths[b], 0 after: each sequence backwards.

    dst, src (T, B, K) (not overlapping)
    lengths  (B,) int in [1, T]
    """
    T, B, K = src.shape
    for s in range(T):
        for b in range(B):
            row = dst[s, b]
            if s < lengths[b]:
                r = src[lengths[b] - 1 - s, b]
                for k in range(K):
                    row[k] = r[k]
            else:
                for k in range(K):
                    row[k] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def add_reversed_in_time(dst, src, lengths):
    """dst[t, b] += src[lengths[b]-1-t, b] for t < lengths[b]: a reverse direction's gradient
    added back in time order.

    dst, src (T, B, K) (not overlapping)
    lengths  (B,) int in [1, T]
    """
    B = src.shape[1]
    K = src.shape[2]
    for b in range(B):
        n = lengths[b]
        for t in range(n):
            row = dst[t, b]
            r = src[n - 1 - t, b]
            for k in range(K):
                row[k] += r[k]


# ----------------------------------------------------------------------------- layers and lengths
# With lengths the API sorts the sequences, longest first: row i of every buffer holds the
# caller's sequence order[i], and step t runs rows 0 .. counts[t]-1. These move data between
# the caller's order and the rows, and between the two directions of a layer.


@njit(cache=True, nogil=True, error_model="numpy")
def pack_rows(dst, src, order, counts):
    """dst[t, i] = src[t, order[i]] for i < counts[t], 0 on the padding after.

    dst, src (T, B, K); order (B,) a permutation; counts (T,) non-increasing
    """
    T, B, K = dst.shape
    for t in range(T):
        for i in range(B):
            row = dst[t, i]
            if i < counts[t]:
                r = src[t, order[i]]
                for k in range(K):
                    row[k] = r[k]
            else:
                for k in range(K):
                    row[k] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def pack_ids(dst, src, order, counts):
    """dst[t, i] = src[t, order[i]] for i < counts[t], 0 after (ids on padding are never read).

    dst, src (T, B) int
    """
    T, B = dst.shape
    for t in range(T):
        for i in range(B):
            dst[t, i] = src[t, order[i]] if i < counts[t] else 0


@njit(cache=True, nogil=True, error_model="numpy")
def concat_directions(y, hf, hr, lengths):
    """A bidirectional layer's output: y[t, b] = (hf[t, b], hr[lengths[b]-1-t, b]), 0 on padding.

    y (T, B, 2H); hf, hr (T, B, H) the two directions' h_1 .. h_T, each in its own step order
    """
    T, B, H = hf.shape
    for t in range(T):
        for b in range(B):
            row = y[t, b]
            n = lengths[b]
            if t < n:
                f = hf[t, b]
                r = hr[n - 1 - t, b]
                for j in range(H):
                    row[j] = f[j]
                    row[H + j] = r[j]
            else:
                for j in range(2 * H):
                    row[j] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def split_directions(dy, dhf, dhr, lengths):
    """``concat_directions`` backwards: dhf[t, b] = dy[t, b, :H]; dhr[s, b] = dy[lengths[b]-1-s, b, H:];
    0 on padding."""
    T, B, H = dhf.shape
    for t in range(T):
        for b in range(B):
            n = lengths[b]
            f = dhf[t, b]
            r = dhr[t, b]
            if t < n:
                g = dy[t, b]
                q = dy[n - 1 - t, b]
                for j in range(H):
                    f[j] = g[j]
                    r[j] = q[H + j]
            else:
                for j in range(H):
                    f[j] = 0
                    r[j] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def add_at_last(dh, src, order, lengths):
    """dh[lengths[i]-1, i] += src[order[i]]: what arrives at each sequence's last state.

    dh (T, B, H); src (B, H) in the caller's order
    """
    B, H = src.shape
    for i in range(B):
        row = dh[lengths[i] - 1, i]
        r = src[order[i]]
        for j in range(H):
            row[j] += r[j]


@njit(cache=True, nogil=True, error_model="numpy")
def pack_active(dst, src, counts):
    """The active rows one after another: dst[off_t + i] = src[t, i] for i < counts[t], with
    off_t = Σ_{s<t} counts[s] (cuDNN's packed layout); returns the number of rows written.

    dst (>= Σ counts, K); src (T, B, K)
    """
    T, B, K = src.shape
    p = 0
    for t in range(T):
        for i in range(counts[t]):
            row = dst[p]
            r = src[t, i]
            for k in range(K):
                row[k] = r[k]
            p += 1
    return p


@njit(cache=True, nogil=True, error_model="numpy")
def dropout_mask(mask, p, scale):
    """mask[i] = scale where the uniform draw mask[i] >= p, else 0 (inverted dropout).

    mask (N,) in: u ~ U[0, 1); out: 0 or scale = 1/(1-p)
    """
    for i in range(mask.shape[0]):
        mask[i] = scale if mask[i] >= p else 0


@njit(cache=True, nogil=True, error_model="numpy")
def gather_last(dst, hs, inverse, lengths):
    """dst[b] = hs[lengths[i], i] with i = inverse[b]: each sequence's own last state, in the caller's order.

    dst (B, H); hs (T+1, B, H)
    """
    B = dst.shape[0]
    for b in range(B):
        i = inverse[b]
        r = hs[lengths[i], i]
        row = dst[b]
        for j in range(row.shape[0]):
            row[j] = r[j]


# ----------------------------------------------------------------------------- inputs


@njit(cache=True, nogil=True, error_model="numpy")
def gather_input(gx, tokens, W_ih, b_ih):
    """gx[t, b] = W_ih[:, tokens[t, b]] + b_ih: the input projection of one-hot inputs.

    gx     (T, B, G·H) out
    tokens (T, B)      int, every id in [0, D) (checked by the caller)
    W_ih   (G·H, D)
    b_ih   (G·H,)      zeros for a cell or model without it
    """
    T, B, GH = gx.shape
    for t in range(T):
        for b in range(B):
            k = tokens[t, b]
            row = gx[t, b]
            for i in range(GH):
                row[i] = W_ih[i, k] + b_ih[i]


@njit(cache=True, nogil=True, error_model="numpy")
def add_rows(a, v):
    """a[n] += v for every row n: a bias over all positions.

    a (N, K) in/out
    v (K,)
    """
    N, K = a.shape
    for n in range(N):
        for k in range(K):
            a[n, k] += v[k]


@njit(cache=True, nogil=True, error_model="numpy")
def scatter_input_grad(dW_ih, dgx, tokens):
    """dW_ih[:, tokens[t, b]] += dgx[t, b] for every position, in order: ∂L/∂W_ih for one-hot inputs.

    dW_ih  (G·H, D)    accumulated into (zeroed by the caller)
    dgx    (T, B, G·H) ∂L/∂(input projection)
    tokens (T, B)      int, every id in [0, D) (checked by the caller)
    """
    T, B, GH = dgx.shape
    for t in range(T):
        for b in range(B):
            k = tokens[t, b]
            for i in range(GH):
                dW_ih[i, k] += dgx[t, b, i]


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def scatter_input_grad_parallel(dW_ih, dgx, tokens):
    """``scatter_input_grad`` with the rows of dW_ih spread over threads.

    Each thread owns whole rows i of dW_ih and adds into them in the same (t, b) order
    as the serial kernel, so the result is bitwise the same.
    """
    T, B, GH = dgx.shape
    for i in prange(GH):
        for t in range(T):
            for b in range(B):
                dW_ih[i, tokens[t, b]] += dgx[t, b, i]


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
