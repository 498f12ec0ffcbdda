"""The LSTM cell, gates i, f, g, o in PyTorch's order (G = 4); the state is the pair (h, c)::

    a = W_ih x + b_ih + W_hh h + b_hh          i, f, g, o = σ(a_i), σ(a_f), tanh(a_g), σ(a_o)
    c' = f ⊙ c + i ⊙ g                         h' = o ⊙ tanh(c')

Forward, ``gx[t]`` holds W_ih x_t + b_ih and is overwritten by the gates (i, f, g, o),
with tanh(c_t) kept in ``tc``. Backwards, with g_h = ∂L/∂h' and ∂L/∂c' in full::

    dc = ∂L/∂c' + g_h o (1 − tanh²c')          (``dcs`` keeps it, for the diagnostics)
    da = (dc g i(1 − i), dc c f(1 − f), dc i (1 − g²), g_h tanh(c') o(1 − o))
    ∂L/∂h = W_hhᵀ da          ∂L/∂c = f ⊙ dc          (the second kept in ``ds``)

a enters as a plain sum, so ∂L/∂(W_ih x + b_ih) = ∂L/∂(W_hh h + b_hh) = da: ``drec``
is ``dgx``. The cell state carries the gradient back through f alone, not through
W_hh, which is why it does not vanish as an Elman cell's does. The plain NumPy step
is ``fastbptt.core.reference_cells.lstm_step``.
"""

from typing import NamedTuple

import numpy as np
from numba.extending import overload

from ..kernels.primitives import sigmoid, tanh
from . import base

NAME = "lstm"
GATES = 4
NAMES = {"W_ih": "W_ih", "W_hh": "W_hh", "b_ih": "b_ih", "b_hh": "b_hh"}
GATE_NAMES = ("i", "f", "g", "o")


def param_layout(D, H, O, bias=True):
    """Names and shapes of the parameters, in the order they lie in the flat buffer (PyTorch's layout)."""
    return base.gated_param_layout(GATES, D, H, O, bias)


def declare(T, B, H, dtype):
    """The layer's activations and gradients: (name, shape, dtype, initial value)."""
    return [
        ("hs", (T + 1, B, H), dtype, 0),        # h_0 .. h_T
        ("cs", (T + 1, B, H), dtype, 0),        # c_0 .. c_T
        ("gx", (T, B, 4 * H), dtype, 0),        # W_ih x_t + b_ih, then the gates i, f, g, o
        ("tc", (T, B, H), dtype, 0),            # tanh(c_t)
        ("dh", (T, B, H), dtype, 0),            # ∂L/∂h_t from above, then in full
        ("dcs", (T, B, H), dtype, 0),           # ∂L/∂c_t in full
        ("dgx", (T, B, 4 * H), dtype, 0),       # ∂L/∂a_t (both of its sums)
        ("ds", (B, H), dtype, 0),               # f ⊙ ∂L/∂c_t: what step t sends back to c_{t-1}
        ("dh0", (B, H), dtype, 0),              # ∂L/∂h_0
        ("dc0", (B, H), dtype, 0),              # ∂L/∂c_0
    ]


class LSTMCell(NamedTuple):
    """What the kernels see of an LSTM layer (see ``base`` for the shared fields)."""
    W_hhT: np.ndarray
    W_hh: np.ndarray
    b_hh: np.ndarray
    hs: np.ndarray
    cs: np.ndarray
    gx: np.ndarray
    tc: np.ndarray
    dh: np.ndarray
    dcs: np.ndarray
    dgx: np.ndarray
    drec: np.ndarray    # dgx
    ds: np.ndarray
    dh0: np.ndarray
    dc0: np.ndarray


def kernel_views(ws, W_hh, W_hhT, b_hh, act):
    """The NamedTuple the kernels get, over the buffers of workspace ``ws``."""
    return LSTMCell(W_hhT, W_hh, b_hh, ws.hs, ws.cs, ws.gx, ws.tc, ws.dh, ws.dcs, ws.dgx, ws.dgx,
                    ws.ds, ws.dh0, ws.dc0)


@overload(base.step_forward)
def _step_forward(cell, t, b, rec):
    if not base.is_cell(cell, LSTMCell):
        return None

    def lstm_forward(cell, t, b, rec):
        x = cell.gx[t, b]                      # in: W_ih x_t + b_ih; out: i, f, g, o
        c = cell.cs[t, b]
        c_new = cell.cs[t + 1, b]
        h_new = cell.hs[t + 1, b]
        tc = cell.tc[t, b]
        H = c.shape[0]
        for k in range(H):
            i = sigmoid(x[k] + rec[k])
            f = sigmoid(x[H + k] + rec[H + k])
            g = tanh(x[2 * H + k] + rec[2 * H + k])
            o = sigmoid(x[3 * H + k] + rec[3 * H + k])
            cn = f * c[k] + i * g
            tt = tanh(cn)
            c_new[k] = cn
            tc[k] = tt
            h_new[k] = o * tt
            x[k] = i
            x[H + k] = f
            x[2 * H + k] = g
            x[3 * H + k] = o
    return lstm_forward


@overload(base.step_backward)
def _step_backward(cell, t, b, c):
    if not base.is_cell(cell, LSTMCell):
        return None

    def lstm_backward(cell, t, b, c):
        dh = cell.dh[t, b]                     # ∂L/∂h_t in full (no direct term for h)
        ds = cell.ds[b]                        # in: f_{t+1} ⊙ ∂L/∂c_{t+1}; out: f_t ⊙ ∂L/∂c_t
        dcs = cell.dcs[t, b]
        x = cell.gx[t, b]
        c_prev = cell.cs[t, b]
        tc = cell.tc[t, b]
        da = cell.dgx[t, b]
        H = dh.shape[0]
        one = dh.dtype.type(1)
        for k in range(H):
            i = x[k]
            f = x[H + k]
            g = x[2 * H + k]
            o = x[3 * H + k]
            tt = tc[k]
            gh = dh[k]
            dc = c * ds[k] + gh * o * (one - tt * tt)
            dcs[k] = dc
            da[k] = dc * g * i * (one - i)
            da[H + k] = dc * c_prev[k] * f * (one - f)
            da[2 * H + k] = dc * i * (one - g * g)
            da[3 * H + k] = gh * tt * o * (one - o)
            ds[k] = dc * f
    return lstm_backward


@overload(base.state0_backward)
def _state0_backward(cell, b, c):
    if not base.is_cell(cell, LSTMCell):
        return None

    def lstm_state0(cell, b, c):
        dc0 = cell.dc0[b]
        ds = cell.ds[b]
        for k in range(dc0.shape[0]):
            dc0[k] = c * ds[k]
    return lstm_state0
