"""The public API: validate and prepare, then call the compiled kernels.

Every argument is checked here, before any compiled code runs; the caller's
arrays are only read, never written. Results are views into a ``Workspace``:
pass one in and repeated calls allocate nothing, but each call overwrites what
the previous one returned (copy what you want to keep).

Inputs are either dense floats X of shape (T, B, D) or integer token ids of
shape (T, B), meaning one-hot vectors of size D = ``model.input_size``.
"""

import contextlib

import numba
import numpy as np

from . import threads as _threads_mod
from .kernels import backward as _bw
from .kernels import forward as _fw
from .kernels import losses as _losses
from .model import ACTIVATIONS, RNN
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
from .validation import check_loss as _check_loss
from .workspace import Workspace, model_signature

METHODS = ("auto", "fused", "blas")


def choose_method(B, H):
    """The recurrence that ``method="auto"`` runs for a batch of B sequences of hidden size H.

    ``"fused"`` runs the whole time loop in one compiled kernel (no call per step, each
    block of W_hh reused across the batch while in cache); ``"blas"`` runs one GEMM per
    step over the batch, which wins once a step's B·H·H product is big enough, or, for a
    single sequence, once W_hh outgrows the cache and BLAS's two threads pay off. The
    thresholds come from timing both on the development machine (2 cores, AVX-512). The
    choice depends on the shape only, never on ``parallel``.
    """
    if B * H >= 8192 or (H >= 128 and B * H >= 4096) or (H >= 512 and B <= 2):
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


def check_model(model, check_finite):
    """A fastbptt.RNN with a writable buffer (and, with ``check_finite``, finite parameters)."""
    if not isinstance(model, RNN):
        raise TypeError(f"model must be a fastbptt.RNN, got {type(model).__name__}")
    if not model.flat.flags.writeable:
        raise ValueError("model.flat is read-only (its flags.writeable was set to False); "
                         "set model.flat.flags.writeable = True")
    if check_finite and not _all_finite(model.flat):
        bad = [name for name, p in model.params.items() if not _all_finite(p)]
        raise ValueError(f"model parameters {bad} contain NaN or Inf "
                         f"(pass check_finite=False to let them propagate)")


_check_model = check_model     # the old name


def _check_method(method, B, H):
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return choose_method(B, H) if method == "auto" else method


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


def _check_workspace(workspace, model, T, B):
    if workspace is None:
        return Workspace(model, T, B)
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be a fastbptt.Workspace, got {type(workspace).__name__}")
    if workspace.signature != model_signature(model):
        raise ValueError(f"workspace was made for a model with (D, H, O, bias, dtype) = "
                         f"{workspace.signature}, but this model has {model_signature(model)}")
    if (workspace.T, workspace.B) != (T, B):
        raise ValueError(f"workspace was made for T={workspace.T}, B={workspace.B} but the inputs have "
                         f"T={T}, B={B}; make one with fastbptt.Workspace(model, T={T}, B={B})")
    return workspace


def _check_h0(h0, model, B, check_finite):
    if h0 is None:
        return None
    return _check_float(h0, "h0", model.dtype, (B, model.hidden_size), check_finite)


def _check_targets(Y, loss, model, T, B, check_finite):
    loss = _check_loss(loss)
    if loss == "cross_entropy":
        return _check_ids(Y, "Y", (T, B), model.output_size, "class labels")
    if loss == "mse":
        return _check_float(Y, "Y", model.dtype, (T, B, model.output_size), check_finite)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


# ----------------------------------------------------------------------------- passes


def _start(ws, h0):
    """hs[0] = h_0, the call's first write into the workspace, so h0 may be a view of it (h_T)."""
    if h0 is None:
        ws.hs[0] = 0
    else:
        ws.hs[0] = h0


def _forward(model, ws, kind, X, parallel, method):
    """Fill ws.hs[1:] with h_1 .. h_T and ws.out with o_1 .. o_T, from h_0 in ws.hs[0].

    X is validated and private (overlaps no buffer of ws); token ids are in ws.tokens.
    """
    p = model._kernel_views
    T, B = ws.T, ws.B
    H = model.hidden_size
    hs = ws.hs
    if kind == "tokens":
        _fw.gather_input(hs[1:], ws.tokens, p["W_hx"])
    else:
        dot(X.reshape(T * B, model.input_size), p["W_hx"].T, hs[1:].reshape(T * B, H))
    b_h = p["b_h"] if model.bias else ws.zero_h
    act = ACTIVATIONS[model.activation]
    ws.W_hhT[...] = p["W_hh"].T                                     # contiguous: faster GEMMs too
    if method == "fused":
        if parallel:
            with _launch(parallel):
                _fw.recurrence_parallel(hs, b_h, ws.W_hhT, ws.ones[:B], act, numba.get_num_threads())
        else:
            _fw.recurrence(hs, b_h, ws.W_hhT, ws.ones[:B], act)
    else:
        for t in range(T):   # transposed products (H x H times H x B) are faster in OpenBLAS
            dot(p["W_hh"], hs[t].T, ws.stepT)                         # (W_hh h_{t-1})ᵀ
            _fw.activate_step(hs[t + 1], ws.stepT.T, b_h, act)
    dot(hs[1:].reshape(T * B, H), p["W_qh"].T, ws.out)
    if model.bias:
        _fw.add_rows(ws.out, p["b_q"])


def _backward(model, ws, kind, X, parallel, method, want_dX, carry=None):
    """From ∂L/∂o in ws.out, fill ws.grads, ws.dh0 and (if wanted) ws.dX_buffer()."""
    p, g = model._kernel_views, ws.grads
    T, B = ws.T, ws.B
    D, H = model.input_size, model.hidden_size
    dO = ws.out
    hs = ws.hs
    dz = ws.dz.reshape(T * B, H)
    ones = ws.ones
    dot(dO.T, hs[1:].reshape(T * B, H), g["W_qh"])                  # Σ_t ∂L/∂o_t h_tᵀ
    if model.bias:
        dot(ones, dO, g["b_q"])                                      # Σ_t ∂L/∂o_t
    dot(dO, p["W_qh"], dz)                                           # W_qhᵀ ∂L/∂o_t, all t
    if carry is None:
        weights = ws.carry_full
    else:
        weights = ws.carry
        weights[...] = carry if carry.ndim == 2 else carry[:, None]
    ws.last_carry = weights
    act = ACTIVATIONS[model.activation]
    if method == "fused":
        if parallel:
            with _launch(parallel):
                _bw.reverse_sweep_parallel(ws.dz, ws.dh0, hs, weights, p["W_hh"], act,
                                           numba.get_num_threads())
        else:
            _bw.reverse_sweep(ws.dz, ws.dh0, hs, weights, p["W_hh"], act)
    else:
        ws.stepT[...] = 0                                            # nothing comes back into step T
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                dot(ws.W_hhT, ws.dz[t + 1].T, ws.stepT)               # (W_hhᵀ ∂L/∂z_{t+1})ᵀ
            c = weights[min(t + 1, T - 1)]                            # (times zero at t = T-1)
            _bw.reverse_step(ws.dz[t], ws.stepT.T, c, hs[t + 1], act)
        dot(ws.dz[0], p["W_hh"], ws.dh0)
        _bw.scale_rows(ws.dh0, weights[0])
    dot(dz.T, hs[:-1].reshape(T * B, H), g["W_hh"])                 # Σ_t ∂L/∂z_t h_{t-1}ᵀ
    if model.bias:
        dot(ones, dz, g["b_h"])                                      # Σ_t ∂L/∂z_t
    if kind == "tokens":
        g["W_hx"][...] = 0
        if parallel:
            with _launch(parallel):
                _bw.scatter_input_grad_parallel(g["W_hx"], ws.dz, ws.tokens)
        else:
            _bw.scatter_input_grad(g["W_hx"], ws.dz, ws.tokens)
    else:
        dot(dz.T, X.reshape(T * B, D), g["W_hx"])                    # Σ_t ∂L/∂z_t x_tᵀ
    if want_dX:
        # ∂L/∂x_t = W_hxᵀ ∂L/∂z_t (for token ids: with respect to the one-hot vectors)
        dot(dz, p["W_hx"], ws.dX_buffer().reshape(T * B, D))


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
        out += (ws.dh0,)
    if return_dX:
        out += (ws.dX_buffer(),)
    return out


# ----------------------------------------------------------------------------- public


def loss_and_grad(model, X, Y, h0=None, loss="cross_entropy", *, workspace=None, parallel=False,
                  return_dh0=False, return_dX=False, check_finite=True, carry=None, method="auto"):
    """Loss, gradients of every parameter, and the final hidden state, by BPTT.

    Parameters
    ----------
    model : fastbptt.RNN
    X : ndarray (T, B, D) of the model's dtype, or (T, B) integer token ids in [0, D)
        Non-contiguous arrays are accepted and copied.
    Y : ndarray (T, B) integer classes in [0, O) for ``"cross_entropy"``,
        or (T, B, O) of the model's dtype for ``"mse"``
    h0 : ndarray (B, H), optional
        Initial hidden state; zeros when None.
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
        weighs ∂L/∂h_0). None (all ones) is full BPTT; a 0 cuts the graph before that
        step; 0 or 1/π at random gives the randomized truncation of Tallec & Ollivier.
        Converted to the model's dtype.
    method : {"auto", "fused", "blas"}
        How the recurrence and the sweep run: ``"fused"``, one compiled loop over t per
        sequence; ``"blas"``, one GEMM per step over the batch. ``"auto"`` picks by
        shape (``fastbptt.api.choose_method``). All give the same result up to rounding.

    Returns
    -------
    loss : float
    grads : mapping of str to ndarray
        Keyed like ``model.params``; views into the workspace.
    h_T : ndarray (B, H)
        The last hidden state (a view into the workspace; pass it as the next
        chunk's ``h0`` to carry state without backpropagating across chunks).
    dh0 : ndarray (B, H), only if ``return_dh0``
    dX : ndarray (T, B, D), only if ``return_dX``
    """
    check_finite, parallel, return_dh0, return_dX = _check_flags(
        check_finite=check_finite, parallel=parallel, return_dh0=return_dh0, return_dX=return_dX)
    check_model(model, check_finite)
    kind, X, T, B = _check_inputs(model, X, check_finite)
    h0 = _check_h0(h0, model, B, check_finite)
    Y = _check_targets(Y, loss, model, T, B, check_finite)
    carry = _check_carry(carry, T, B, model.dtype)
    method = _check_method(method, B, model.hidden_size)
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
    return (value, ws.grads, ws.hs[T]) + _extras(ws, return_dh0, return_dX)


def forward(model, X, h0=None, *, workspace=None, parallel=False, check_finite=True, method="auto"):
    """Run the recurrence and the readout, keeping what ``backward`` needs in the workspace.

    Parameters are as in ``loss_and_grad``. The inputs are copied into the
    workspace, so the caller may reuse X before calling ``backward``.

    Returns
    -------
    O : ndarray (T, B, O)
        The outputs o_1 .. o_T (a view into the workspace, overwritten by ``backward``).
    h_T : ndarray (B, H)
    """
    check_finite, parallel = _check_flags(check_finite=check_finite, parallel=parallel)
    check_model(model, check_finite)
    kind, X, T, B = _check_inputs(model, X, check_finite)
    h0 = _check_h0(h0, model, B, check_finite)
    method = _check_method(method, B, model.hidden_size)
    ws = _check_workspace(workspace, model, T, B)
    parallel = _threads(parallel, method)
    with _claim(ws):
        X = _private(X, ws)
        _start(ws, h0)
        if kind == "tokens":
            np.copyto(ws.tokens, X, casting="unsafe")
        else:
            np.copyto(ws.x_buffer(), X)
            X = ws.x_buffer()
        _forward(model, ws, kind, X, parallel, method)
        ws.forward_kind = kind
    return ws.out.reshape(T, B, model.output_size), ws.hs[T]


def backward(model, dO, *, workspace, parallel=False, return_dh0=False, return_dX=False,
             check_finite=True, carry=None, method="auto"):
    """Gradients from a caller-supplied ∂L/∂o, after ``forward`` on the same workspace.

    Use it for any loss: compute ∂L/∂o from the outputs ``forward`` returned, then
    call this. The parameters must not change in between.

    Parameters
    ----------
    model : fastbptt.RNN
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
    dh0 : ndarray (B, H), only if ``return_dh0``
    dX : ndarray (T, B, D), only if ``return_dX``
    """
    check_finite, parallel, return_dh0, return_dX = _check_flags(
        check_finite=check_finite, parallel=parallel, return_dh0=return_dh0, return_dX=return_dX)
    check_model(model, check_finite)
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be the fastbptt.Workspace that forward() used, "
                        f"got {type(workspace).__name__}")
    ws = _check_workspace(workspace, model, workspace.T, workspace.B)
    if ws.forward_kind is None:
        raise ValueError("workspace holds no forward pass: call fastbptt.forward(model, X, "
                         "workspace=workspace) first (once per backward)")
    if ws.forward_kind == "tokens":     # the ids forward() kept: public, so checked again
        _check_ids(ws.tokens, "workspace.tokens", (ws.T, ws.B), model.input_size, "token ids")
    elif ws.forward_kind != "dense" or ws._x is None:
        raise ValueError(f"workspace.forward_kind is {ws.forward_kind!r} without the inputs of a "
                         f"forward pass: call fastbptt.forward(model, X, workspace=workspace) first")
    dO = _check_float(dO, "dO", model.dtype, (ws.T, ws.B, model.output_size), check_finite)
    carry = _check_carry(carry, ws.T, ws.B, model.dtype)
    method = _check_method(method, ws.B, model.hidden_size)
    parallel = _threads(parallel, method)
    with _claim(ws):
        carry = _private(carry, ws)
        kind = ws.forward_kind
        np.copyto(ws.out, dO.reshape(ws.T * ws.B, model.output_size))   # first: dO may overlap
        ws.forward_kind = None
        _backward(model, ws, kind, ws._x, parallel, method, return_dX, carry)
    extras = _extras(ws, return_dh0, return_dX)
    return (ws.grads,) + extras if extras else ws.grads
