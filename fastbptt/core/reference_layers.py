"""Plain NumPy stacks, directions and lengths: the oracle of the layered models.

Every sequence b is run ALONE, on its own valid steps ``X[:lengths[b], b]``, through
the single-step references (``fastbptt.reference``'s φ for the Elman cell,
``fastbptt.reference_cells``' ``gru_step``/``lstm_step`` and their ``*_step_back``)::

    layer 0's input is x;  layer k's input is layer k-1's output (times its dropout mask)
    forward direction:  h_t = cell(in_t, h_{t-1}),  t = 0 .. n-1,  from state0[k·dirs]
    reverse direction:  h_t = cell(in_t, h_{t+1}),  t = n-1 .. 0,  from state0[k·dirs + 1]
    layer output at t:  [h_t of the forward direction, h_t of the reverse one]  (dirs·H wide)
    o_t = W_qh out_t + b_q          L = Σ_b Σ_{t<n_b} w_tb ℓ(o_tb, y_tb) / Σ_b Σ_{t<n_b} w_tb

with n = lengths[b], w = loss_weights (ones when None), ℓ the cross-entropy or, for
``"mse"``, the squared error averaged over the O outputs. The returned state of a
direction is the one after its last step (the reverse direction's is after time 0),
as PyTorch's packed sequences give it. Padding (t >= n) is never read: padding ids may
be out of range and padding inputs NaN. Parameters carry the models' names: plain
(``W_ih``, ``W_hh``, ...; the Elman cell's ``W_hx``, ``W_hh``, ``b_h``) for one layer
and one direction, else PyTorch's suffixes (``W_hh_l1_reverse``); ``W_qh`` is
(O, dirs·H). Nothing is validated: call it with good input.
"""

import numpy as np

from .reference import PHI, loss_and_output_grad
from .reference_cells import gru_step, gru_step_back, lstm_step, lstm_step_back

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


# ---------------------------------------------------------------- names and states

def local_names(cell):
    """The recurrent parameters of one layer and direction, in PyTorch's order, without suffix."""
    return ["W_hx", "W_hh", "b_h"] if cell == "rnn" else ["W_ih", "W_hh", "b_ih", "b_hh"]


def suffix(k, d, num_layers, dirs):
    """"" for a one-layer, one-direction model; else "_l{k}" and "_reverse" for d = 1."""
    if num_layers == 1 and dirs == 1:
        return ""
    return f"_l{k}" + ("_reverse" if d else "")


def _layer_params(params, cell, k, d, num_layers, dirs):
    """Layer k, direction d's weights under their local names; a missing bias is zeros."""
    s = suffix(k, d, num_layers, dirs)
    G_H = params[f"W_hh{s}"].shape[0]
    return {n: params[n + s] if n + s in params else np.zeros(G_H, params[f"W_hh{s}"].dtype)
            for n in local_names(cell)}


def _states(state, cell, num_layers, dirs, B, H, dtype):
    """Any state as a tuple of (L·dirs, B, H) arrays (h,) or (h, c); zeros when None."""
    n = 2 if cell == "lstm" else 1
    if state is None:
        return tuple(np.zeros((num_layers * dirs, B, H), dtype) for _ in range(n))
    parts = tuple(state) if cell == "lstm" else (state,)
    return tuple(np.asarray(p).reshape(num_layers * dirs, B, H) for p in parts)


def _public(parts, cell, num_layers, dirs):
    """(L·dirs, B, H) arrays back in the models' format: (B, H) for one layer and direction."""
    if num_layers == 1 and dirs == 1:
        parts = tuple(p[0] for p in parts)
    return parts if cell == "lstm" else parts[0]


# ---------------------------------------------------------------- one step of each cell

def _elman_step(activation):
    phi, dphi = PHI[activation]

    def step(x, state, p):
        (h,) = state
        z = x @ p["W_hx"].T + h @ p["W_hh"].T + p["b_h"]
        return (phi(z),), (x, h, z)

    def step_back(dstate, cache, p, g):
        x, h, z = cache
        dz = dphi(z) * dstate[0]
        g["W_hx"] += dz.T @ x
        g["W_hh"] += dz.T @ h
        g["b_h"] += dz.sum(axis=0)
        return (dz @ p["W_hh"],), dz @ p["W_hx"]
    return step, step_back


def _gru_step(x, state, p):
    h, cache = gru_step(x, state[0], p)
    return (h,), cache


def _gru_step_back(dstate, cache, p, g):
    dh, dx = gru_step_back(dstate[0], cache, p, g)
    return (dh,), dx


def _lstm_step_back(dstate, cache, p, g):
    dh, dc, dx = lstm_step_back(dstate[0], dstate[1], cache, p, g)
    return (dh, dc), dx


def steps(cell, activation="tanh"):
    """(step, step_back) on tuple states: step(x, state, p) -> (state', cache);
    step_back(∂L/∂state', cache, p, grads) -> (∂L/∂state, ∂L/∂x), adding into grads."""
    if cell == "rnn":
        return _elman_step(activation)
    if cell == "gru":
        return _gru_step, _gru_step_back
    if cell == "lstm":
        return lstm_step, _lstm_step_back
    raise ValueError(f"unknown cell {cell!r}")


# ---------------------------------------------------------------- the stack, one sequence at a time

def _dense(W_in, X, b, n):
    """Sequence b's n valid inputs as (n, 1, D) floats (token ids become one-hot rows of W_in's width)."""
    if X.ndim == 2:
        return np.eye(W_in.shape[1], dtype=W_in.dtype)[X[:n, b]][:, None, :]
    return X[:n, b:b + 1]


def layers_forward(params, X, state0=None, *, cell, num_layers=1, bidirectional=False, lengths=None,
                   masks=None, activation="tanh"):
    """Run the stack over every sequence alone.

    Parameters
    ----------
    params : dict of ndarray
        The model's parameters by name (the readout's are ignored here).
    X : ndarray (T, B, D) floats, or (T, B) integer token ids
    state0 : ndarray (L·dirs, B, H) or (B, H) for one layer and direction; the LSTM's a pair; zeros when None
    cell : {"rnn", "gru", "lstm"}
    lengths : ndarray (B,) of ints in [1, T], optional (all T)
    masks : list of L-1 ndarrays (T, B, dirs·H), optional
        Multipliers (already scaled) of each layer's output but the last's.

    Returns
    -------
    Htop : ndarray (T, B, dirs·H)
        The top layer's output, zero at padding.
    state_T : like state0
    tape : list, one entry per sequence, for ``layers_backward``
    """
    dirs = 2 if bidirectional else 1
    T, B = X.shape[:2]
    s0 = suffix(0, 0, num_layers, dirs)
    H = params[f"W_hh{s0}"].shape[1]
    dtype = params[f"W_hh{s0}"].dtype
    W_in = params[("W_hx" if cell == "rnn" else "W_ih") + s0]
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    step, _ = steps(cell, activation)
    start = _states(state0, cell, num_layers, dirs, B, H, dtype)
    final = tuple(np.zeros_like(s) for s in start)
    Htop = np.zeros((T, B, dirs * H), dtype)
    tape = []
    for b in range(B):
        n = int(lengths[b])
        inp = _dense(W_in, X, b, n)
        inputs, caches = [], {}
        for k in range(num_layers):
            out = np.zeros((n, 1, dirs * H), dtype)
            for d in range(dirs):
                p = _layer_params(params, cell, k, d, num_layers, dirs)
                state = tuple(s[k * dirs + d, b:b + 1] for s in start)
                caches[k, d] = [None] * n
                for t in (range(n) if d == 0 else reversed(range(n))):
                    state, caches[k, d][t] = step(inp[t], state, p)
                    out[t, :, d * H:(d + 1) * H] = state[0]
                for f, s in zip(final, state):
                    f[k * dirs + d, b] = s[0]
            inputs.append(inp)
            if masks is not None and k < num_layers - 1:
                out = out * masks[k][:n, b:b + 1]
            inp = out
        Htop[:n, b] = inp[:, 0]
        tape.append((n, inputs, caches))
    layout = (cell, num_layers, dirs, activation, H, T, B, X.shape, masks)
    return Htop, _public(final, cell, num_layers, dirs), (layout, tape)


def layers_backward(params, tape, dH, dstate_T=None, carry=None):
    """The reverse sweep of ``layers_forward``'s run, from ∂L/∂Htop.

    Parameters
    ----------
    tape : the third value ``layers_forward`` returned
    dH : ndarray (T, B, dirs·H)
        ∂L/∂(top layer's output); padding rows are ignored.
    dstate_T : like state_T, optional
        ∂L/∂(returned state) from outside (zeros when None).
    carry : ndarray (T,) or (T, B), optional (one direction only)
        Weighs what step t sends back to the state before it, in every layer (0-based t).

    Returns
    -------
    grads : dict of every recurrent parameter's gradient
    dX : ndarray (T, B, D), zero at padding (for token ids: w.r.t. the one-hot rows)
    dstate0 : like state0
    """
    (cell, num_layers, dirs, activation, H, T, B, xshape, masks), runs = tape
    _, step_back = steps(cell, activation)
    dtype = dH.dtype
    dfinal = _states(dstate_T, cell, num_layers, dirs, B, H, dtype)
    dstart = tuple(np.zeros_like(s) for s in dfinal)
    p = {(k, d): _layer_params(params, cell, k, d, num_layers, dirs)
         for k in range(num_layers) for d in range(dirs)}
    g = {kd: {n: np.zeros_like(v) for n, v in pk.items()} for kd, pk in p.items()}
    c = np.ones((T, B)) if carry is None else np.broadcast_to(
        carry if carry.ndim == 2 else carry[:, None], (T, B))
    D = p[0, 0]["W_hx" if cell == "rnn" else "W_ih"].shape[1]
    dX = np.zeros((T, B, D), dtype)
    for b, (n, inputs, caches) in enumerate(runs):
        dout = dH[:n, b:b + 1].astype(dtype)
        for k in reversed(range(num_layers)):
            if masks is not None and k < num_layers - 1:
                dout = dout * masks[k][:n, b:b + 1]
            din = np.zeros_like(inputs[k])
            for d in range(dirs):
                dstate = tuple(s[k * dirs + d, b:b + 1] for s in dfinal)
                for t in (reversed(range(n)) if d == 0 else range(n)):
                    dstate = (dstate[0] + dout[t, :, d * H:(d + 1) * H],) + dstate[1:]
                    dstate, dx = step_back(dstate, caches[k, d][t], p[k, d], g[k, d])
                    dstate = tuple(c[t, b] * s for s in dstate)
                    din[t] += dx
                for ds, s in zip(dstart, dstate):
                    ds[k * dirs + d, b] = s[0]
            dout = din
        dX[:n, b] = dout[:, 0]
    grads = {}
    for (k, d), gk in g.items():
        s = suffix(k, d, num_layers, dirs)
        grads.update({n + s: v for n, v in gk.items() if n + s in params})
    return grads, dX, _public(dstart, cell, num_layers, dirs)


# ---------------------------------------------------------------- readout and loss

def forward(params, X, state0=None, *, cell, num_layers=1, bidirectional=False, lengths=None,
            masks=None, activation="tanh"):
    """The outputs O (T, B, O) (zero at padding) and the returned state."""
    Htop, state_T, _ = layers_forward(params, X, state0, cell=cell, num_layers=num_layers,
                                      bidirectional=bidirectional, lengths=lengths, masks=masks,
                                      activation=activation)
    T, B = X.shape[:2]
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    valid = np.arange(T)[:, None] < lengths[None, :]
    O = (Htop @ params["W_qh"].T + params.get("b_q", 0)) * valid[:, :, None]
    return O, state_T


def loss_and_grad(params, X, Y, state0=None, *, cell, num_layers=1, bidirectional=False, lengths=None,
                  loss_weights=None, loss="cross_entropy", masks=None, activation="tanh", carry=None):
    """Loss, every gradient, the returned state, ∂L/∂state0 and ∂L/∂X of a stacked model with a readout.

    Parameters
    ----------
    params : dict of ndarray
        Keyed by the model's parameter names (see the module's docstring).
    X : ndarray (T, B, D) floats, or (T, B) integer token ids (one-hot rows)
    Y : ndarray (T, B) integer classes, or (T, B, O) floats for ``"mse"``
    state0 : ndarray (L·dirs, B, H) (the LSTM's a pair), or (B, H) for one layer and direction; zeros when None
    cell : {"rnn", "gru", "lstm"}
    num_layers, bidirectional : the stack's shape
    lengths : ndarray (B,) of ints in [1, T], optional
    loss_weights : ndarray (T, B) of floats >= 0, optional (ones)
    loss : {"cross_entropy", "mse"}
    masks : list of L-1 ndarrays (T, B, dirs·H), optional (dropout multipliers, already scaled)
    activation : the Elman cell's φ
    carry : ndarray (T,) or (T, B), optional (one direction only)

    Returns
    -------
    loss : float
    grads : dict, keyed like params
    state_T, dstate0 : like state0
    dX : ndarray (T, B, D), zero at padding
    """
    T, B = X.shape[:2]
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    w = np.ones((T, B)) if loss_weights is None else np.asarray(loss_weights, np.float64)
    Htop, state_T, tape = layers_forward(params, X, state0, cell=cell, num_layers=num_layers,
                                         bidirectional=bidirectional, lengths=lengths, masks=masks,
                                         activation=activation)
    W_qh, b_q = params["W_qh"], params.get("b_q", 0)
    total = sum(w[t, b] for b in range(B) for t in range(lengths[b]))
    L = 0.0
    dO = np.zeros((T, B, W_qh.shape[0]), Htop.dtype)
    for b in range(B):
        for t in range(lengths[b]):          # ℓ and ∂ℓ/∂o of one position alone
            o = Htop[t:t + 1, b:b + 1] @ W_qh.T + b_q
            l, do = loss_and_output_grad(o, Y[t:t + 1, b:b + 1], loss)
            L += w[t, b] * l / total
            dO[t, b] = w[t, b] * do[0, 0] / total
    grads, dX, dstate0 = layers_backward(params, tape, dO @ W_qh, carry=carry)
    grads["W_qh"] = np.einsum("tbo,tbh->oh", dO, Htop)
    if "b_q" in params:
        grads["b_q"] = dO.sum(axis=(0, 1))
    return L, grads, state_T, dstate0, dX
