"""Gradient flow through time: ‖∂L/∂h_t‖ for every step, and the spectral radius of W_hh.

The lesson of the BPTT chapter of Dive into Deep Learning: unrolled, ::

    ∂L/∂h_t = Σ_{i=t}^{T} (W_hhᵀ)^{i-t} W_qhᵀ ∂L/∂o_i        (identity φ, no truncation)

so the gradient reaching early steps shrinks like ρ^{T-t} when the spectral radius
ρ of W_hh is below 1 (vanishing) and grows like it above 1 (exploding); with tanh
the factors φ'(z) ≤ 1 shrink it further.

After ``loss_and_grad`` (or ``backward``) the workspace holds ∂L/∂o_t (``ws.out``) and
∂L/∂z_t (``ws.dz``); ``hidden_grads`` rebuilds from them, with two matrix products,

    ∂L/∂h_t = c_{t+1} W_hhᵀ ∂L/∂z_{t+1} + W_qhᵀ ∂L/∂o_t

(c the carry weights, all ones for full BPTT). It allocates its result: call it on
request, not in the inner loop.
"""

from __future__ import annotations

import numpy as np

from ..core import api, validation
from ..core.model import RNN
from ..core.workspace import Workspace, model_signature


def _check(model, workspace):
    if not isinstance(model, RNN):
        raise TypeError(f"model must be a fastbptt.RNN, got {type(model).__name__}")
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be the fastbptt.Workspace of the last loss_and_grad, "
                        f"got {type(workspace).__name__}")
    if workspace.signature != model_signature(model):
        raise ValueError("workspace was made for a different model")
    if workspace.forward_kind is not None:
        raise ValueError("workspace holds a forward pass, not gradients: call loss_and_grad or "
                         "backward first")


def hidden_grads(model, workspace, carry=None):
    """∂L/∂h_t for t = 1 .. T, from the gradients the last ``loss_and_grad`` left in ``workspace``.

    Parameters
    ----------
    model : fastbptt.RNN
        With the parameters of that call (call this before the optimizer step).
    workspace : fastbptt.Workspace
        The one that call used.
    carry : ndarray (T,) or (T, B), optional
        The carry weights of that call; None takes the ones the workspace recorded
        (``workspace.last_carry``), so it need not be passed again.

    Returns
    -------
    ndarray (T, B, H)
        A new array; row t-1 is ∂L/∂h_t. (∂L/∂h_0 is ``workspace.dh0``.)
    """
    _check(model, workspace)
    T, B, H = workspace.T, workspace.B, model.hidden_size
    carry = validation.check_carry(carry, T, B, model.dtype)
    if carry is None:
        carry = workspace.last_carry
    p = model.params
    dh = (workspace.out @ p["W_qh"]).reshape(T, B, H)                  # W_qhᵀ ∂L/∂o_t
    if T > 1:
        back = (workspace.dz[1:].reshape((T - 1) * B, H) @ p["W_hh"]).reshape(T - 1, B, H)
        if carry is not None:
            c = carry if carry.ndim == 2 else np.broadcast_to(carry[:, None], (T, B))
            back *= c[1:, :, None].astype(back.dtype, copy=False)
        dh[:-1] += back                                                 # c_{t+1} W_hhᵀ ∂L/∂z_{t+1}
    return dh


def hidden_grad_norms(model, workspace, carry=None, per_sequence=False):
    """‖∂L/∂h_t‖ for t = 1 .. T (see ``hidden_grads``), in float64.

    Parameters
    ----------
    per_sequence : bool
        False: one norm per step over the whole batch, shape (T,). True: one per step
        and sequence, shape (T, B).

    Returns
    -------
    ndarray (T,) or (T, B)
    """
    dh = hidden_grads(model, workspace, carry).astype(np.float64)
    if per_sequence:
        return np.sqrt(np.einsum("tbh,tbh->tb", dh, dh))
    return np.sqrt(np.einsum("tbh,tbh->t", dh, dh))


def gradient_flow(model, X, Y, h0=None, loss="cross_entropy", *, workspace=None, carry=None,
                  per_sequence=False):
    """Run ``loss_and_grad`` and return ``(loss, ‖∂L/∂h_t‖ for t = 1 .. T)``.

    Arguments as in ``fastbptt.loss_and_grad`` and ``hidden_grad_norms``. The gradients
    stay in the workspace (or a new one), as after ``loss_and_grad``.
    """
    if workspace is None:
        api.check_model(model, False)
        _, _, T, B = validation.check_inputs(model, X, False)
        workspace = Workspace(model, T, B)
    value = api.loss_and_grad(model, X, Y, h0, loss, workspace=workspace, carry=carry)[0]
    return value, hidden_grad_norms(model, workspace, carry, per_sequence)


def spectral_radius(W_hh):
    """ρ(W_hh) = max |λ| over the eigenvalues of W_hh (of a model, or a square matrix).

    Returns
    -------
    float
    """
    if isinstance(W_hh, RNN):
        W_hh = W_hh.params["W_hh"]
    W = np.asarray(W_hh)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.dtype.kind not in "fiu":
        raise ValueError(f"W_hh must be a square real matrix or a fastbptt.RNN, got shape {W.shape}")
    if W.size == 0:
        return 0.0
    return float(np.max(np.abs(np.linalg.eigvals(W.astype(np.float64)))))


def plot_grad_norms(norms, ax=None, log=True, label=None):
    """Draw ‖∂L/∂h_t‖ against t (needs matplotlib, an optional extra).

    Parameters
    ----------
    norms : array (T,) or (T, B)
        From ``hidden_grad_norms``; with (T, B), one line per sequence.
    ax : matplotlib Axes, optional
        Drawn into; a new figure's when None.
    log : bool
        Logarithmic y axis, where vanishing and exploding are straight lines.
    label : str, optional

    Returns
    -------
    matplotlib Axes
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_grad_norms needs matplotlib: pip install matplotlib") from None
    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim not in (1, 2) or norms.shape[0] == 0:
        raise ValueError(f"norms must have shape (T,) or (T, B) with T >= 1, got {norms.shape}")
    if ax is None:
        _, ax = plt.subplots()
    t = np.arange(1, norms.shape[0] + 1)
    ax.plot(t, norms, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("time step t")
    ax.set_ylabel("‖∂L/∂h_t‖")
    if label is not None:
        ax.legend()
    return ax
