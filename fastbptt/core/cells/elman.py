"""The Elman cell: h_t = φ(W_hx x_t + W_hh h_{t-1} + b_h), in Dive into Deep Learning's notation.

One gate (G = 1). The input projection W_hx x_t is written straight into hs[1:], and
the step applies φ in place, so h_t overwrites its own pre-activation; backwards,
∂L/∂z_t = φ'(z_t) ⊙ ∂L/∂h_t overwrites ∂L/∂h_t in ``dz``, which is at once the gradient
of the input projection and of rec (they enter z_t as a plain sum). φ' is read off
h_t: tanh' = 1 - h², relu' = [h > 0], identity' = 1. Activation codes: 0 identity,
1 tanh, 2 relu. The plain NumPy step is ``fastbptt.core.reference``.
"""

from typing import NamedTuple

import numpy as np
from numba.extending import overload

from ..kernels.primitives import tanh
from . import base

NAME = "rnn"
GATES = 1
ACTIVATIONS = {"identity": 0, "tanh": 1, "relu": 2}
# the generic names (PyTorch's) of the parameters, as this cell calls them
NAMES = {"W_ih": "W_hx", "W_hh": "W_hh", "b_ih": None, "b_hh": "b_h"}


def param_layout(D, H, O, bias=True):
    """Names and shapes of the parameters, in the order they lie in the flat buffer."""
    layout = [("W_hx", (H, D)), ("W_hh", (H, H))]
    if bias:
        layout.append(("b_h", (H,)))
    layout.append(("W_qh", (O, H)))
    if bias:
        layout.append(("b_q", (O,)))
    return layout


def declare(T, B, H, dtype):
    """The layer's activations and gradients: (name, shape, dtype, initial value)."""
    return [
        ("hs", (T + 1, B, H), dtype, 0),        # h_0 .. h_T (hs[1:] first holds W_hx x_t)
        ("dz", (T, B, H), dtype, 0),            # ∂L/∂h_t from above, then ∂L/∂z_t
        ("dh0", (B, H), dtype, 0),              # ∂L/∂h_0
    ]


class ElmanCell(NamedTuple):
    """What the kernels see of an Elman layer (see ``base`` for the shared fields)."""
    W_hhT: np.ndarray
    W_hh: np.ndarray
    b_hh: np.ndarray
    hs: np.ndarray
    gx: np.ndarray      # hs[1:]: the input projection, overwritten by h_t
    dh: np.ndarray      # dz
    dgx: np.ndarray     # dz
    drec: np.ndarray    # dz
    dh0: np.ndarray
    act: int


def kernel_views(ws, W_hh, W_hhT, b_hh, act):
    """The NamedTuple the kernels get, over the buffers of workspace ``ws``."""
    return ElmanCell(W_hhT, W_hh, b_hh, ws.hs, ws.hs[1:], ws.dz, ws.dz, ws.dz, ws.dh0, act)


@overload(base.step_forward)
def _step_forward(cell, t, b, rec):
    if not base.is_cell(cell, ElmanCell):
        return None

    def elman_forward(cell, t, b, rec):
        h = cell.hs[t + 1, b]                  # in: W_hx x_t; out: h_t
        act = cell.act
        if act == 1:
            for i in range(h.shape[0]):
                h[i] = tanh(h[i] + rec[i])
        elif act == 2:
            for i in range(h.shape[0]):
                h[i] += rec[i]
                if h[i] < 0:
                    h[i] = 0
        else:
            for i in range(h.shape[0]):
                h[i] += rec[i]
    return elman_forward


@overload(base.step_backward)
def _step_backward(cell, t, b, c):
    if not base.is_cell(cell, ElmanCell):
        return None

    def elman_backward(cell, t, b, c):
        g = cell.dh[t, b]                      # in: ∂L/∂h_t; out: ∂L/∂z_t
        h = cell.hs[t + 1, b]
        act = cell.act
        if act == 1:
            one = g.dtype.type(1)
            for j in range(g.shape[0]):
                g[j] *= one - h[j] * h[j]
        elif act == 2:
            for j in range(g.shape[0]):
                if h[j] <= 0:
                    g[j] = 0
    return elman_backward


@overload(base.state0_backward)
def _state0_backward(cell, b, c):
    if not base.is_cell(cell, ElmanCell):
        return None

    def elman_state0(cell, b, c):
        pass                                   # h_0 reaches step 1 only through W_hh
    return elman_state0
