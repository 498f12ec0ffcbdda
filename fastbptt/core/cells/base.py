"""What every cell provides, and the three pointwise functions the generic sweep calls.

A cell is pointwise math. The sweep (``fastbptt.core.kernels.sweep``) runs, for every
cell, the same loops::

    forward,  t = 0 .. T-1:   rec = b_hh + W_hh h_{t-1}         (one product per step)
                              step_forward(cell, t, b, rec[b])   (the cell's pointwise math)
    backward, t = T-1 .. 0:   dh[t] += c_{t+1} W_hhᵀ drec[t+1]   (one product per step)
                              step_backward(cell, t, b, c_{t+1})
              then            dh0 = c_0 W_hhᵀ drec[0];  state0_backward(cell, b, c_0)

Each cell module (``elman``, ``gru``, ``lstm``) defines a NamedTuple of named views
(its weights in the layout the products want, its activations and its gradients,
all in the workspace) and overloads the three functions below for that type. The
compiled kernels dispatch on the NamedTuple's type, so each cell compiles once per
dtype and stays in Numba's on-disk cache (a jitted function or a closure passed as an
argument would be recompiled in every process: numba#9237, numba#2065).

Fields every cell's NamedTuple has (the sweep reads only these):

    W_hhT (H, G·H)   W_hh transposed (C-contiguous), for the forward product
    W_hh  (G·H, H)   for the backward product
    b_hh  (G·H,)     the recurrent bias (zeros without bias); rec starts from it
    hs    (T+1, B, H) h_0 .. h_T
    dh    (T, B, H)   in: ∂L/∂h_t from above (the readout or the next layer); the sweep
                      adds what comes back through time
    drec  (T, B, G·H) out: ∂L/∂rec_t, with rec_t = b_hh + W_hh h_{t-1}
    dh0   (B, H)      out: ∂L/∂h_0

``step_backward(cell, t, b, c)`` receives c, the carry weight of step t+1 (1 at the last
step), and must weigh by it whatever the cell sends back to step t directly (not through
W_hh), as the sweep weighs the product. Nothing here validates: the API does.

When a cell module changes, delete the ``__pycache__`` folders: Numba's cache of the
sweep kernels is keyed on the sweep's own source file only.
"""

from numba import types


def step_forward(cell, t, b, rec):
    """Step t of sequence b: from rec = b_hh + W_hh h_{t-1} (G·H,) and the cell's input
    projection, write h_t (and the cell's other state) and keep what the backward step needs."""
    raise NotImplementedError("only callable from compiled code, with a cell's NamedTuple")


def step_backward(cell, t, b, c):
    """Step t of sequence b backwards: from ∂L/∂h_t in cell.dh[t, b] (product already added),
    write ∂L/∂(input projection) and ∂L/∂rec_t, and what goes back to step t-1 directly."""
    raise NotImplementedError("only callable from compiled code, with a cell's NamedTuple")


def state0_backward(cell, b, c):
    """After the sweep: add to ∂L/∂h_0 (which holds c W_hhᵀ drec[0]) what step 0 sends back
    directly, and write the cell's other state gradients (the LSTM's ∂L/∂c_0)."""
    raise NotImplementedError("only callable from compiled code, with a cell's NamedTuple")


def gated_param_layout(G, D, H, O, bias):
    """The parameters of a gated cell with G gates and the readout, in PyTorch's layout and order:
    W_ih (G·H, D), W_hh (G·H, H), b_ih, b_hh (G·H,), W_qh (O, H), b_q (O,) (no b_* without bias)."""
    layout = [("W_ih", (G * H, D)), ("W_hh", (G * H, H))]
    if bias:
        layout += [("b_ih", (G * H,)), ("b_hh", (G * H,))]
    layout.append(("W_qh", (O, H)))
    if bias:
        layout.append(("b_q", (O,)))
    return layout


def is_cell(cell, cls):
    """Whether the Numba type ``cell`` is the NamedTuple class ``cls`` (for the overloads)."""
    return isinstance(cell, types.BaseNamedTuple) and cell.instance_class is cls


