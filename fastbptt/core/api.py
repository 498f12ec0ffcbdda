"""The public API: validate and prepare, then call the compiled kernels.

Every argument is checked here, before any compiled code runs; the caller's
arrays are only read, never written. Results are views into a ``Workspace``:
pass one in and repeated calls allocate nothing, but each call overwrites what
the previous one returned (copy what you want to keep).

Inputs are either dense floats X of shape (T, B, D) or integer token ids of
shape (T, B), meaning one-hot vectors of size D = ``model.input_size``.

Every model is a recurrent layer (``layer_forward``/``layer_backward``, which take
and return ∂L/∂H) under a head (the readout o_t = W_qh h_t + b_q and the loss);
``loss_and_grad``, ``forward`` and ``backward`` run both. The layer runs the cell's
input projection (one GEMM, or a gather for token ids), the generic recurrence and
reverse sweep (``kernels.sweep``), and the weight gradients as single GEMMs.
"""

import contextlib

import numba
import numpy as np

from . import threads as _threads_mod
from .kernels import losses as _losses
from .kernels import sweep as _sweep
from .threads import dot
# the shared checks live in validation; the underscore names are the old ones, kept for callers and tests
from .validation import LOSSES  # noqa: F401  (the old names, kept for callers)
from .validation import all_finite as _all_finite  # noqa: F401
from .validation import as_array as _as_array  # noqa: F401
from .validation import check_ids as _check_ids  # noqa: F401
from .validation import check_loss as _check_loss  # noqa: F401
from .validation import check_carry as _check_carry
from .validation import check_flags as _check_flags
from .validation import check_float as _check_float
from .validation import check_inputs as _check_inputs
from .validation import check_forward_workspace as _check_forward_workspace
from .validation import check_h0 as _check_h0
from .validation import check_loss_weights as _check_loss_weights
from .validation import check_model
from .validation import check_owner as _check_owner
from .validation import check_state as _check_state
from .validation import check_targets as _check_targets
from .validation import check_workspace as _check_workspace

METHODS = ("auto", "fused", "blas")


def choose_method(B, H):
    """The recurrence that ``method="auto"`` runs for a batch of B sequences of hidden size H.

    ``"fused"`` runs the whole time loop in one compiled kernel (no call per step, each
    block of W_hh reused across the batch while in cache); ``"blas"`` runs one GEMM per
    step over the batch, which wins once the batch is wide enough for BLAS's blocking
    to pay for a call per step. Timed for every cell on the development machine (2 cores,
    AVX-512, OpenBLAS SkylakeX kernels; T = 50, B in 1..32, H in 32..1024): with B <= 4 the
    fused loop wins up to H = 512 and ties at H = 1024, with B >= 8 the per-step GEMM wins
    once B·H >= 1024, and the crossover hardly moves with the cell's gate count. The choice
    depends on the shape only, never on ``parallel``.
    """
    if B >= 8 and B * H >= 1024:
        return "blas"
    return "fused"


# ----------------------------------------------------------------------------- checks


def _private(a, ws):
    """``a``, or a copy of it when it overlaps a buffer of ``ws`` that the call writes before reading ``a``.

    Feeding a workspace's outputs back in (a rollout, outputs as targets) must give the
    same result as feeding a copy.
    """
    if a is not None and ws.overlaps(a):
        return a.copy()
    return a


_check_model = check_model     # the old name


def _check_method(method, B, model, lengths=None, T=None):
    """The method to run; ``"auto"`` picks by shape, with lengths by the mean number of sequences
    a step runs (Σ lengths / T): a batch of short and long sequences is narrower than B."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    if lengths is not None:
        B = max(1, int(round(int(lengths.sum()) / T)))
    return choose_method(B, model.hidden_size)


def _threads(parallel, method):
    """Whether the compiled kernels run on Numba's threads.

    ``parallel`` spreads the fused kernels over Numba's threads; the per-step BLAS
    method runs its own small kernels serially. Products go through ``threads.dot``
    either way, with BLAS threads chosen by size, so the bits never depend on it.
    """
    if parallel:
        _threads_mod.warn_if_uncontrolled()
    return bool(parallel and method == "fused" and _threads_mod.parallel_allowed())


def _launch(parallel):
    """The context around a compiled kernel: one launch at a time of Numba's pool when parallel."""
    return _threads_mod.parallel_launch() if parallel else contextlib.nullcontext()


class _claim:
    """``with _claim(ws):`` around a call's work: holds ``ws`` (a call from another thread meanwhile
    gets a RuntimeError) and a ``threads`` session (BLAS threads by product size)."""

    __slots__ = ("ws",)

    def __init__(self, ws):
        self.ws = ws

    def __enter__(self):
        if not self.ws._busy.acquire(blocking=False):
            raise RuntimeError("workspace is in use by another call (another thread?): give each "
                               "thread its own fastbptt.Workspace")
        _threads_mod.enter()
        return self.ws

    def __exit__(self, *exc):
        _threads_mod.leave()
        self.ws._busy.release()
        return False


# ----------------------------------------------------------------------------- passes


# ----------------------------------------------------------------------------- lengths
# With lengths the sequences are sorted, longest first, once per call: row i of every buffer
# holds the caller's sequence ws.row_order[i] and step t runs rows 0 .. counts[t]-1, so both
# methods step only the rows still active (cuDNN's packed layout, in (T, B) buffers). Inputs,
# targets, weights, carry and states are packed into that order on the way in and unpacked
# on the way out; positions past a sequence's end hold zeros.


def _take(src, idx, axis, out):
    """``np.take(src, idx, axis, out=out)`` without a temporary (indices are in range: checked or
    made here), copying ``src`` first only when it overlaps ``out``."""
    if np.may_share_memory(src, out):
        src = src.copy()
    return np.take(src, idx, axis=axis, out=out, mode="clip")


#: With lengths, products of at least this many floating-point operations skip the padding:
#: per-step products over the active rows, or sums over the packed active rows. Below it one
#: product over all T·B positions costs less than the extra calls.
PACKED_MIN_FLOPS = 2 ** 21


def _rows_dot(ws, a, M, out):
    """out[t, b] = a[t, b] M for every position: a (T, B, K1), M (K1, K2), out (T, B, K2).

    With lengths and a product big enough, one product per step over its active rows (the
    padding rows of ``out`` are zeroed); otherwise one product over all T·B positions.
    """
    T, B = ws.T, ws.B
    K1, K2 = M.shape
    if not ws._lengths_on or 2 * B * K1 * K2 < PACKED_MIN_FLOPS:
        dot(a.reshape(T * B, K1), M, out.reshape(T * B, K2))
        return
    counts = ws.counts
    for t in range(T):
        n = counts[t]
        dot(a[t, :n], M, out[t, :n])
    _sweep.zero_padding(out, counts)


def _sum_dot(ws, a, b, out):
    """out = Σ_t,b a[t, b]ᵀ b[t, b]: a (T, B, K1), b (T, B, K2), out (K1, K2) (a weight gradient).

    With lengths and a product big enough, over the active rows packed one after another
    (padding rows hold zeros in ``a``, so they would add nothing but time).
    """
    T, B = ws.T, ws.B
    K1, K2 = a.shape[2], b.shape[2]
    if not ws._lengths_on or 2 * T * B * K1 * K2 < 2 * PACKED_MIN_FLOPS:
        dot(a.reshape(T * B, K1).T, b.reshape(T * B, K2), out)
        return
    pa = ws.scratch(f"packed_a{K1}", (T * B, K1))
    pb = ws.scratch(f"packed_b{K2}", (T * B, K2))
    P = _sweep.pack_active(pa, a, ws.counts)
    _sweep.pack_active(pb, b, ws.counts)
    dot(pa[:P].T, pb[:P], out)


def _plan(ws):
    """(order, inverse, lengths, counts) of the call: the workspace's record of lengths, or the
    private one of full lengths."""
    if ws._lengths_on:
        return ws.row_order, ws.inverse, ws.lengths, ws.counts
    return ws._full


def _set_lengths(ws, lengths):
    """Record the call's lengths (None: every sequence has length T) in the workspace."""
    if lengths is None:
        ws._lengths_on = False
        return
    T, B = ws.T, ws.B
    order = np.argsort(-lengths, kind="stable")
    ws.row_order[...] = order
    ws.inverse[order] = np.arange(B)
    ws.lengths[...] = lengths[order]
    ws.counts[...] = np.searchsorted(-ws.lengths, -np.arange(T), side="left")   # #(lengths > t)
    ws._lengths_on = True
    ws._seal()


def _state_parts(state, model):
    """A state as a list of (h, c or None) per layer and direction, in the caller's order."""
    if state is None:
        return [(None, None)] * model.n_states
    h, c = state if model.cell == "lstm" else (state, None)
    if model.n_states == 1:
        return [(h, c)]
    return [(h[i], None if c is None else c[i]) for i in range(model.n_states)]


def _start(model, ws, h0):
    """Every layer's hs[0] = h_0 (and the LSTM's cs[0] = c_0), in the workspace's row order.

    The call's first writes into the workspace, so the state may be a view of it (a previous
    call's state) without a copy; a part of h0 that overlaps a buffer written before it is read
    is copied first.
    """
    order = ws.row_order if ws._lengths_on else None
    if model.n_states == 1 and order is None:           # one layer, the caller's order: as before
        if ws.cell == "lstm":
            h, c = (None, None) if h0 is None else h0
            if h is not None and np.may_share_memory(h, ws.cs[0]):
                h = h.copy()
            ws.cs[0] = 0 if c is None else c
            ws.hs[0] = 0 if h is None else h
        else:
            ws.hs[0] = 0 if h0 is None else h0
        return
    dirs = model.num_directions
    dests = []
    for i in range(model.n_states):
        lb = ws._layers[i // dirs][i % dirs]
        dests.append((lb.hs[0], lb.cs[0] if ws.cell == "lstm" else None))
    parts = _state_parts(h0, model)
    every = [buf for pair in dests for buf in pair if buf is not None]
    safe = []
    for part, own in zip(parts, dests):   # a part that overlaps another's destination is copied first
        safe.append(tuple(a.copy() if a is not None and any(
            np.may_share_memory(a, buf) for buf in every if buf is not dst) else a
            for a, dst in zip(part, own)))
    for (h, c), (hbuf, cbuf) in zip(safe, dests):
        for buf, value in ((hbuf, h), (cbuf, c)):
            if buf is None:
                continue
            if value is None:
                buf[...] = 0
            elif order is None:
                buf[...] = value
            else:
                _take(value, order, axis=0, out=buf)


def _state_T(model, ws):
    """The last states: h_T, the LSTM's pair (h_T, c_T), or (L·dirs, B, H) arrays of them.

    One layer and full lengths: views of hs[T] (and cs[T]); otherwise each sequence's own
    last state, gathered into ws.state (and ws.cstate) in the caller's order.
    """
    T = ws.T
    if model.n_states == 1 and not ws._lengths_on:
        return (ws.hs[T], ws.cs[T]) if ws.cell == "lstm" else ws.hs[T]
    if ws.B == 0:                                   # an empty batch: empty states, no kernel
        if model.n_states == 1:
            return (ws.state[0], ws.cstate[0]) if ws.cell == "lstm" else ws.state[0]
        return (ws.state, ws.cstate) if ws.cell == "lstm" else ws.state
    _, inverse, lengths, _ = _plan(ws)
    dirs = model.num_directions
    for i in range(model.n_states):
        lb = ws._layers[i // dirs][i % dirs]
        _sweep.gather_last(ws.state[i], lb.hs, inverse, lengths)
        if ws.cell == "lstm":
            _sweep.gather_last(ws.cstate[i], lb.cs, inverse, lengths)
    if model.n_states == 1:
        return (ws.state[0], ws.cstate[0]) if ws.cell == "lstm" else ws.state[0]
    return (ws.state, ws.cstate) if ws.cell == "lstm" else ws.state


def _state_grad0(model, ws):
    """∂L/∂(the first states), shaped as the state (views into the workspace)."""
    if model.n_states == 1 and not ws._lengths_on:
        return (ws.dh0, ws.dc0) if ws.cell == "lstm" else ws.dh0
    order = ws.row_order if ws._lengths_on else None
    dirs = model.num_directions
    for i in range(model.n_states):
        lb = ws._layers[i // dirs][i % dirs]
        for src, dst in ((lb.dh0, ws.dstate[i]), (lb.dc0 if ws.cell == "lstm" else None,
                                                   ws.dcstate[i] if ws.cell == "lstm" else None)):
            if src is None:
                continue
            if order is None:
                dst[...] = src
            else:
                _take(src, ws.inverse, axis=0, out=dst)
    if model.n_states == 1:
        return (ws.dstate[0], ws.dcstate[0]) if ws.cell == "lstm" else ws.dstate[0]
    return (ws.dstate, ws.dcstate) if ws.cell == "lstm" else ws.dstate


def _compiled(ws, kernel, *args):
    """The compiled entry point of ``kernel`` for ``args``, resolved once per workspace.

    Numba's dispatcher types every argument on every call, and a cell's NamedTuple of a dozen
    arrays takes microseconds to type; the per-step BLAS loops call a kernel 2T times. The
    arguments a workspace's calls pass are always of the same types (its own buffers, the
    model's C-contiguous views of the dtype its signature fixes), so the entry point found
    on its first call serves every later one. Not pickled: rebuilt in each process.
    """
    entry = ws._entries.get(kernel)
    if entry is None:
        if not hasattr(kernel, "overloads"):     # not a Numba dispatcher (a test's stand-in)
            return kernel
        sig = tuple(kernel.typeof_pyval(a) for a in args)
        cres = kernel.overloads.get(sig)
        entry = cres.entry_point if cres is not None else kernel.compile(sig)
        ws._entries[kernel] = entry
    return entry


def _layer_weights(model, ws, k=0, d=0):
    """(W_ih, b_ih, W_hh, b_hh) of layer k in direction d, zeros for the biases a model lacks."""
    W_ih, b_ih, W_hh, b_hh = model._roles[k, d]
    return W_ih, ws.zero_b if b_ih is None else b_ih, W_hh, ws.zero_b if b_hh is None else b_hh


def _cell_views(model, ws, k=0, d=0):
    """The cell's NamedTuple over layer k's buffers in direction d, as the sweep kernels take it.

    Made once per (workspace, layer, model, activation) and kept with the layer's buffers: a
    call builds it three times otherwise, which shows in the smallest steps.
    """
    lb = ws._layers[k][d]
    act, views = model._act_code, model._kernel_views
    kept = lb._cell_views
    if kept is not None and kept[0] is views and kept[1] == act:
        return kept[2]
    _, _, W_hh, b_hh = _layer_weights(model, ws, k, d)
    cell = model._CELL.kernel_views(lb, W_hh, lb.W_hhT, b_hh, act)
    lb._cell_views = (views, act, cell)
    return cell


def _input(ws, k, d, kind, X):
    """What layer k's direction d reads: ("tokens", ids) or ("dense", (T, B, Dk) floats), each
    sequence reversed in time for the reverse direction. X is the layer's input in row order."""
    if d == 0:
        return kind, (ws.tokens if kind == "tokens" else X)
    _, _, lengths, _ = _plan(ws)
    if kind == "tokens":
        return kind, ws.tokens_r
    lb = ws._layers[k][d]
    xr = lb.xr if k > 0 else ws.scratch("x0r", X.shape)
    _sweep.reverse_in_time(xr, X, lengths)
    return kind, xr


def _direction_forward(model, ws, k, d, kind, X, parallel, method):
    """Fill layer k's hs[1:] in direction d (and the cell's other activations) from its hs[0]."""
    T, B = ws.T, ws.B
    lb = ws._layers[k][d]
    W_ih, b_ih, W_hh, _ = _layer_weights(model, ws, k, d)
    cell = _cell_views(model, ws, k, d)
    _, _, _, counts = _plan(ws)
    kind, X = _input(ws, k, d, kind, X)
    gx = cell.gx                                                    # (T, B, G·H): the input projection
    GH = gx.shape[2]
    if kind == "tokens":
        _sweep.gather_input(gx, X, W_ih, b_ih)
    else:
        _rows_dot(ws, X, W_ih.T, gx)
        if model.bias and model._CELL.NAMES["b_ih"]:
            _sweep.add_rows(gx.reshape(T * B, GH), b_ih)
    lb.W_hhT[...] = W_hh.T                                          # contiguous: faster GEMMs too
    if method == "fused":
        if parallel:
            with _launch(parallel):
                _compiled(ws, _sweep.recurrence_parallel, cell, lb.rec, ws.ones[:B], counts, 1)(
                    cell, lb.rec, ws.ones[:B], counts, numba.get_num_threads())
        else:
            _compiled(ws, _sweep.recurrence, cell, lb.rec, ws.ones[:B], counts)(
                cell, lb.rec, ws.ones[:B], counts)
    else:
        hs = lb.hs
        row = lb.rec[0]                                               # the fused method's scratch
        flat = lb.recT.reshape(-1)
        step = _compiled(ws, _sweep.forward_step, cell, 0, lb.recT.T, row)
        for t in range(T):   # transposed products (G·H x H times H x n) are faster in OpenBLAS
            n = counts[t]
            recT = lb.recT if n == B else flat[:GH * n].reshape(GH, n)
            dot(W_hh, hs[t][:n].T, recT)                              # (W_hh h_{t-1})ᵀ, active rows
            step(cell, t, recT.T, row)
    if ws._lengths_on:
        _sweep.zero_padding(_hs_out(lb), counts)


def _hs_out(lb):
    """h_1 .. h_T of a layer's buffers (T, B, H)."""
    return lb.hs[1:]


def _layer_output(model, ws, k):
    """Layer k's output (T, B, dirs·H) in row order: its hs[1:], or both directions side by side,
    times the dropout mask below the top layer while training."""
    y, _, mask = ws._outputs[k]
    if model.num_directions == 2:
        _, _, lengths, _ = _plan(ws)
        _sweep.concat_directions(y, _hs_out(ws._layers[k][0]), _hs_out(ws._layers[k][1]), lengths)
        out = y
    else:
        out = _hs_out(ws._layers[k][0])
    if ws._dropout_on and k < model.num_layers - 1:
        np.multiply(out, mask, out=y)
        out = y
    return out


def _kept_output(model, ws, k):
    """Layer k's output as ``_layer_output`` left it in the forward pass (not recomputed)."""
    y = ws._outputs[k][0]
    if model.num_directions == 2 or (ws._dropout_on and k < model.num_layers - 1):
        return y
    return _hs_out(ws._layers[k][0])


def _draw_masks(model, ws):
    """Draw every layer's dropout mask for this call (inverted dropout: 0 or 1/(1-p)).

    p = 1 drops every unit (as ``torch.nn``): the masks are zeros, nothing is drawn, and the
    layers above get zeros (times the output, so an inf or NaN there stays NaN, as PyTorch's
    ``input * 0``)."""
    ws._dropout_on = model._dropout_active()
    if not ws._dropout_on:
        return
    p = model.dropout
    for k in range(model.num_layers - 1):
        mask = ws._outputs[k][2]
        if p >= 1.0:
            mask[...] = 0
            continue
        model.generator.random(dtype=mask.dtype, out=mask)          # u ~ U[0, 1)
        _sweep.dropout_mask(mask.reshape(-1), mask.dtype.type(p), mask.dtype.type(1.0 / (1.0 - p)))


def _layer_forward(model, ws, kind, X, parallel, method):
    """Every layer, bottom to top; return the top layer's output (T, B, dirs·H) in row order.

    X (dense, in row order) or ws.tokens (and ws.tokens_r) hold the inputs; states are in place.
    """
    _draw_masks(model, ws)
    out = X
    for k in range(model.num_layers):
        for d in range(model.num_directions):
            _direction_forward(model, ws, k, d, kind if k == 0 else "dense", out, parallel, method)
        out = _layer_output(model, ws, k)
    return out


def _readout_input(model, ws):
    """The top layer's output as (T·B, dirs·H), as the readout reads it."""
    k = model.num_layers - 1
    if model.num_directions == 2:
        y = ws._outputs[k][0]
    else:
        y = _hs_out(ws._layers[k][0])
    return y.reshape(ws.T * ws.B, y.shape[2])


def _forward(model, ws, kind, X, parallel, method):
    """The layers, then the readout: ws.out holds o_1 .. o_T."""
    _layer_forward(model, ws, kind, X, parallel, method)
    p = model._kernel_views
    top = _readout_input(model, ws)
    _rows_dot(ws, top.reshape(ws.T, ws.B, -1), p["W_qh"].T, ws.out.reshape(ws.T, ws.B, -1))
    if model.bias:
        _sweep.add_rows(ws.out, p["b_q"])


def _top_grad_buffer(model, ws):
    """Where ∂L/∂(the top layer's output) goes: its dh (one direction) or its dy (two)."""
    k = model.num_layers - 1
    if model.num_directions == 2:
        return ws._outputs[k][1]
    return _cell_views(model, ws, k, 0).dh


def _readout_backward(model, ws):
    """From ∂L/∂o in ws.out: the readout's gradients, and ∂L/∂(top output) = W_qhᵀ ∂L/∂o_t."""
    p, g = model._kernel_views, ws.grads
    T, B = ws.T, ws.B
    dO = ws.out
    dO3 = dO.reshape(T, B, -1)
    top = _readout_input(model, ws)
    _sum_dot(ws, dO3, top.reshape(T, B, -1), g["W_qh"])             # Σ_t ∂L/∂o_t h_tᵀ
    if model.bias:
        dot(ws.ones, dO, g["b_q"])                                    # Σ_t ∂L/∂o_t
    _rows_dot(ws, dO3, p["W_qh"], _top_grad_buffer(model, ws))      # W_qhᵀ ∂L/∂o_t, all t


def _into_directions(model, ws, k):
    """Layer k's ∂L/∂output (in its dh, or its dy for two directions) into each direction's dh:
    times the dropout mask below the top, split and reversed for the reverse direction."""
    _, dy, mask = ws._outputs[k]
    dirs = model.num_directions
    if ws._dropout_on and k < model.num_layers - 1:
        target = dy if dirs == 2 else _cell_views(model, ws, k, 0).dh
        np.multiply(target, mask, out=target)
    if dirs == 2:
        _, _, lengths, _ = _plan(ws)
        _sweep.split_directions(dy, _cell_views(model, ws, k, 0).dh, _cell_views(model, ws, k, 1).dh,
                                lengths)


def _arrives_at_last(model, ws, parts, k):
    """Add what arrives at layer k's last states (``parts`` of dstate_T, the caller's order) to its
    dh at each sequence's last step, and set the cells' direct-state scratch (ds)."""
    order, _, lengths, _ = _plan(ws)
    dirs = model.num_directions
    for d in range(dirs):
        dh_T, dc_T = parts[k * dirs + d]
        lb = ws._layers[k][d]
        if dh_T is not None:
            _sweep.add_at_last(_cell_views(model, ws, k, d).dh, dh_T, order, lengths)
        if ws.cell != "rnn":
            if dc_T is None:
                lb.ds[...] = 0
            else:
                _take(dc_T, order, axis=0, out=lb.ds)


def _direction_backward(model, ws, k, d, kind, X, parallel, method, weights):
    """Layer k's reverse sweep in direction d (∂L/∂h from above in its dh) and its weight gradients."""
    g = ws.grads
    T, B = ws.T, ws.B
    H = model.hidden_size
    lb = ws._layers[k][d]
    names = model._names[k, d]
    W_ih, _, W_hh, _ = _layer_weights(model, ws, k, d)
    cell = _cell_views(model, ws, k, d)
    _, _, _, counts = _plan(ws)
    if method == "fused":
        if parallel:
            with _launch(parallel):
                _compiled(ws, _sweep.reverse_sweep_parallel, cell, weights, counts, 1)(
                    cell, weights, counts, numba.get_num_threads())
        else:
            _compiled(ws, _sweep.reverse_sweep, cell, weights, counts)(cell, weights, counts)
    else:
        drec = cell.drec
        flat = lb.backT.reshape(-1)
        step = _compiled(ws, _sweep.backward_step, cell, 0, lb.backT.T, ws.ones[:B], 0, 0)
        for t in range(T - 1, -1, -1):
            n = counts[t + 1] if t < T - 1 else 0                     # rows that go on to t+1
            backT = lb.backT if n == B else flat[:H * n].reshape(H, n)
            if n:
                dot(lb.W_hhT, drec[t + 1][:n].T, backT)              # (W_hhᵀ drec_{t+1})ᵀ
            step(cell, t, backT.T, weights[t + 1] if n else ws.ones[:B], n, counts[t])
        dot(drec[0], W_hh, lb.dh0)
        _compiled(ws, _sweep.backward_state0, cell, weights[0])(cell, weights[0])
    if ws._lengths_on:                                 # padding sends nothing to the weights
        _sweep.zero_padding(cell.dgx, counts)
        if cell.drec is not cell.dgx:
            _sweep.zero_padding(cell.drec, counts)
    GH = cell.drec.shape[2]
    drec = cell.drec.reshape(T * B, GH)
    dgx = cell.dgx.reshape(T * B, GH)
    _sum_dot(ws, cell.drec, lb.hs[:-1], g[names["W_hh"]])           # Σ_t ∂L/∂rec_t h_{t-1}ᵀ
    if model.bias:
        dot(ws.ones, drec, g[names["b_hh"]])                          # Σ_t ∂L/∂rec_t
        if names["b_ih"]:
            dot(ws.ones, dgx, g[names["b_ih"]])                       # Σ_t ∂L/∂(W_ih x_t + b_ih)
    dW_ih = g[names["W_ih"]]
    if kind == "tokens":
        tokens = ws.tokens if d == 0 else ws.tokens_r
        dW_ih[...] = 0
        if parallel:
            with _launch(parallel):
                _sweep.scatter_input_grad_parallel(dW_ih, cell.dgx, tokens)
        else:
            _sweep.scatter_input_grad(dW_ih, cell.dgx, tokens)
    else:
        if d == 1:
            X = lb.xr if k > 0 else _input(ws, k, d, kind, X)[1]    # rebuilt: it may be a fresh process
        _sum_dot(ws, cell.dgx, X, dW_ih)                              # Σ_t ∂L/∂(W_ih x_t) x_tᵀ


def _input_grad(model, ws, k, target):
    """∂L/∂(layer k's input) = Σ_d W_ihᵀ ∂L/∂(W_ih x_t) into ``target`` (T, B, Dk), row order; the
    reverse direction's added back in time order."""
    W_ih = _layer_weights(model, ws, k, 0)[0]
    _rows_dot(ws, _cell_views(model, ws, k, 0).dgx, W_ih, target)
    if model.num_directions == 2:
        _, _, lengths, _ = _plan(ws)
        dxr = ws._layers[k][1].dxr if k > 0 else ws.scratch("dx0r", target.shape)
        _rows_dot(ws, _cell_views(model, ws, k, 1).dgx, _layer_weights(model, ws, k, 1)[0], dxr)
        _sweep.add_reversed_in_time(target, dxr, lengths)


def _dX_target(ws):
    """Where the bottom layer's ∂L/∂X goes: ws.dX_buffer() (row order is the caller's without lengths),
    else a scratch in row order, unpacked afterwards."""
    if ws._lengths_on:
        return ws.scratch("dX_rows", (ws.T, ws.B, ws.signature[1]))
    return ws.dX_buffer()


def _layer_backward(model, ws, kind, X, parallel, method, want_dX, carry=None, dstate_T=None):
    """From ∂L/∂(top output) (in the top layer's dh, or dy): every layer's gradients in ws.grads,
    ∂L/∂(states_0) and (if wanted) ws.dX_buffer(). ``dstate_T`` is what arrives at the last states
    (the caller's order; None: nothing). Each layer's ∂L/∂input lands in the dh (or dy) of the
    layer below: no copies between layers."""
    if carry is None:
        weights = ws.carry_full
    else:
        weights = ws.carry
        c = carry if carry.ndim == 2 else np.broadcast_to(carry[:, None], (ws.T, ws.B))
        if ws._lengths_on:
            _take(c, ws.row_order, axis=1, out=weights)
        else:
            weights[...] = c
    ws.last_carry = weights
    L, dirs = model.num_layers, model.num_directions
    top = L - 1
    _into_directions(model, ws, top)
    parts = _state_parts(dstate_T, model)
    for k in range(top, -1, -1):
        _arrives_at_last(model, ws, parts, k)
        X_k = X if k == 0 else _kept_output(model, ws, k - 1)
        for d in range(dirs):
            _direction_backward(model, ws, k, d, kind if k == 0 else "dense", X_k, parallel, method,
                                weights)
        if k > 0:
            _input_grad(model, ws, k, ws._outputs[k - 1][1] if dirs == 2
                        else _cell_views(model, ws, k - 1, 0).dh)
            _into_directions(model, ws, k - 1)
        elif want_dX:
            target = _dX_target(ws)
            _input_grad(model, ws, 0, target)
            if ws._lengths_on:
                _take(target, ws.inverse, axis=1, out=ws.dX_buffer())


def _backward(model, ws, kind, X, parallel, method, want_dX, carry=None):
    """From ∂L/∂o in ws.out, fill ws.grads, ∂L/∂(state_0) and (if wanted) ws.dX_buffer()."""
    _readout_backward(model, ws)
    _layer_backward(model, ws, kind, X, parallel, method, want_dX, carry)
    ws.last_backward = "readout"                    # ws.out holds the ∂L/∂o it started from


def _targets(loss, ws, Y):
    """The targets in row order, flat: ws.targets (labels) or an (T·B, O) array (MSE)."""
    T, B = ws.T, ws.B
    if loss == "cross_entropy":
        if ws._lengths_on:
            ids = ws.scratch("ids", (T, B), np.intp)
            np.copyto(ids, Y, casting="unsafe")        # padding labels may be anything: never read
            _sweep.pack_ids(ws.targets.reshape(T, B), ids, ws.row_order, ws.counts)
        else:
            np.copyto(ws.targets, Y.reshape(T * B), casting="unsafe")   # labels are in range: exact
        return ws.targets
    O = ws.out.shape[1]
    if ws._lengths_on:
        rows = ws.scratch("y_rows", (T, B, O))
        _sweep.pack_rows(rows, Y, ws.row_order, ws.counts)
        return rows.reshape(T * B, O)
    return Y.reshape(T * B, O)


def _loss_weights(ws, loss_weights):
    """Fill ws.weights (row order, 0 on padding) and return Σ w; None when every position counts 1."""
    T, B = ws.T, ws.B
    if loss_weights is None and not ws._lengths_on:
        return None
    w = ws.weights.reshape(T, B, 1)
    src = ws.ones.reshape(T, B, 1) if loss_weights is None else loss_weights.reshape(T, B, 1)
    if ws._lengths_on:
        _sweep.pack_rows(w, src, ws.row_order, ws.counts)
    else:
        w[...] = src
    return float(np.sum(ws.weights, dtype=np.float64))


def _loss(loss, ws, Y, parallel, loss_weights=None):
    """Overwrite the outputs in ws.out with ∂L/∂o and return the (weighted) mean loss."""
    targets = _targets(loss, ws, Y)
    total = _loss_weights(ws, loss_weights)
    if total is not None:
        kernel = {("cross_entropy", False): _losses.cross_entropy_weighted,
                  ("cross_entropy", True): _losses.cross_entropy_weighted_parallel,
                  ("mse", False): _losses.mse_weighted,
                  ("mse", True): _losses.mse_weighted_parallel}[loss, bool(parallel)]
        with _launch(parallel):
            return kernel(ws.out, ws.row_loss, targets, ws.weights, total)
    if loss == "cross_entropy":
        if parallel:
            with _launch(parallel):
                return _losses.cross_entropy_parallel(ws.out, ws.row_loss, targets)
        return _losses.cross_entropy(ws.out, ws.row_loss, targets)
    if parallel:
        with _launch(parallel):
            return _losses.mse_parallel(ws.out, ws.row_loss, targets)
    return _losses.mse(ws.out, ws.row_loss, targets)


def _extras(model, ws, return_dh0, return_dX):
    """The optional results, in the documented order."""
    out = ()
    if return_dh0:
        out += (_state_grad0(model, ws),)
    if return_dX:
        out += (ws.dX_buffer(),)
    return out


def _take_inputs(ws, kind, X, keep):
    """Put the inputs where the layers read them, in row order; return the dense X to use.

    Token ids go to ws.tokens (and, reversed in time, ws.tokens_r); dense inputs are copied to
    ws.x_buffer() when ``keep`` (for a later backward) or when lengths sort them.
    """
    T, B = ws.T, ws.B
    if kind == "tokens":
        if ws._lengths_on:
            ids = ws.scratch("ids", (T, B), np.intp)
            np.copyto(ids, X, casting="unsafe")       # padding ids may be anything: never read
            _sweep.pack_ids(ws.tokens, ids, ws.row_order, ws.counts)
        else:
            np.copyto(ws.tokens, X, casting="unsafe")     # ids are in range: the cast is exact
        if ws.num_directions == 2:
            _, _, lengths, _ = _plan(ws)
            _sweep.reverse_in_time(ws.tokens_r[:, :, None], ws.tokens[:, :, None], lengths)
        return X
    if ws._lengths_on:
        _sweep.pack_rows(ws.x_buffer(), X, ws.row_order, ws.counts)
        return ws.x_buffer()
    if keep:
        np.copyto(ws.x_buffer(), X)
        return ws.x_buffer()
    return X


def _caller_order(ws, a, name):
    """``a`` (T, B, K) in row order as the caller's order: itself without lengths, else a copy in a
    scratch buffer (positions past each end are zero)."""
    if not ws._lengths_on:
        return a
    _sweep.zero_padding(a, ws.counts)
    return _take(a, ws.inverse, axis=1, out=ws.scratch(name, a.shape))


def _into_rows(ws, dst, src):
    """Copy the caller's (T, B, K) ``src`` into ``dst`` in row order (zeros past each end)."""
    if ws._lengths_on:
        if np.may_share_memory(src, dst):
            src = src.copy()
        _sweep.pack_rows(dst, src, ws.row_order, ws.counts)
    else:
        np.copyto(dst, src)


def _begin(model, ws, h0, lengths):
    """The first writes of every call: the lengths, then the states (which may be views of the
    workspace, read before anything else is written)."""
    _set_lengths(ws, lengths)
    _start(model, ws, h0)


def _forward_keeping_inputs(run, model, X, h0, lengths, workspace, parallel, check_finite, method):
    """``forward`` and ``layer_forward``: check everything, then ``run`` (``_forward`` or
    ``_layer_forward``) with the inputs kept in the workspace for the backward pass."""
    check_finite, parallel = _check_flags(check_finite=check_finite, parallel=parallel)
    check_model(model, check_finite)
    kind, X, T, B, lengths = _check_inputs(model, X, check_finite, lengths, h0=h0)
    h0 = _check_h0(h0, model, B, check_finite)
    method = _check_method(method, B, model, lengths, T)
    ws = _check_workspace(workspace, model, T, B)
    parallel = _threads(parallel, method)
    with _claim(ws):
        X = _private(X, ws)
        ws._forgotten()                                   # until this pass is complete
        if B == 0:
            _empty_forward(model, ws, kind)
        else:
            _begin(model, ws, h0, lengths)                # first: h0 may be a view of the kept inputs
            X = _take_inputs(ws, kind, X, keep=True)
            run(model, ws, kind, X, parallel, method)
        ws.forward_kind = kind
        # backward comes later: it checks the model, and the parameters against a copy kept here
        # unless the pass is so small that the copy would cost as much (a step of generation)
        ws._filled_by(model, keep_params=T * B >= KEEP_PARAMS_MIN_POSITIONS)
    return ws


#: ``forward``/``layer_forward`` over at least this many positions (T·B) keep a copy of the parameters
#: for ``backward`` to compare with; a smaller pass (a step of generation, T·B = 1, for which the copy
#: would cost about as much as the pass) keeps none, and a change of the parameters before its backward
#: is not detected. The copy costs one read and one write of ``model.flat``; the pass reads it T·B times.
KEEP_PARAMS_MIN_POSITIONS = 16


def _empty_forward(model, ws, kind):
    """A forward pass over B = 0 sequences: nothing to compute (no compiled code runs); the outputs
    and states are the workspace's empty views, as torch.nn.RNN returns empty tensors."""
    _set_lengths(ws, None)
    ws._dropout_on = False
    if kind == "dense":
        ws.x_buffer()


def _empty_backward(ws, want_dX):
    """A backward pass over B = 0 sequences: every gradient is zero (a sum over no positions)."""
    ws.grad_flat[...] = 0
    if want_dX:
        ws.dX_buffer()


def _top_output(model, ws):
    """The top layer's h_1 .. h_T as (T, B, dirs·H), in row order (shaped explicitly: B may be 0)."""
    return _readout_input(model, ws).reshape(ws.T, ws.B, model.num_directions * model.hidden_size)


# ----------------------------------------------------------------------------- public


def loss_and_grad(model, X, Y, h0=None, loss="cross_entropy", *, lengths=None, loss_weights=None,
                  workspace=None, parallel=False, return_dh0=False, return_dX=False, check_finite=True,
                  carry=None, method="auto"):
    """Loss, gradients of every parameter, and the final hidden state, by BPTT.

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    X : ndarray (T, B, D) of the model's dtype, or (T, B) integer token ids in [0, D)
        Non-contiguous arrays are accepted and copied.
    Y : ndarray (T, B) integer classes in [0, O) for ``"cross_entropy"``,
        or (T, B, O) of the model's dtype for ``"mse"``
    h0 : ndarray (B, H), or for the LSTM a pair (h0, c0) of them, optional
        Initial state; zeros when None. A model of several layers or directions takes
        (L·dirs, B, H) arrays, in PyTorch's order (layer k, direction d at k·dirs + d).
    loss : {"cross_entropy", "mse"}
        Softmax cross-entropy averaged over the T·B positions (as
        ``torch.nn.functional.cross_entropy`` on the flattened logits), or
        squared error averaged over all T·B·O elements (as ``mse_loss``).
    lengths : ndarray (B,) of ints in [1, T], optional
        Sequence b uses steps 0 .. lengths[b]-1 only: the loss averages over the
        Σ lengths valid positions (their elements for MSE), and the inputs and labels past
        each end are never read (they may hold anything, even ids out of range). The
        returned state is each sequence's own after its last step; a reverse direction
        starts at each sequence's last step. The result equals running each sequence alone,
        and a step costs only the sequences still running (as PyTorch's packed sequences).
    loss_weights : ndarray (T, B) of floats >= 0, optional
        Weights of the positions: L = Σ w ℓ / Σ w over the valid positions (score only
        some steps with 0 elsewhere). Converted to the model's dtype.
    workspace : fastbptt.Workspace, optional
        Buffers made for this model and this (T, B); a new one when None.
    parallel : bool
        Spread the B sequences of the fused method over Numba's threads. Products run
        on BLAS's threads only when big enough to pay for them, whatever ``parallel``
        is (``fastbptt.threads``), so results are bitwise equal to ``parallel=False``.
        In a process forked after a parallel call (``multiprocessing``'s ``fork``), the
        serial kernels run instead, with a warning.
    return_dh0, return_dX : bool
        Also return ∂L/∂h_0 (B, H) and ∂L/∂X (T, B, D) (for token ids: the
        gradient with respect to the one-hot vectors), in that order.
    check_finite : bool
        Refuse NaN or Inf in X, Y, h0 and the parameters with a ValueError (default).
        With False they are not looked for and propagate into the results.
    carry : ndarray (T,) or (T, B) of floats, optional
        Weights on the gradient each step sends back through time, in every layer (not
        for bidirectional models, whose reverse direction has no such order): the reverse sweep
        uses ∂L/∂h_{t-1} = carry[t] W_hhᵀ ∂L/∂z_t + W_qhᵀ ∂L/∂o_{t-1} (0-based t; carry[0]
        weighs ∂L/∂h_0); for the gated cells carry[t] weighs everything step t sends back to
        the state before it (the GRU's z ⊙ ∂L/∂h, the LSTM's f ⊙ ∂L/∂c too), as
        ``.detach()`` of the state does in PyTorch when it is 0. None (all ones) is full
        BPTT; a 0 cuts the graph before that step; 0 or 1/π at random gives the randomized
        truncation of Tallec & Ollivier. Converted to the model's dtype.
    method : {"auto", "fused", "blas"}
        How the recurrence and the sweep run: ``"fused"``, one compiled loop over t per
        sequence; ``"blas"``, one GEMM per step over the batch. ``"auto"`` picks by
        shape (``fastbptt.api.choose_method``). All give the same result up to rounding.

    Returns
    -------
    loss : float
    grads : mapping of str to ndarray
        Keyed like ``model.params``; views into the workspace.
    h_T : ndarray (B, H), or for the LSTM the pair (h_T, c_T)
        The last state (views into the workspace; pass it as the next chunk's
        ``h0`` to carry state without backpropagating across chunks); (L·dirs, B, H)
        arrays for a model of several layers or directions.
    dh0 : ndarray (B, H), only if ``return_dh0``
        ∂L/∂h_0; for the LSTM the pair (∂L/∂h_0, ∂L/∂c_0); shaped as h0 for stacks.
    dX : ndarray (T, B, D), only if ``return_dX``
        ∂L/∂X of the bottom layer (zeros past each sequence's end).
    """
    check_finite, parallel, return_dh0, return_dX = _check_flags(
        check_finite=check_finite, parallel=parallel, return_dh0=return_dh0, return_dX=return_dX)
    check_model(model, check_finite)
    kind, X, T, B, lengths = _check_inputs(model, X, check_finite, lengths, Y=Y, h0=h0)
    if B == 0:
        raise ValueError(f"X has B=0 sequences (shape {X.shape}): the loss is a mean over no positions "
                         f"(0/0); skip empty batches (forward/backward and layer_forward/layer_backward "
                         f"take B=0, as torch.nn.RNN does)")
    h0 = _check_h0(h0, model, B, check_finite)
    Y = _check_targets(Y, loss, model, T, B, check_finite, lengths)
    loss_weights = _check_loss_weights(loss_weights, T, B, model.dtype, lengths)
    carry = _check_model_carry(carry, model, T, B)
    method = _check_method(method, B, model, lengths, T)
    ws = _check_workspace(workspace, model, T, B)
    parallel = _threads(parallel, method)
    # -- everything is valid from here on
    with _claim(ws):
        X, Y, carry = _private(X, ws), _private(Y, ws), _private(carry, ws)
        loss_weights = _private(loss_weights, ws)
        ws._forgotten()
        _begin(model, ws, h0, lengths)
        X = _take_inputs(ws, kind, X, keep=False)
        _forward(model, ws, kind, X, parallel, method)
        ws.forward_kind = None                            # ws.out is about to hold ∂L/∂o, not o
        value = _loss(loss, ws, Y, parallel, loss_weights)
        _backward(model, ws, kind, X, parallel, method, return_dX, carry)
        ws._filled_by(model)                              # for the diagnostics that read it after
    return (value, ws.grads, _state_T(model, ws)) + _extras(model, ws, return_dh0, return_dX)


def _check_model_carry(carry, model, T, B):
    carry = _check_carry(carry, T, B, model.dtype)
    if carry is not None and model.bidirectional:
        raise ValueError("carry is not supported by bidirectional models: the reverse direction runs "
                         "each sequence from its end, so there is no earlier chunk to cut it from; "
                         "pass carry=None")
    return carry


def forward(model, X, h0=None, *, lengths=None, workspace=None, parallel=False, check_finite=True,
            method="auto"):
    """Run the recurrence and the readout, keeping what ``backward`` needs in the workspace.

    Parameters are as in ``loss_and_grad``. The inputs are copied into the
    workspace, so the caller may reuse X before calling ``backward``.

    Returns
    -------
    O : ndarray (T, B, O)
        The outputs o_1 .. o_T (a view into the workspace, overwritten by ``backward``);
        zeros past each sequence's end when ``lengths`` is given.
    h_T : ndarray (B, H), or for the LSTM the pair (h_T, c_T); (L·dirs, B, H) for stacks
    """
    ws = _forward_keeping_inputs(_forward, model, X, h0, lengths, workspace, parallel, check_finite,
                                 method)
    O = _caller_order(ws, ws.out.reshape(ws.T, ws.B, model.output_size), "O_caller")
    return O, _state_T(model, ws)


def backward(model, dO, *, workspace, parallel=False, return_dh0=False, return_dX=False,
             check_finite=True, carry=None, method="auto"):
    """Gradients from a caller-supplied ∂L/∂o, after ``forward`` on the same workspace.

    Use it for any loss: compute ∂L/∂o from the outputs ``forward`` returned, then
    call this. ``model`` must be the model object ``forward`` ran (another one, even of
    the same shapes, is refused) and its parameters must not change in between: they are
    compared bit for bit with a copy ``forward`` kept, and a change is refused (a ValueError),
    as PyTorch refuses a backward after an in-place change of a saved weight. (A forward pass
    over fewer than ``KEEP_PARAMS_MIN_POSITIONS`` = 16 positions T·B keeps no copy: there
    the model is checked, its parameters are not.)

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    dO : ndarray (T, B, O) of the model's dtype
        ∂L/∂o_t for every step and sequence.
    workspace : fastbptt.Workspace
        The one the preceding ``forward`` used.
    carry : ndarray (T,) or (T, B), optional
        As in ``loss_and_grad``.
    method : {"auto", "fused", "blas"}
        As in ``loss_and_grad``.

    Returns
    -------
    grads : mapping of str to ndarray
        Alone when neither ``return_dh0`` nor ``return_dX``; else the first of a tuple.
    dh0 : ndarray (B, H) (the LSTM: a pair), only if ``return_dh0``
    dX : ndarray (T, B, D), only if ``return_dX``
    """
    check_finite, parallel, return_dh0, return_dX = _check_flags(
        check_finite=check_finite, parallel=parallel, return_dh0=return_dh0, return_dX=return_dX)
    check_model(model, check_finite)
    ws = _check_forward_workspace(workspace, model)
    lengths = ws.lengths[ws.inverse] if ws.has_lengths else None
    dO = _check_float(dO, "dO", model.dtype, (ws.T, ws.B, model.output_size), check_finite, lengths)
    carry = _check_model_carry(carry, model, ws.T, ws.B)
    method = _check_method(method, ws.B, model, ws.lengths if ws.has_lengths else None, ws.T)
    parallel = _threads(parallel, method)
    with _claim(ws):
        carry = _private(carry, ws)
        kind = ws.forward_kind
        _into_rows(ws, ws.out.reshape(ws.T, ws.B, model.output_size), dO)   # first: dO may overlap
        ws.forward_kind = None
        if ws.B == 0:
            _empty_backward(ws, return_dX)
            ws.last_backward = "readout"
        else:
            _backward(model, ws, kind, ws._x, parallel, method, return_dX, carry)
    extras = _extras(model, ws, return_dh0, return_dX)
    return (ws.grads,) + extras if extras else ws.grads


def layer_forward(model, X, h0=None, *, lengths=None, workspace=None, parallel=False,
                  check_finite=True, method="auto"):
    """Run the recurrent layer alone (no readout), keeping what ``layer_backward`` needs.

    The entry point for stacks, bidirectional layers and bridges: the layer's outputs H
    go to whatever head the caller puts on top, whose ∂L/∂H comes back through
    ``layer_backward``. Arguments as in ``forward``; the inputs are copied into the
    workspace.

    Returns
    -------
    H : ndarray (T, B, dirs·H)
        The top layer's h_1 .. h_T, both directions side by side for a bidirectional model
        (a view into the workspace, valid until its next call; zeros past each end).
    state_T : ndarray (B, H), or for the LSTM the pair (h_T, c_T); (L·dirs, B, H) for stacks
    """
    ws = _forward_keeping_inputs(_layer_forward, model, X, h0, lengths, workspace, parallel,
                                 check_finite, method)
    return _caller_order(ws, _top_output(model, ws), "H_caller"), _state_T(model, ws)


def layer_backward(model, dH, dstate_T=None, *, workspace, parallel=False, check_finite=True,
                   carry=None, method="auto", return_dX=True):
    """Gradients of the recurrent layer from ∂L/∂H, after ``layer_forward`` (or ``forward``).

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    dH : ndarray (T, B, dirs·H) of the model's dtype
        ∂L/∂h_t for t = 1 .. T of the top layer's outputs, from whatever uses them (not
        changed; read only before each sequence's end).
    dstate_T : ndarray (B, H), or for the LSTM a pair of them, optional; (L·dirs, B, H) for stacks
        ∂L/∂(the last state), from whatever uses it beyond the sequence; None is zero.
    workspace : fastbptt.Workspace
        The one the preceding ``layer_forward`` used.
    carry : ndarray (T,) or (T, B), optional
        As in ``loss_and_grad``.
    return_dX : bool
        Also compute ∂L/∂X (one more GEMM); else ``dX`` is None.

    Returns
    -------
    grads : mapping of str to ndarray
        Keyed like ``model.params``; the readout's (``W_qh``, ``b_q``) are zero.
    dX : ndarray (T, B, D) or None
    dstate_0 : ndarray (B, H), or for the LSTM the pair (∂L/∂h_0, ∂L/∂c_0)
    """
    check_finite, parallel, return_dX = _check_flags(
        check_finite=check_finite, parallel=parallel, return_dX=return_dX)
    _check_model(model, check_finite)
    ws = _check_forward_workspace(workspace, model)
    T, B = ws.T, ws.B
    lengths = ws.lengths[ws.inverse] if ws.has_lengths else None
    dH = _check_float(dH, "dH", model.dtype, (T, B, model.num_directions * model.hidden_size),
                      check_finite, lengths)
    dstate_T = _check_state(dstate_T, "dstate_T", model, B, check_finite)
    carry = _check_model_carry(carry, model, T, B)
    method = _check_method(method, B, model, lengths, T)
    parallel = _threads(parallel, method)
    with _claim(ws):
        carry = _private(carry, ws)
        if dstate_T is not None:
            dstate_T = tuple(_private(a, ws) for a in dstate_T) if isinstance(dstate_T, tuple) \
                else _private(dstate_T, ws)
        kind = ws.forward_kind
        _into_rows(ws, _top_grad_buffer(model, ws), dH)  # first: dH may overlap the workspace
        ws.forward_kind = None
        for name in ("W_qh", "b_q"):
            if name in ws.grads:
                ws.grads[name][...] = 0
        if B == 0:
            _empty_backward(ws, return_dX)
        else:
            _layer_backward(model, ws, kind, ws._x, parallel, method, return_dX, carry, dstate_T)
        ws.last_backward = "layer"
    return ws.grads, (ws.dX_buffer() if return_dX else None), _state_grad0(model, ws)


# ----------------------------------------------------------------------------- bridges


def _trusted_layer_forward(model, ws, X, state, lengths, parallel, method):
    """``layer_forward`` for a bridge that has checked its arguments itself (``fastbptt.torch``).

    Nothing is checked here, so the caller guarantees: ``ws`` made for ``model`` and (T, B);
    X (T, B, D) of the model's dtype (any strides, not overlapping ``ws``); ``state`` as
    ``layer_forward`` takes it (after its checks) or None; ``lengths`` a (B,) intp array in
    [1, T] or None; ``method`` one of ``METHODS``. Returns views into ``ws``, as ``layer_forward``.
    """
    method = _check_method(method, ws.B, model, lengths, ws.T)
    parallel = _threads(parallel, method)
    with _claim(ws):
        ws._forgotten()
        if ws.B == 0:
            _empty_forward(model, ws, "dense")
        else:
            _begin(model, ws, state, lengths)
            X = _take_inputs(ws, "dense", X, keep=True)
            _layer_forward(model, ws, "dense", X, parallel, method)
        ws.forward_kind = "dense"
        ws._filled_by(model)            # parameters not kept: PyTorch's version counters guard them
    return _caller_order(ws, _top_output(model, ws), "H_caller"), _state_T(model, ws)


def _trusted_layer_backward(model, ws, dH, dstate_T, parallel, method, return_dX):
    """``layer_backward`` (no carry) after ``_trusted_layer_forward`` on ``ws``, for a caller that has
    checked dH (T, B, dirs·H) and ``dstate_T`` (as ``layer_backward`` takes it, or None) itself;
    neither may overlap ``ws``. ``model`` must be the one that ran the forward pass (checked: cheap)."""
    _check_owner(ws, model, "forward pass")
    method = _check_method(method, ws.B, model, ws.lengths if ws.has_lengths else None, ws.T)
    parallel = _threads(parallel, method)
    with _claim(ws):
        kind = ws.forward_kind
        _into_rows(ws, _top_grad_buffer(model, ws), dH)
        ws.forward_kind = None
        if ws.B == 0:
            _empty_backward(ws, return_dX)
        else:
            _layer_backward(model, ws, kind, ws._x, parallel, method, return_dX, None, dstate_T)
        ws.last_backward = "layer"
    return ws.grads, (ws.dX_buffer() if return_dX else None), _state_grad0(model, ws)
