"""Plain NumPy backpropagation through time: the oracle of every test, the baseline of every benchmark.

It reads like the equations, one time step at a time, for a batch of B sequences
(each h_t is a (B, H) array of row vectors, so ``W x`` is written ``x @ W.T``)::

    z_t = W_hx x_t + W_hh h_{t-1} + b_h          h_t = φ(z_t)
    o_t = W_qh h_t + b_q                         L   = mean over t and b of ℓ(o_t, y_t)

and backwards, from t = T down to 1::

    ∂L/∂h_t = W_hhᵀ ∂L/∂z_{t+1} + W_qhᵀ ∂L/∂o_t      ∂L/∂z_t = φ'(z_t) ⊙ ∂L/∂h_t
    ∂L/∂W_hx += ∂L/∂z_t x_tᵀ    ∂L/∂W_hh += ∂L/∂z_t h_{t-1}ᵀ    ∂L/∂b_h += ∂L/∂z_t
    ∂L/∂W_qh += ∂L/∂o_t h_tᵀ    ∂L/∂b_q  += ∂L/∂o_t

Token inputs (an integer array of shape (T, B)) are turned into one-hot rows here;
the fast kernels never do that. Nothing is validated: call it with good input.
"""

import numpy as np

PHI = {
    "identity": (lambda z: z, lambda z: np.ones_like(z)),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype)),
}


def _inputs(params, X):
    """X as dense (T, B, D) floats; token ids become one-hot rows."""
    W_hx = params["W_hx"]
    if X.ndim == 2:
        return np.eye(W_hx.shape[1], dtype=W_hx.dtype)[X]
    return X


def forward(params, X, h0, activation="tanh"):
    """Run the recurrence and the readout.

    Returns
    -------
    zs : list of T arrays (B, H)
        Pre-activations z_1 .. z_T.
    hs : list of T + 1 arrays (B, H)
        h_0 .. h_T.
    O : ndarray (T, B, O)
        Outputs o_1 .. o_T.
    """
    phi, _ = PHI[activation]
    W_hx, W_hh, W_qh = params["W_hx"], params["W_hh"], params["W_qh"]
    b_h = params.get("b_h", 0)
    b_q = params.get("b_q", 0)
    X = _inputs(params, X)
    zs, hs, os = [], [h0], []
    for t in range(len(X)):
        z = X[t] @ W_hx.T + hs[-1] @ W_hh.T + b_h
        h = phi(z)
        zs.append(z)
        hs.append(h)
        os.append(h @ W_qh.T + b_q)
    return zs, hs, np.stack(os)


def loss_and_output_grad(O, Y, loss="cross_entropy"):
    """The mean loss over all positions and ∂L/∂o.

    ``"cross_entropy"``: softmax cross-entropy, integer targets Y of shape (T, B),
    averaged over the T·B positions. ``"mse"``: squared error against Y of shape
    (T, B, O), averaged over all T·B·O elements.
    """
    if loss == "cross_entropy":
        T, B, n_out = O.shape
        N = T * B
        logits = O.reshape(N, n_out)
        y = Y.reshape(N)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        L = -log_softmax[np.arange(N), y].mean()
        dO = np.exp(log_softmax)
        dO[np.arange(N), y] -= 1.0
        return L, (dO / N).reshape(O.shape)
    if loss == "mse":
        diff = O - Y
        return np.mean(diff ** 2), 2.0 * diff / diff.size
    raise ValueError(f"unknown loss {loss!r}")


def backward(params, X, zs, hs, dO, activation="tanh", carry=None):
    """The reverse sweep: gradients of every parameter, of h_0 and of the inputs.

    ``carry`` (T,) or (T, B), optional, weighs the gradient that step t sends back
    to the state before it (0-based t): ones is full BPTT, 0 cuts the graph.

    Returns
    -------
    grads : dict of str to ndarray
        Keyed like ``params``.
    dh0 : ndarray (B, H)
        ∂L/∂h_0.
    dX : ndarray (T, B, D)
        ∂L/∂x_t (for token inputs: the gradient with respect to the one-hot rows).
    """
    _, dphi = PHI[activation]
    W_hx, W_hh, W_qh = params["W_hx"], params["W_hh"], params["W_qh"]
    X = _inputs(params, X)
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    dX = np.zeros_like(X)
    T = len(X)
    dtype = hs[0].dtype
    c = np.ones((T, 1, 1), dtype) if carry is None else np.asarray(carry, dtype).reshape(T, -1, 1)
    dz_next = np.zeros_like(hs[0])
    for t in reversed(range(T)):
        grads["W_qh"] += dO[t].T @ hs[t + 1]
        if "b_q" in grads:
            grads["b_q"] += dO[t].sum(axis=0)
        dh = dz_next @ W_hh + dO[t] @ W_qh          # W_hhᵀ ∂L/∂z_{t+1} + W_qhᵀ ∂L/∂o_t
        dz = dphi(zs[t]) * dh                        # ∂L/∂z_t
        grads["W_hx"] += dz.T @ X[t]
        grads["W_hh"] += dz.T @ hs[t]
        if "b_h" in grads:
            grads["b_h"] += dz.sum(axis=0)
        dX[t] = dz @ W_hx
        dz_next = c[t] * dz                          # what step t sends back to h_{t-1}
    dh0 = dz_next @ W_hh
    return grads, dh0, dX


def loss_and_grad(params, X, Y, h0=None, activation="tanh", loss="cross_entropy", carry=None):
    """Loss, parameter gradients, h_T, ∂L/∂h_0 and ∂L/∂X in one call.

    Parameters
    ----------
    params : dict
        ``W_hx`` (H, D), ``W_hh`` (H, H), ``W_qh`` (O, H) and optionally ``b_h`` (H,), ``b_q`` (O,).
    X : ndarray (T, B, D) floats, or (T, B) integer token ids
    Y : ndarray (T, B) integer classes, or (T, B, O) floats for ``"mse"``
    h0 : ndarray (B, H), optional (zeros)

    Returns
    -------
    loss, grads, h_T, dh0, dX
    """
    W_hh = params["W_hh"]
    if h0 is None:
        h0 = np.zeros((X.shape[1], W_hh.shape[0]), dtype=W_hh.dtype)
    zs, hs, O = forward(params, X, h0, activation)
    L, dO = loss_and_output_grad(O, Y, loss)
    grads, dh0, dX = backward(params, X, zs, hs, dO, activation, carry)
    return L, grads, hs[-1], dh0, dX
