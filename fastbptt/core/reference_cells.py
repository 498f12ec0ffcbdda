"""Plain NumPy GRU and LSTM, one step forward and one step back: the oracle for the gated cells.

Weights come in PyTorch's layout, gates stacked along the first axis, so
``params["W_ih"] = torch_gru.weight_ih_l0.numpy()`` copies them one to one::

    GRU   W_ih (3H, D)  W_hh (3H, H)  b_ih, b_hh (3H,)   gates r, z, n
    LSTM  W_ih (4H, D)  W_hh (4H, H)  b_ih, b_hh (4H,)   gates i, f, g, o
    both  W_qh (O, H)   b_q (O,)                          the readout o_t = W_qh h_t + b_q

GRU, as PyTorch and cuDNN compute it::

    r = σ(W_ir x + b_ir + W_hr h + b_hr)        z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))        h' = (1 − z) ⊙ n + z ⊙ h

Dive into Deep Learning applies r before the product, n = tanh(W_xh x + W_hh (r ⊙ h) + b);
PyTorch's form needs one product W_hh h per step for all three gates, and it is the form
users' weights come in. LSTM, gates in PyTorch's order::

    i, f, g, o = σ(a_i), σ(a_f), tanh(a_g), σ(a_o)   with a = W_ih x + b_ih + W_hh h + b_hh
    c' = f ⊙ c + i ⊙ g        h' = o ⊙ tanh(c')

Each ``*_step`` returns the new state and what its ``*_step_back`` needs; each
``*_step_back`` takes the gradient arriving at the new state, adds the step's share of
every weight gradient into ``grads`` and returns the gradients of the old state and of
x. ``loss_and_grad`` runs them over a sequence with the readout and the loss of
``fastbptt.reference``. Rows are sequences: x (B, D), h and c (B, H).
"""

import numpy as np

from .reference import loss_and_output_grad


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def gru_step(x, h, p):
    H = h.shape[1]
    gi = x @ p["W_ih"].T + p["b_ih"]                    # W_i{r,z,n} x + b_i{r,z,n}
    gh = h @ p["W_hh"].T + p["b_hh"]                    # W_h{r,z,n} h + b_h{r,z,n}
    r = sigmoid(gi[:, :H] + gh[:, :H])
    z = sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    n = np.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
    return (1 - z) * n + z * h, (x, h, r, z, n, gh[:, 2 * H:])


def gru_step_back(dh_new, cache, p, grads):
    x, h, r, z, n, hn = cache
    dn = dh_new * (1 - z) * (1 - n ** 2)                # through n = tanh(·)
    dr = dn * hn * r * (1 - r)                          # through r ⊙ (W_hn h + b_hn)
    dz = dh_new * (h - n) * z * (1 - z)
    dgi = np.concatenate([dr, dz, dn], axis=1)          # ∂L/∂(W_ih x + b_ih)
    dgh = np.concatenate([dr, dz, dn * r], axis=1)      # ∂L/∂(W_hh h + b_hh)
    grads["W_ih"] += dgi.T @ x
    grads["b_ih"] += dgi.sum(axis=0)
    grads["W_hh"] += dgh.T @ h
    grads["b_hh"] += dgh.sum(axis=0)
    return dh_new * z + dgh @ p["W_hh"], dgi @ p["W_ih"]


def lstm_step(x, state, p):
    h, c = state
    H = h.shape[1]
    a = x @ p["W_ih"].T + p["b_ih"] + h @ p["W_hh"].T + p["b_hh"]
    i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), sigmoid(a[:, 3 * H:])
    g = np.tanh(a[:, 2 * H:3 * H])
    c_new = f * c + i * g
    h_new = o * np.tanh(c_new)
    return (h_new, c_new), (x, h, c, i, f, g, o, np.tanh(c_new))


def lstm_step_back(dh_new, dc_new, cache, p, grads):
    x, h, c, i, f, g, o, tc = cache
    dc = dc_new + dh_new * o * (1 - tc ** 2)            # c' reaches the loss through h' too
    da = np.concatenate([dc * g * i * (1 - i), dc * c * f * (1 - f),
                         dc * i * (1 - g ** 2), dh_new * tc * o * (1 - o)], axis=1)
    grads["W_ih"] += da.T @ x
    grads["W_hh"] += da.T @ h
    grads["b_ih"] += da.sum(axis=0)
    grads["b_hh"] += da.sum(axis=0)
    return da @ p["W_hh"], dc * f, da @ p["W_ih"]       # ∂L/∂h, ∂L/∂c, ∂L/∂x


def loss_and_grad(params, X, Y, state0=None, cell="gru", loss="cross_entropy", carry=None):
    """Loss, parameter gradients, final state, ∂L/∂state_0 and ∂L/∂X of a GRU or LSTM with a readout.

    Parameters
    ----------
    params : dict of ndarray
        ``W_ih``, ``W_hh``, ``b_ih``, ``b_hh``, ``W_qh``, ``b_q`` in the layout above.
    X : ndarray (T, B, D) floats, or (T, B) integer token ids (one-hot rows of size D)
    Y : ndarray (T, B) integer classes, or (T, B, O) floats for ``"mse"``
    state0 : h0 (B, H) for the GRU, (h0, c0) for the LSTM; zeros when None
    cell : {"gru", "lstm"}
    carry : ndarray (T,) or (T, B), optional
        Weights on what step t sends back to the state before it (both h and c for the
        LSTM), as in ``fastbptt.reference.backward``; None is full BPTT.

    Returns
    -------
    loss, grads, state_T, dstate0, dX
        The states are h (GRU) or the pair (h, c) (LSTM).
    """
    W_ih, W_qh = params["W_ih"], params["W_qh"]
    T, B = X.shape[:2]
    H = params["W_hh"].shape[1]
    X = np.eye(W_ih.shape[1], dtype=W_ih.dtype)[X] if X.ndim == 2 else X
    zeros = np.zeros((B, H), dtype=W_ih.dtype)
    if cell == "gru":
        state = zeros if state0 is None else state0
    elif cell == "lstm":
        state = (zeros, zeros) if state0 is None else state0
    else:
        raise ValueError(f"unknown cell {cell!r}")
    step = gru_step if cell == "gru" else lstm_step
    caches, hs = [], []
    for t in range(T):
        state, cache = step(X[t], state, params)
        caches.append(cache)
        hs.append(state if cell == "gru" else state[0])
    hs = np.stack(hs)                                   # h_1 .. h_T
    O = hs @ W_qh.T + params["b_q"]
    L, dO = loss_and_output_grad(O, Y, loss)
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    grads["W_qh"] = np.einsum("tbo,tbh->oh", dO, hs)
    grads["b_q"] = dO.sum(axis=(0, 1))
    weights = np.ones((T, B)) if carry is None else np.broadcast_to(
        carry if carry.ndim == 2 else carry[:, None], (T, B))
    dX = np.zeros_like(X)
    dh, dc = zeros, zeros                               # what step t+1 sends back
    for t in range(T - 1, -1, -1):
        dh = dh + dO[t] @ W_qh                          # h_t also feeds o_t
        if cell == "gru":
            dh, dX[t] = gru_step_back(dh, caches[t], params, grads)
        else:
            dh, dc, dX[t] = lstm_step_back(dh, dc, caches[t], params, grads)
        w = weights[t][:, None]
        dh, dc = w * dh, w * dc
    dstate0 = dh if cell == "gru" else (dh, dc)
    return L, grads, state, dstate0, dX
