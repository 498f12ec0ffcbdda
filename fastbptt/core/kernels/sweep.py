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
def _forward_block(cell, rec, ones, b0, b1):
    """Steps 0 .. T-1 of sequences b0 .. b1-1. rec (B, G·H) scratch; ones (B,) ones."""
    hs = cell.hs
    b_hh = cell.b_hh
    T = hs.shape[0] - 1
    for t in range(T):
        for b in range(b0, b1):
            r = rec[b]
            for k in range(b_hh.shape[0]):
                r[k] = b_hh[k]
        matmat_acc(rec, cell.W_hhT, hs[t], ones, b0, b1)     # rec[b] += W_hh h_{t-1}
        for b in range(b0, b1):
            step_forward(cell, t, b, rec[b])


@njit(cache=True, nogil=True, error_model="numpy")
def recurrence(cell, rec, ones):
    """The fused recurrence over the whole batch on one thread.

    cell  a cell's NamedTuple, with hs[0] = h_0 (and the cell's other state) and the
          input projection in place
    rec   (B, G·H) scratch
    ones  (B,) ones
    """
    _forward_block(cell, rec, ones, 0, cell.hs.shape[1])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def recurrence_parallel(cell, rec, ones, n_blocks):
    """``recurrence`` with the sequences split into ``n_blocks`` blocks, one per thread; bitwise the same."""
    B = cell.hs.shape[1]
    n = min(B, n_blocks)
    for k in prange(n):
        _forward_block(cell, rec, ones, k * B // n, (k + 1) * B // n)


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
def _backward_block(cell, carry, b0, b1):
    """Steps T-1 .. 0 of sequences b0 .. b1-1 backwards, then ∂L/∂(state_0). carry (T, B)."""
    dh = cell.dh
    drec = cell.drec
    T = dh.shape[0]
    one = carry.dtype.type(1)
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            matmat_acc(dh[t], cell.W_hh, drec[t + 1], carry[t + 1], b0, b1)   # += c W_hhᵀ drec
            for b in range(b0, b1):
                step_backward(cell, t, b, carry[t + 1, b])
        else:
            for b in range(b0, b1):
                step_backward(cell, t, b, one)
    dh0 = cell.dh0
    for b in range(b0, b1):
        row = dh0[b]
        for j in range(row.shape[0]):
            row[j] = 0
    matmat_acc(dh0, cell.W_hh, drec[0], carry[0], b0, b1)
    for b in range(b0, b1):
        state0_backward(cell, b, carry[0, b])


@njit(cache=True, nogil=True, error_model="numpy")
def reverse_sweep(cell, carry):
    """The fused reverse sweep over the whole batch on one thread.

    cell   a cell's NamedTuple after its forward pass, with ∂L/∂h_t from above in ``dh``
           and the cell's state-gradient scratch (``ds``, if any) holding what arrives at
           the last state (zeros, or the LSTM's ∂L/∂c_T)
    carry  (T, B) carry weights
    """
    _backward_block(cell, carry, 0, cell.dh.shape[1])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def reverse_sweep_parallel(cell, carry, n_blocks):
    """``reverse_sweep`` with the sequences split into ``n_blocks`` blocks, one per thread; bitwise the same."""
    B = cell.dh.shape[1]
    n = min(B, n_blocks)
    for k in prange(n):
        _backward_block(cell, carry, k * B // n, (k + 1) * B // n)


@njit(cache=True, nogil=True, error_model="numpy")
def backward_step(cell, t, back, c, add):
    """One step of the per-step BLAS sweep, for the whole batch: dh[t] += c back, then the cell's step.

    back (B, H) W_hhᵀ drec[t+1] from the caller's GEMM (any layout); not read when ``add`` is False
    c    (B,)   the carry weights of step t+1 (ones at the last step)
    """
    dh = cell.dh[t]
    for b in range(dh.shape[0]):
        cb = c[b]
        if add:
            row = dh[b]
            r = back[b]
            for j in range(row.shape[0]):
                row[j] += cb * r[j]
        step_backward(cell, t, b, cb)


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
