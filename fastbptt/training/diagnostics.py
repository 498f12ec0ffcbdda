"""Gradient flow through time: ‖∂L/∂h_t‖ (and the LSTM's ‖∂L/∂c_t‖) for every step, and ρ(W_hh).

The lesson of the BPTT chapter of Dive into Deep Learning: unrolled, ::

    ∂L/∂h_t = Σ_{i=t}^{T} (W_hhᵀ)^{i-t} W_qhᵀ ∂L/∂o_i        (identity φ, no truncation)

so the gradient reaching early steps shrinks like ρ^{T-t} when the spectral radius
ρ of W_hh is below 1 (vanishing) and grows like it above 1 (exploding); with tanh
the factors φ'(z) ≤ 1 shrink it further.

The gated cells (GRU, LSTM) are what the book turns to next because their state
carries the gradient back through a gate (the GRU's z ⊙ ∂L/∂h_t, the LSTM's
f ⊙ ∂L/∂c_t) and not only through W_hh. For the LSTM, ``cell_grad_norms`` shows it:
‖∂L/∂c_t‖ stays up where ‖∂L/∂h_t‖ of an Elman cell vanishes.

Where the numbers come from, after ``loss_and_grad`` (or ``backward``):

- Elman cell: the workspace holds ∂L/∂o_t (``ws.out``) and every layer's ∂L/∂z_t
  (``ws.layer(k, d).dz``); ``hidden_grads`` rebuilds from them, with matrix products,
  ∂L/∂h_t = c_{t+1} W_hhᵀ ∂L/∂z_{t+1} + ∂L/∂(the layer's output at t), the latter
  W_qhᵀ ∂L/∂o_t on the top layer and, below it, the dropout mask times
  Σ_directions W_ihᵀ ∂L/∂z_t of the layer above (c the carry weights, all ones for full
  BPTT).
- GRU, LSTM: the reverse sweep keeps the full ∂L/∂h_t (``ws.layer(k, d).dh``) and, for
  the LSTM, ∂L/∂c_t (``dcs``), computed with the carry weights of that call; they are
  copied.

Stacked and bidirectional models: every function takes ``layer=`` (default: the top
layer, the one under the readout) and ``direction=`` (0, or 1 for the reverse
direction). Results are always in time order (row t-1 is step t of the sequence, for
the reverse direction too, which runs from each sequence's last step to its first) and
in the caller's batch order (the workspace sorts sequences by length inside); positions
past a sequence's length (``lengths=``) are zero.

Each function allocates its result: call it on request, not in the inner loop.
"""

from __future__ import annotations

import numpy as np

from ..core import api, validation
from ..core.model import RNN, RNNBase
from ..core.workspace import Workspace, model_signature


def _check(model, workspace):
    if not isinstance(model, RNNBase):
        raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be the fastbptt.Workspace of the last loss_and_grad, "
                        f"got {type(workspace).__name__}")
    if workspace.signature != model_signature(model):
        raise ValueError("workspace was made for a different model")
    validation.check_owner(workspace, model, "last call")
    if workspace.forward_kind is not None:
        raise ValueError("workspace holds a forward pass, not gradients: call loss_and_grad or "
                         "backward first")


def _as_tb(carry, T, B):
    """Carry weights (T,) or (T, B) as a (T, B) view."""
    return carry if carry.ndim == 2 else np.broadcast_to(carry[:, None], (T, B))


def _layer(model, layer, direction):
    """(k, d): the layer (None: the top one; negative counts from the top) and direction, checked."""
    if layer is None:
        layer = model.num_layers - 1
    model.layer_names(layer, direction)       # a ValueError that names a bad layer or direction
    return int(layer) % model.num_layers, int(direction)


def _rows(workspace):
    """(order, lengths): row i of the workspace's buffers is the caller's sequence order[i], of
    lengths[i] steps (every sequence in its own row, of T steps, after a call without lengths)."""
    T, B = workspace.T, workspace.B
    if workspace.has_lengths:
        return workspace.row_order.copy(), workspace.lengths.astype(np.intp)
    return np.arange(B), np.full(B, T, dtype=np.intp)


def _valid(T, lengths):
    """(T, B): whether step t of each row is within its sequence."""
    return np.arange(T)[:, None] < lengths[None, :]


def _in_time(a, lengths, direction):
    """A direction's (T, B, H) buffer (rows as the workspace's, steps in the direction's order)
    in time order, zero past each row's length: the reverse direction's step s of a sequence of
    n steps is time n-1-s."""
    out = np.zeros_like(a)
    if direction == 0:
        valid = _valid(a.shape[0], lengths)
        out[valid] = a[valid]
    else:
        for i, n in enumerate(lengths):
            out[:n, i] = a[n - 1::-1, i]
    return out


def _caller_order(a, order):
    """(T, B, ...) rows in the workspace's order put in the caller's: column order[i] is row i."""
    out = np.empty_like(a)
    out[:, order] = a
    return out


def _check_recorded_carry(model, workspace, carry):
    """For the gated cells, whose ∂L/∂h_t the sweep computed with the call's own carry weights:
    refuse other weights than those (a ValueError), rather than mix two truncations."""
    T, B = workspace.T, workspace.B
    carry = validation.check_carry(carry, T, B, model.dtype)
    if carry is None:
        return
    used = workspace.last_carry                         # in the workspace's row order
    order, _ = _rows(workspace)
    if not np.array_equal(_as_tb(carry.astype(model.dtype), T, B)[:, order], used):
        raise ValueError(f"carry differs from the carry weights the last call used: a {model.cell.upper()}'s "
                         f"∂L/∂h_t is computed by the reverse sweep itself, with that call's weights "
                         f"(workspace.last_carry); pass carry=None, or call loss_and_grad again "
                         f"with the weights you want")


def hidden_grads(model, workspace, carry=None, *, layer=None, direction=0):
    """∂L/∂h_t for t = 1 .. T, from the gradients the last ``loss_and_grad`` left in ``workspace``.

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
        With the parameters of that call (call this before the optimizer step).
    workspace : fastbptt.Workspace
        The one that call used (``loss_and_grad`` or ``backward``; for a GRU or an LSTM
        also ``layer_backward``).
    carry : ndarray (T,) or (T, B), optional
        The carry weights of that call; None takes the ones the workspace recorded
        (``workspace.last_carry``), so it need not be passed again. Elman cell: the
        weights the rebuild uses. GRU, LSTM: the sweep already used the call's own
        weights, so any other weights are refused with a ``ValueError``.
    layer : int, optional
        Which layer of a stack (0 the bottom one); None: the top one. Negative counts
        from the top (-1 the top).
    direction : {0, 1}
        1: the reverse direction of a bidirectional layer.

    Returns
    -------
    ndarray (T, B, H)
        A new array of the model's dtype; row t-1 is ∂L/∂h_t, the total derivative (what
        h_t sends up and what it sends to the next step of its direction), in time order
        and in the caller's batch order, zero past each sequence's length. (∂L/∂h_0 of
        every layer: ``loss_and_grad(..., return_dh0=True)``.)
    """
    _check(model, workspace)
    k, d = _layer(model, layer, direction)
    order, lengths = _rows(workspace)
    if model.cell != "rnn":
        _check_recorded_carry(model, workspace, carry)
        return _caller_order(_in_time(workspace.layer(k, d).dh, lengths, d), order)
    if workspace.last_backward != "readout":
        raise ValueError("an Elman RNN's ∂L/∂h_t is rebuilt from the ∂L/∂o that loss_and_grad or backward "
                         "left in the workspace, and its last call was "
                         + ("layer_backward, whose ∂L/∂H it does not keep" if workspace.last_backward
                            else "no backward pass") + ": call loss_and_grad or backward first")
    T, B = workspace.T, workspace.B
    carry = validation.check_carry(carry, T, B, model.dtype)
    if carry is None:
        carry = workspace.last_carry                                   # in row order
    else:
        carry = _as_tb(carry, T, B)[:, order]
    dh = _output_grad(model, workspace, k, order, lengths)[..., d * model.hidden_size:
                                                            (d + 1) * model.hidden_size]
    dz = _in_time(workspace.layer(k, d).dz, lengths, d)                 # ∂L/∂z_t
    W_hh = model.params[model.layer_names(k, d)["W_hh"]]
    if d == 0:                                                          # c_{t+1} W_hhᵀ ∂L/∂z_{t+1}
        dh[:-1] += (dz[1:] @ W_hh) * carry[1:, :, None].astype(dh.dtype, copy=False)
    else:                                       # the reverse direction's next step is time t-1
        dh[1:] += dz[:-1] @ W_hh
    dh *= _valid(T, lengths)[:, :, None]
    return _caller_order(dh, order)


def _output_grad(model, workspace, k, order, lengths):
    """∂L/∂(layer k's output) (T, B, dirs·H) of an Elman stack, rows in the workspace's order, time
    order: W_qhᵀ ∂L/∂o_t on the top; below, the mask times Σ_d W_ihᵀ ∂L/∂z_t of the layer above."""
    T, B = workspace.T, workspace.B
    p = model.params
    dy = workspace.out.reshape(T, B, -1) @ p["W_qh"]
    dy *= _valid(T, lengths)[:, :, None]
    masks = workspace.dropout_masks() if k < model.num_layers - 1 else []
    for j in range(model.num_layers - 1, k, -1):
        dy = sum(_in_time(workspace.layer(j, e).dz, lengths, e) @ p[model.layer_names(j, e)["W_ih"]]
                 for e in range(model.num_directions))
        dy *= masks[j - 1][:, order]                                   # dropout on layer j-1's output
    return dy


def _norms(g, per_sequence):
    """‖g_t‖ over (B, H) per step, or over H per step and sequence, in float64."""
    g = g.astype(np.float64)
    if per_sequence:
        return np.sqrt(np.einsum("tbh,tbh->tb", g, g))
    return np.sqrt(np.einsum("tbh,tbh->t", g, g))


def hidden_grad_norms(model, workspace, carry=None, per_sequence=False, *, layer=None, direction=0):
    """‖∂L/∂h_t‖ for t = 1 .. T (see ``hidden_grads``), in float64.

    Parameters
    ----------
    per_sequence : bool
        False: one norm per step over the whole batch, shape (T,). True: one per step
        and sequence, shape (T, B) (zero past a sequence's length).
    layer, direction
        As for ``hidden_grads`` (default: the top layer, forward direction).

    Returns
    -------
    ndarray (T,) or (T, B)
    """
    return _norms(hidden_grads(model, workspace, carry, layer=layer, direction=direction), per_sequence)


def cell_grads(model, workspace, *, layer=None, direction=0):
    """The LSTM's ∂L/∂c_t for t = 1 .. T, from the last ``loss_and_grad`` (or ``backward``,
    ``layer_backward``) on ``workspace``.

    The cell state sends its gradient back through the forget gate alone,
    ∂L/∂c_{t-1} ⊇ f_t ⊙ ∂L/∂c_t, not through W_hh: which is why it does not vanish as an
    Elman cell's ∂L/∂h_t does. Computed by the reverse sweep with that call's carry
    weights, and copied here.

    Parameters
    ----------
    model : fastbptt.LSTM
    workspace : fastbptt.Workspace
    layer, direction
        As for ``hidden_grads`` (default: the top layer, forward direction).

    Returns
    -------
    ndarray (T, B, H)
        A new array of the model's dtype; row t-1 is ∂L/∂c_t, in time order and the
        caller's batch order, zero past each sequence's length. (∂L/∂c_0:
        ``loss_and_grad(..., return_dh0=True)``.)
    """
    _check(model, workspace)
    if model.cell != "lstm":
        raise ValueError(f"cell_grads needs an LSTM: a {type(model).__name__}'s state is h alone, "
                         f"whose gradients hidden_grads gives")
    k, d = _layer(model, layer, direction)
    order, lengths = _rows(workspace)
    return _caller_order(_in_time(workspace.layer(k, d).dcs, lengths, d), order)


def cell_grad_norms(model, workspace, per_sequence=False, *, layer=None, direction=0):
    """‖∂L/∂c_t‖ for t = 1 .. T of an LSTM (see ``cell_grads``), in float64.

    Parameters
    ----------
    per_sequence : bool
        False: one norm per step over the whole batch, shape (T,). True: one per step
        and sequence, shape (T, B).
    layer, direction
        As for ``hidden_grads``.

    Returns
    -------
    ndarray (T,) or (T, B)
    """
    return _norms(cell_grads(model, workspace, layer=layer, direction=direction), per_sequence)


def hidden_states(model, workspace, *, layer=None, direction=0):
    """h_t for t = 1 .. T of one layer and direction, from the last call on ``workspace``
    (``forward``, ``loss_and_grad``, ``layer_forward``, ...).

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    workspace : fastbptt.Workspace
    layer, direction
        As for ``hidden_grads`` (default: the top layer, forward direction).

    Returns
    -------
    ndarray (T, B, H)
        A new array; row t-1 is h_t (before dropout), in time order and the caller's batch
        order, zero past each sequence's length.
    """
    if not isinstance(model, RNNBase):
        raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be the fastbptt.Workspace of the model's last call, "
                        f"got {type(workspace).__name__}")
    if workspace.signature != model_signature(model):
        raise ValueError("workspace was made for a different model")
    validation.check_owner(workspace, model, "last call")
    k, d = _layer(model, layer, direction)
    order, lengths = _rows(workspace)
    return _caller_order(_in_time(workspace.layer(k, d).hs[1:], lengths, d), order)


def gradient_flow(model, X, Y, h0=None, loss="cross_entropy", *, workspace=None, carry=None,
                  per_sequence=False, lengths=None, layer=None, direction=0):
    """Run ``loss_and_grad`` and return ``(loss, ‖∂L/∂h_t‖ for t = 1 .. T)``.

    Arguments as in ``fastbptt.loss_and_grad`` and ``hidden_grad_norms`` (``layer``:
    default the top one). The gradients stay in the workspace (or a new one), as after
    ``loss_and_grad``.
    """
    if workspace is None:
        api.check_model(model, False)
        _, _, T, B, _ = validation.check_inputs(model, X, False)
        workspace = Workspace(model, T, B)
    _layer(model, layer, direction)                     # before the work
    value = api.loss_and_grad(model, X, Y, h0, loss, workspace=workspace, carry=carry, lengths=lengths)[0]
    return value, hidden_grad_norms(model, workspace, carry, per_sequence, layer=layer, direction=direction)


def spectral_radius(W_hh, *, layer=None, direction=0):
    """ρ(W_hh) = max |λ| over the eigenvalues of W_hh (of an Elman model, or a square matrix).

    A GRU's or LSTM's W_hh (G·H, H) stacks one block per gate: pass one of them,
    such as ``model.gate("W_hh", "f")``. For a stacked or bidirectional Elman model,
    ``layer`` (default the top one) and ``direction`` pick the W_hh.

    Returns
    -------
    float
    """
    if isinstance(W_hh, RNNBase) and not isinstance(W_hh, RNN):
        raise ValueError(f"a {type(W_hh).__name__}'s W_hh stacks one (H, H) block per gate "
                         f"{W_hh.GATES}: pass one of them, such as model.gate('W_hh', "
                         f"{W_hh.GATES[1]!r})")
    if isinstance(W_hh, RNN):
        k, d = _layer(W_hh, layer, direction)
        W_hh = W_hh.params[W_hh.layer_names(k, d)["W_hh"]]
    elif layer is not None or direction != 0:
        raise ValueError("layer and direction pick the W_hh of a fastbptt.RNN model; a matrix is its own")
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
        Drawn into; when None, a new figure's, with constrained layout so that the axis
        labels and tick labels fit inside it (shown or saved).
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
        # the default margins clip the y-label left of wide tick labels (10^-3 with minor
        # ticks, 0.0001): the constrained layout makes room at each draw
        _, ax = plt.subplots(layout="constrained")
    t = np.arange(1, norms.shape[0] + 1)
    ax.plot(t, norms, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("time step t")
    ax.set_ylabel("‖∂L/∂h_t‖")
    if label is not None:
        ax.legend()
    return ax
