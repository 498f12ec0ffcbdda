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
from .workspace import Workspace, model_signature

LOSSES = ("cross_entropy", "mse")
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


def _all_finite(a):
    """True when ``a`` holds no NaN or Inf (two reductions, no temporary arrays)."""
    return a.size == 0 or bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def _as_array(a, name):
    """``a`` as a plain ndarray. Masked arrays are refused: their hidden values would reach the kernels."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, and masks are not supported: pass "
                        f"{name}.filled(value) to choose what the masked entries hold (for padding, "
                        f"any valid id or 0.0, and carry=0 or a zero loss gradient where it must not count)")
    if type(a) is not np.ndarray:
        try:
            a = np.asarray(a)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be an array, got {type(a).__name__}: {exc}") from None
        if type(a) is not np.ndarray:  # subclasses (np.matrix, memmap) as plain arrays
            a = a.view(np.ndarray)
    return a


def _private(a, ws):
    """``a``, or a copy of it when it overlaps a buffer of ``ws`` that the call writes before reading ``a``.

    Feeding a workspace's outputs back in (a rollout, outputs as targets) must give the
    same result as feeding a copy.
    """
    if a is not None and ws.overlaps(a):
        return a.copy()
    return a


def _check_float(a, name, dtype, shape, check_finite):
    """A float array of exactly ``dtype`` and ``shape``, C-contiguous (copied if it was not)."""
    a = _as_array(a, name)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must hold floats of dtype {dtype}, got dtype {a.dtype}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but the model is {dtype}; "
                        f"convert it with .astype(np.{dtype.name}) (nothing is cast silently)")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if check_finite and not _all_finite(a):
        raise ValueError(f"{name} contains NaN or Inf (pass check_finite=False to let them propagate)")
    return np.ascontiguousarray(a)


def _check_ids(a, name, shape, upper, what):
    """An integer array of ``shape`` whose every value lies in [0, upper)."""
    a = _as_array(a, name)
    if a.dtype.kind == "f":
        raise TypeError(f"{name} must hold integer {what}, got floats (dtype {a.dtype}); "
                        f"convert with .astype(np.int64) if they are whole numbers")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer {what}, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere(a == bad)[0])
        raise ValueError(f"{name} must hold {what} in [0, {upper}), got {bad} at index {where}")
    return a


def _check_model(model, check_finite):
    if not isinstance(model, RNN):
        raise TypeError(f"model must be a fastbptt.RNN, got {type(model).__name__}")
    if not model.flat.flags.writeable:
        raise ValueError("model.flat is read-only (its flags.writeable was set to False); "
                         "set model.flat.flags.writeable = True")
    if check_finite and not _all_finite(model.flat):
        bad = [name for name, p in model.params.items() if not _all_finite(p)]
        raise ValueError(f"model parameters {bad} contain NaN or Inf "
                         f"(pass check_finite=False to let them propagate)")


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


def _check_flags(**flags):
    """The values of ``flags`` as bools, in order; a TypeError names any that is not one."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    return tuple(bool(value) for value in flags.values())


def _check_inputs(model, X, check_finite):
    """Return (kind, X, T, B): kind "dense" with X (T, B, D) floats, or "tokens" with X (T, B) ints."""
    X = _as_array(X, "X")
    D = model.input_size
    if X.ndim == 2 and X.dtype.kind in "iu":
        kind = "tokens"
    elif X.ndim == 3:
        kind = "dense"
    elif X.ndim == 2:
        raise TypeError(f"X of rank 2 must hold integer token ids of shape (T, B), got dtype {X.dtype}; "
                        f"dense inputs have shape (T, B, D={D})")
    else:
        raise ValueError(f"X must have shape (T, B, D={D}) with floats or (T, B) with token ids, "
                         f"got shape {X.shape}")
    T, B = X.shape[:2]
    if T == 0 or B == 0:
        raise ValueError(f"X must have T >= 1 time steps and B >= 1 sequences, got shape {X.shape}")
    if kind == "tokens":
        X = _check_ids(X, "X", (T, B), D, "token ids")
    else:
        X = _check_float(X, "X", model.dtype, (T, B, D), check_finite)
    return kind, X, T, B


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


def _check_loss(loss):
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def _check_targets(Y, loss, model, T, B, check_finite):
    loss = _check_loss(loss)
    if loss == "cross_entropy":
        return _check_ids(Y, "Y", (T, B), model.output_size, "class labels")
    if loss == "mse":
        return _check_float(Y, "Y", model.dtype, (T, B, model.output_size), check_finite)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _check_carry(carry, T, B, dtype):
    """Carry weights of shape (T,) or (T, B), floats finite in ``dtype``; None means full BPTT."""
    if carry is None:
        return None
    carry = _as_array(carry, "carry")
    if carry.dtype.kind != "f":
        raise TypeError(f"carry must hold floats, got dtype {carry.dtype}")
    if carry.shape not in ((T,), (T, B)):
        raise ValueError(f"carry must have shape ({T},) or ({T}, {B}), got {carry.shape}")
    if not _all_finite(carry):
        raise ValueError("carry contains NaN or Inf")
    biggest = max(-float(carry.min()), float(carry.max())) if carry.size else 0.0
    if biggest > float(np.finfo(dtype).max):
        raise ValueError(f"carry holds {biggest:.3g}, which the model's {dtype.name} cannot represent "
                         f"(largest {np.finfo(dtype).max:.3g})")
    return carry


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
    _check_model(model, check_finite)
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
    _check_model(model, check_finite)
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
    _check_model(model, check_finite)
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
