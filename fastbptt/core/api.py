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
from .validation import LOSSES
from .validation import all_finite as _all_finite
from .validation import as_array as _as_array
from .validation import check_carry as _check_carry
from .validation import check_flags as _check_flags
from .validation import check_float as _check_float
from .validation import check_ids as _check_ids
from .validation import check_inputs as _check_inputs
from .validation import check_forward_workspace as _check_forward_workspace
from .validation import check_h0 as _check_h0
from .validation import check_loss as _check_loss
from .validation import check_model
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


def _check_method(method, B, model):
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return choose_method(B, model.hidden_size) if method == "auto" else method


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


def _start(ws, h0):
    """hs[0] = h_0 (and the LSTM's cs[0] = c_0): the call's first writes into the workspace, so the
    state may be a view of it (h_T, the pair (h_T, c_T)) without a copy.

    Every entry point calls it before any other write (the inputs kept by ``forward`` come
    after); only an LSTM h0 that overlaps cs[0], written just before it, is copied.
    """
    if ws.cell == "lstm":
        h0, c0 = (None, None) if h0 is None else h0
        if h0 is not None and np.may_share_memory(h0, ws.cs[0]):
            h0 = h0.copy()
        ws.cs[0] = 0 if c0 is None else c0
    ws.hs[0] = 0 if h0 is None else h0


def _state_T(ws):
    """The last state: h_T, or the LSTM's pair (h_T, c_T) (views into the workspace)."""
    T = ws.T
    return (ws.hs[T], ws.cs[T]) if ws.cell == "lstm" else ws.hs[T]


def _state_grad0(ws):
    """∂L/∂h_0, or the LSTM's pair (∂L/∂h_0, ∂L/∂c_0) (views into the workspace)."""
    return (ws.dh0, ws.dc0) if ws.cell == "lstm" else ws.dh0


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


def _layer_weights(model, ws):
    """(W_ih, b_ih, W_hh, b_hh) of the recurrent layer, zeros for the biases a model lacks."""
    p, names = model._kernel_views, model._CELL.NAMES
    W_ih, W_hh = p[names["W_ih"]], p[names["W_hh"]]
    b_ih = p[names["b_ih"]] if model.bias and names["b_ih"] else ws.zero_b
    b_hh = p[names["b_hh"]] if model.bias else ws.zero_b
    return W_ih, b_ih, W_hh, b_hh


def _cell_views(model, ws):
    """The cell's NamedTuple over the workspace, as the sweep kernels take it.

    Made once per (workspace, model, activation) and kept in the workspace: a call builds
    it three times otherwise, which shows in the smallest steps.
    """
    act, views = model._act_code, model._kernel_views
    kept = ws._cell_views
    if kept is not None and kept[0] is views and kept[1] == act:
        return kept[2]
    _, _, W_hh, b_hh = _layer_weights(model, ws)
    cell = model._CELL.kernel_views(ws, W_hh, ws.W_hhT, b_hh, act)
    ws._cell_views = (views, act, cell)
    return cell


def _layer_forward(model, ws, kind, X, parallel, method):
    """Fill ws.hs[1:] with h_1 .. h_T (and the cell's other activations), from the state in ws.hs[0].

    X is validated and private (overlaps no buffer of ws); token ids are in ws.tokens.
    """
    T, B = ws.T, ws.B
    W_ih, b_ih, W_hh, _ = _layer_weights(model, ws)
    cell = _cell_views(model, ws)
    gx = cell.gx                                                    # (T, B, G·H): the input projection
    GH = gx.shape[2]
    if kind == "tokens":
        _sweep.gather_input(gx, ws.tokens, W_ih, b_ih)
    else:
        dot(X.reshape(T * B, model.input_size), W_ih.T, gx.reshape(T * B, GH))
        if model.bias and model._CELL.NAMES["b_ih"]:
            _sweep.add_rows(gx.reshape(T * B, GH), b_ih)
    ws.W_hhT[...] = W_hh.T                                          # contiguous: faster GEMMs too
    if method == "fused":
        if parallel:
            with _launch(parallel):
                _compiled(ws, _sweep.recurrence_parallel, cell, ws.rec, ws.ones[:B], 1)(
                    cell, ws.rec, ws.ones[:B], numba.get_num_threads())
        else:
            _compiled(ws, _sweep.recurrence, cell, ws.rec, ws.ones[:B])(cell, ws.rec, ws.ones[:B])
    else:
        hs, rec = ws.hs, ws.recT.T
        row = ws.rec[0]                                               # the fused method's scratch
        step = _compiled(ws, _sweep.forward_step, cell, 0, rec, row)
        for t in range(T):   # transposed products (G·H x H times H x B) are faster in OpenBLAS
            dot(W_hh, hs[t].T, ws.recT)                               # (W_hh h_{t-1})ᵀ
            step(cell, t, rec, row)


def _forward(model, ws, kind, X, parallel, method):
    """The layer, then the readout: ws.out holds o_1 .. o_T."""
    _layer_forward(model, ws, kind, X, parallel, method)
    p = model._kernel_views
    T, B, H = ws.T, ws.B, model.hidden_size
    dot(ws.hs[1:].reshape(T * B, H), p["W_qh"].T, ws.out)
    if model.bias:
        _sweep.add_rows(ws.out, p["b_q"])


def _readout_backward(model, ws):
    """From ∂L/∂o in ws.out: the readout's gradients, and ∂L/∂h_t = W_qhᵀ ∂L/∂o_t into the cell's dh."""
    p, g = model._kernel_views, ws.grads
    T, B, H = ws.T, ws.B, model.hidden_size
    dO = ws.out
    dot(dO.T, ws.hs[1:].reshape(T * B, H), g["W_qh"])                # Σ_t ∂L/∂o_t h_tᵀ
    if model.bias:
        dot(ws.ones, dO, g["b_q"])                                    # Σ_t ∂L/∂o_t
    dot(dO, p["W_qh"], _cell_views(model, ws).dh.reshape(T * B, H))  # W_qhᵀ ∂L/∂o_t, all t


def _layer_backward(model, ws, kind, X, parallel, method, want_dX, carry=None, dstate_T=None):
    """From ∂L/∂h_t (from above) in the cell's dh: the layer's gradients in ws.grads, ∂L/∂(state_0)
    and (if wanted) ws.dX_buffer(). ``dstate_T`` is what arrives at the last state (None: nothing)."""
    g = ws.grads
    T, B = ws.T, ws.B
    D, H = model.input_size, model.hidden_size
    names = model._CELL.NAMES
    W_ih, _, W_hh, _ = _layer_weights(model, ws)
    cell = _cell_views(model, ws)
    if carry is None:
        weights = ws.carry_full
    else:
        weights = ws.carry
        weights[...] = carry if carry.ndim == 2 else carry[:, None]
    ws.last_carry = weights
    if ws.cell == "rnn":                    # the Elman cell sends nothing back but through W_hh
        if dstate_T is not None:
            cell.dh[T - 1] += dstate_T
    else:
        dh_T, dc_T = (dstate_T, None) if ws.cell == "gru" else (dstate_T or (None, None))
        if dh_T is not None:
            cell.dh[T - 1] += dh_T
        ws.ds[...] = 0 if dc_T is None else dc_T          # what arrives at the last state directly
    if method == "fused":
        if parallel:
            with _launch(parallel):
                _compiled(ws, _sweep.reverse_sweep_parallel, cell, weights, 1)(
                    cell, weights, numba.get_num_threads())
        else:
            _compiled(ws, _sweep.reverse_sweep, cell, weights)(cell, weights)
    else:
        drec, back = cell.drec, ws.backT.T
        step = _compiled(ws, _sweep.backward_step, cell, 0, back, ws.ones[:B], True)
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                dot(ws.W_hhT, drec[t + 1].T, ws.backT)                 # (W_hhᵀ drec_{t+1})ᵀ
                step(cell, t, back, weights[t + 1], True)
            else:
                step(cell, t, back, ws.ones[:B], False)
        dot(drec[0], W_hh, ws.dh0)
        _compiled(ws, _sweep.backward_state0, cell, weights[0])(cell, weights[0])
    GH = cell.drec.shape[2]
    drec = cell.drec.reshape(T * B, GH)
    dgx = cell.dgx.reshape(T * B, GH)
    dot(drec.T, ws.hs[:-1].reshape(T * B, H), g[names["W_hh"]])    # Σ_t ∂L/∂rec_t h_{t-1}ᵀ
    if model.bias:
        dot(ws.ones, drec, g[names["b_hh"]])                          # Σ_t ∂L/∂rec_t
        if names["b_ih"]:
            dot(ws.ones, dgx, g[names["b_ih"]])                       # Σ_t ∂L/∂(W_ih x_t + b_ih)
    dW_ih = g[names["W_ih"]]
    if kind == "tokens":
        dW_ih[...] = 0
        if parallel:
            with _launch(parallel):
                _sweep.scatter_input_grad_parallel(dW_ih, cell.dgx, ws.tokens)
        else:
            _sweep.scatter_input_grad(dW_ih, cell.dgx, ws.tokens)
    else:
        dot(dgx.T, X.reshape(T * B, D), dW_ih)                        # Σ_t ∂L/∂(W_ih x_t) x_tᵀ
    if want_dX:
        # ∂L/∂x_t = W_ihᵀ ∂L/∂(W_ih x_t) (for token ids: with respect to the one-hot vectors)
        dot(dgx, W_ih, ws.dX_buffer().reshape(T * B, D))


def _backward(model, ws, kind, X, parallel, method, want_dX, carry=None):
    """From ∂L/∂o in ws.out, fill ws.grads, ∂L/∂(state_0) and (if wanted) ws.dX_buffer()."""
    _readout_backward(model, ws)
    _layer_backward(model, ws, kind, X, parallel, method, want_dX, carry)
    ws.last_backward = "readout"                    # ws.out holds the ∂L/∂o it started from


def _loss(loss, ws, Y, parallel):
    """Overwrite the outputs in ws.out with ∂L/∂o and return the mean loss."""
    T, B = ws.T, ws.B
    if loss == "cross_entropy":
        np.copyto(ws.targets, Y.reshape(T * B), casting="unsafe")   # labels are in range: exact
        if parallel:
            with _launch(parallel):
                return _losses.cross_entropy_parallel(ws.out, ws.row_loss, ws.targets)
        return _losses.cross_entropy(ws.out, ws.row_loss, ws.targets)
    targets = Y.reshape(T * B, ws.out.shape[1])
    if parallel:
        with _launch(parallel):
            return _losses.mse_parallel(ws.out, ws.row_loss, targets)
    return _losses.mse(ws.out, ws.row_loss, targets)


def _extras(ws, return_dh0, return_dX):
    """The optional results, in the documented order."""
    out = ()
    if return_dh0:
        out += (_state_grad0(ws),)
    if return_dX:
        out += (ws.dX_buffer(),)
    return out


def _keep_inputs(ws, kind, X):
    """Copy the inputs into the workspace for the backward pass; return the dense X to use."""
    if kind == "tokens":
        np.copyto(ws.tokens, X, casting="unsafe")     # ids are in range: the cast is exact
        return X
    np.copyto(ws.x_buffer(), X)
    return ws.x_buffer()


def _forward_keeping_inputs(run, model, X, h0, workspace, parallel, check_finite, method):
    """``forward`` and ``layer_forward``: check everything, then ``run`` (``_forward`` or
    ``_layer_forward``) with the inputs kept in the workspace for the backward pass."""
    check_finite, parallel = _check_flags(check_finite=check_finite, parallel=parallel)
    check_model(model, check_finite)
    kind, X, T, B = _check_inputs(model, X, check_finite)
    h0 = _check_h0(h0, model, B, check_finite)
    method = _check_method(method, B, model)
    ws = _check_workspace(workspace, model, T, B)
    parallel = _threads(parallel, method)
    with _claim(ws):
        X = _private(X, ws)
        _start(ws, h0)                                    # first: h0 may be a view of the kept inputs
        X = _keep_inputs(ws, kind, X)
        run(model, ws, kind, X, parallel, method)
        ws.forward_kind = kind
    return ws


# ----------------------------------------------------------------------------- public


def loss_and_grad(model, X, Y, h0=None, loss="cross_entropy", *, workspace=None, parallel=False,
                  return_dh0=False, return_dX=False, check_finite=True, carry=None, method="auto"):
    """Loss, gradients of every parameter, and the final hidden state, by BPTT.

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    X : ndarray (T, B, D) of the model's dtype, or (T, B) integer token ids in [0, D)
        Non-contiguous arrays are accepted and copied.
    Y : ndarray (T, B) integer classes in [0, O) for ``"cross_entropy"``,
        or (T, B, O) of the model's dtype for ``"mse"``
    h0 : ndarray (B, H), or for the LSTM a pair (h0, c0) of them, optional
        Initial state; zeros when None.
    loss : {"cross_entropy", "mse"}
        Softmax cross-entropy averaged over the T·B positions (as
        ``torch.nn.functional.cross_entropy`` on the flattened logits), or
        squared error averaged over all T·B·O elements (as ``mse_loss``).
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
        Weights on the gradient each step sends back through time: the reverse sweep
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
        ``h0`` to carry state without backpropagating across chunks).
    dh0 : ndarray (B, H), only if ``return_dh0``
        ∂L/∂h_0; for the LSTM the pair (∂L/∂h_0, ∂L/∂c_0).
    dX : ndarray (T, B, D), only if ``return_dX``
    """
    check_finite, parallel, return_dh0, return_dX = _check_flags(
        check_finite=check_finite, parallel=parallel, return_dh0=return_dh0, return_dX=return_dX)
    check_model(model, check_finite)
    kind, X, T, B = _check_inputs(model, X, check_finite)
    h0 = _check_h0(h0, model, B, check_finite)
    Y = _check_targets(Y, loss, model, T, B, check_finite)
    carry = _check_carry(carry, T, B, model.dtype)
    method = _check_method(method, B, model)
    ws = _check_workspace(workspace, model, T, B)
    parallel = _threads(parallel, method)
    # -- everything is valid from here on
    with _claim(ws):
        X, Y, carry = _private(X, ws), _private(Y, ws), _private(carry, ws)
        _start(ws, h0)
        if kind == "tokens":
            np.copyto(ws.tokens, X, casting="unsafe")     # ids are in range: the cast is exact
        _forward(model, ws, kind, X, parallel, method)
        ws.forward_kind = None                            # ws.out is about to hold ∂L/∂o, not o
        value = _loss(loss, ws, Y, parallel)
        _backward(model, ws, kind, X, parallel, method, return_dX, carry)
    return (value, ws.grads, _state_T(ws)) + _extras(ws, return_dh0, return_dX)


def forward(model, X, h0=None, *, workspace=None, parallel=False, check_finite=True, method="auto"):
    """Run the recurrence and the readout, keeping what ``backward`` needs in the workspace.

    Parameters are as in ``loss_and_grad``. The inputs are copied into the
    workspace, so the caller may reuse X before calling ``backward``.

    Returns
    -------
    O : ndarray (T, B, O)
        The outputs o_1 .. o_T (a view into the workspace, overwritten by ``backward``).
    h_T : ndarray (B, H), or for the LSTM the pair (h_T, c_T)
    """
    ws = _forward_keeping_inputs(_forward, model, X, h0, workspace, parallel, check_finite, method)
    return ws.out.reshape(ws.T, ws.B, model.output_size), _state_T(ws)


def backward(model, dO, *, workspace, parallel=False, return_dh0=False, return_dX=False,
             check_finite=True, carry=None, method="auto"):
    """Gradients from a caller-supplied ∂L/∂o, after ``forward`` on the same workspace.

    Use it for any loss: compute ∂L/∂o from the outputs ``forward`` returned, then
    call this. The parameters must not change in between.

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
    dO = _check_float(dO, "dO", model.dtype, (ws.T, ws.B, model.output_size), check_finite)
    carry = _check_carry(carry, ws.T, ws.B, model.dtype)
    method = _check_method(method, ws.B, model)
    parallel = _threads(parallel, method)
    with _claim(ws):
        carry = _private(carry, ws)
        kind = ws.forward_kind
        np.copyto(ws.out, dO.reshape(ws.T * ws.B, model.output_size))   # first: dO may overlap
        ws.forward_kind = None
        _backward(model, ws, kind, ws._x, parallel, method, return_dX, carry)
    extras = _extras(ws, return_dh0, return_dX)
    return (ws.grads,) + extras if extras else ws.grads


def layer_forward(model, X, h0=None, *, workspace=None, parallel=False, check_finite=True,
                  method="auto"):
    """Run the recurrent layer alone (no readout), keeping what ``layer_backward`` needs.

    The entry point for stacks, bidirectional layers and bridges: the layer's outputs H
    go to whatever head the caller puts on top, whose ∂L/∂H comes back through
    ``layer_backward``. Arguments as in ``forward``; the inputs are copied into the
    workspace.

    Returns
    -------
    H : ndarray (T, B, H)
        h_1 .. h_T (a view into the workspace, valid until its next call).
    state_T : ndarray (B, H), or for the LSTM the pair (h_T, c_T)
    """
    ws = _forward_keeping_inputs(_layer_forward, model, X, h0, workspace, parallel, check_finite,
                                 method)
    return ws.hs[1:], _state_T(ws)


def layer_backward(model, dH, dstate_T=None, *, workspace, parallel=False, check_finite=True,
                   carry=None, method="auto", return_dX=True):
    """Gradients of the recurrent layer from ∂L/∂H, after ``layer_forward`` (or ``forward``).

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    dH : ndarray (T, B, H) of the model's dtype
        ∂L/∂h_t for t = 1 .. T from whatever uses the layer's outputs (not changed).
    dstate_T : ndarray (B, H), or for the LSTM a pair of them, optional
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
    dH = _check_float(dH, "dH", model.dtype, (T, B, model.hidden_size), check_finite)
    dstate_T = _check_state(dstate_T, "dstate_T", model, B, check_finite)
    carry = _check_carry(carry, T, B, model.dtype)
    method = _check_method(method, B, model)
    parallel = _threads(parallel, method)
    with _claim(ws):
        carry = _private(carry, ws)
        if dstate_T is not None:
            dstate_T = tuple(_private(a, ws) for a in dstate_T) if isinstance(dstate_T, tuple) \
                else _private(dstate_T, ws)
        kind = ws.forward_kind
        np.copyto(_cell_views(model, ws).dh, dH)      # first: dH may overlap the workspace
        ws.forward_kind = None
        for name in ("W_qh", "b_q"):
            if name in ws.grads:
                ws.grads[name][...] = 0
        _layer_backward(model, ws, kind, ws._x, parallel, method, return_dX, carry, dstate_T)
        ws.last_backward = "layer"
    return ws.grads, (ws.dX_buffer() if return_dX else None), _state_grad0(ws)
