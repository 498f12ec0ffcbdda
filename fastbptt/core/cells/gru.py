"""The GRU cell, in the formulation of PyTorch and cuDNN (gates r, z, n; G = 3)::

    r = σ(W_ir x + b_ir + W_hr h + b_hr)        z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))        h' = (1 − z) ⊙ n + z ⊙ h

Dive into Deep Learning applies r before the product, n = tanh(W_xh x + W_hh (r ⊙ h) + b);
PyTorch's form needs one product W_hh h for all three gates per step, and it is the
form users' weights come in. Forward, ``gx[t]`` holds W_ih x_t + b_ih and is
overwritten by the gates (r, z, n) the backward step needs, with W_hn h + b_hn kept
in ``hn``. Backwards, with g = ∂L/∂h'::

    dn = g (1 − z)(1 − n²)     dr = dn ⊙ (W_hn h + b_hn) ⊙ r(1 − r)     dz = g (h − n) z(1 − z)
    ∂L/∂(W_ih x + b_ih) = (dr, dz, dn)        ∂L/∂(W_hh h + b_hh) = (dr, dz, dn ⊙ r)
    ∂L/∂h = W_hhᵀ ∂L/∂(W_hh h + b_hh) + z ⊙ g          (the second term kept in ``ds``)

The plain NumPy step is ``fastbptt.core.reference_cells.gru_step``.
"""

from typing import NamedTuple

import numpy as np
from numba.extending import overload

from ..kernels.primitives import sigmoid, tanh
from . import base

NAME = "gru"
GATES = 3
NAMES = {"W_ih": "W_ih", "W_hh": "W_hh", "b_ih": "b_ih", "b_hh": "b_hh"}
GATE_NAMES = ("r", "z", "n")


def param_layout(D, H, O, bias=True):
    """Names and shapes of the parameters, in the order they lie in the flat buffer (PyTorch's layout)."""
    return base.gated_param_layout(GATES, D, H, O, bias)


def declare(T, B, H, dtype):
    """The layer's activations and gradients: (name, shape, dtype, initial value)."""
    return [
        ("hs", (T + 1, B, H), dtype, 0),        # h_0 .. h_T
        ("gx", (T, B, 3 * H), dtype, 0),        # W_ih x_t + b_ih, then the gates r, z, n
        ("hn", (T, B, H), dtype, 0),            # W_hn h_{t-1} + b_hn
        ("dh", (T, B, H), dtype, 0),            # ∂L/∂h_t from above, then in full
        ("dgx", (T, B, 3 * H), dtype, 0),       # ∂L/∂(W_ih x_t + b_ih)
        ("drec", (T, B, 3 * H), dtype, 0),      # ∂L/∂(W_hh h_{t-1} + b_hh)
        ("ds", (B, H), dtype, 0),               # z ⊙ ∂L/∂h_t: what step t sends back directly
        ("dh0", (B, H), dtype, 0),              # ∂L/∂h_0
    ]


class GRUCell(NamedTuple):
    """What the kernels see of a GRU layer (see ``base`` for the shared fields)."""
    W_hhT: np.ndarray
    W_hh: np.ndarray
    b_hh: np.ndarray
    hs: np.ndarray
    gx: np.ndarray
    hn: np.ndarray
    dh: np.ndarray
    dgx: np.ndarray
    drec: np.ndarray
    ds: np.ndarray
    dh0: np.ndarray


def kernel_views(ws, W_hh, W_hhT, b_hh, act):
    """The NamedTuple the kernels get, over the buffers of workspace ``ws``."""
    return GRUCell(W_hhT, W_hh, b_hh, ws.hs, ws.gx, ws.hn, ws.dh, ws.dgx, ws.drec, ws.ds, ws.dh0)


@overload(base.step_forward)
def _step_forward(cell, t, b, rec):
    if not base.is_cell(cell, GRUCell):
        return None

    def gru_forward(cell, t, b, rec):
        x = cell.gx[t, b]                      # in: W_ih x_t + b_ih; out: r, z, n
        h = cell.hs[t, b]
        out = cell.hs[t + 1, b]
        hn = cell.hn[t, b]
        H = h.shape[0]
        for i in range(H):
            r = sigmoid(x[i] + rec[i])
            z = sigmoid(x[H + i] + rec[H + i])
            n = tanh(x[2 * H + i] + r * rec[2 * H + i])
            out[i] = n + z * (h[i] - n)        # (1 − z) n + z h
            x[i] = r
            x[H + i] = z
            x[2 * H + i] = n
            hn[i] = rec[2 * H + i]
    return gru_forward


@overload(base.step_backward)
def _step_backward(cell, t, b, c):
    if not base.is_cell(cell, GRUCell):
        return None

    def gru_backward(cell, t, b, c):
        dh = cell.dh[t, b]                     # in: ∂L/∂h_t but the direct term; out: in full
        ds = cell.ds[b]                        # in: z_{t+1} ⊙ ∂L/∂h_{t+1}; out: z_t ⊙ ∂L/∂h_t
        x = cell.gx[t, b]
        h = cell.hs[t, b]
        hn = cell.hn[t, b]
        dgx = cell.dgx[t, b]
        drec = cell.drec[t, b]
        H = h.shape[0]
        one = dh.dtype.type(1)
        for i in range(H):
            g = dh[i] + c * ds[i]
            dh[i] = g
            r = x[i]
            z = x[H + i]
            n = x[2 * H + i]
            dn = g * (one - z) * (one - n * n)
            dr = dn * hn[i] * r * (one - r)
            dz = g * (h[i] - n) * z * (one - z)
            dgx[i] = dr
            dgx[H + i] = dz
            dgx[2 * H + i] = dn
            drec[i] = dr
            drec[H + i] = dz
            drec[2 * H + i] = dn * r
            ds[i] = g * z
    return gru_backward


@overload(base.state0_backward)
def _state0_backward(cell, b, c):
    if not base.is_cell(cell, GRUCell):
        return None

    def gru_state0(cell, b, c):
        dh0 = cell.dh0[b]
        ds = cell.ds[b]
        for i in range(dh0.shape[0]):
            dh0[i] += c * ds[i]
    return gru_state0
