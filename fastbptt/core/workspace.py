"""Preallocated buffers for one model and one (T, B): activations, gradients, scratch.

The buffers are declared, not scattered: ``declare`` lists those every model needs
(the readout's, the loss's, the scratch of the products) and the cell's own module
declares its activations and gradients (``fastbptt.core.cells``); ``carve`` makes
one aligned block with a named view for each, as llm.c's ``ActivationTensors`` does.

Pass the same ``Workspace`` to every call of a training loop and no call allocates
an array again. Every buffer is made once, here; the kernels only write into them.

A workspace serves one call at a time: a call from a second thread while it is in
use is refused (give each thread its own). ``copy.deepcopy`` and ``pickle`` give an
independent workspace whose ``grads`` are views into its own ``grad_flat``.
"""

import threading

import numpy as np

from .cells import CELLS
from .model import RNNBase, flat_views
from .validation import check_dtype, positive_int


def model_signature(model):
    """What a workspace must agree on with the model it serves: (cell, D, H, O, bias, dtype)."""
    return (model.cell, model.input_size, model.hidden_size, model.output_size, model.bias, model.dtype)


def declare(T, B, D, H, O, dtype, n_params, cell="rnn"):
    """Every fixed buffer of a workspace: (name, shape, dtype, initial value), in block order.

    The cell's own buffers first (``CELLS[cell].declare``), then those every model needs.
    """
    GH = CELLS[cell].GATES * H
    return CELLS[cell].declare(T, B, H, dtype) + [
        ("out", (T * B, O), dtype, 0),          # o_t, then ∂L/∂o_t
        ("row_loss", (T * B,), dtype, 0),       # ℓ(o_t, y_t) per position
        ("W_hhT", (H, GH), dtype, 0),           # W_hhᵀ, contiguous
        ("rec", (B, GH), dtype, 0),             # b_hh + W_hh h_{t-1} of one step (fused)
        ("recT", (GH, B), dtype, 0),            # W_hh h_{t-1} of one step, transposed (per-step BLAS)
        ("backT", (H, B), dtype, 0),            # W_hhᵀ drec_{t+1} of one step, transposed (per-step BLAS)
        ("zero_b", (GH,), dtype, 0),            # the biases of a model without them
        ("ones", (T * B,), dtype, 1),           # sums over positions as GEMVs
        ("carry_full", (T, B), dtype, 1),       # carry weights of full BPTT
        ("carry", (T, B), dtype, 1),            # caller's carry weights, copied
        ("tokens", (T, B), np.intp, 0),         # token ids, when inputs are tokens
        ("targets", (T * B,), np.intp, 0),      # class labels, for cross-entropy
        ("grad_flat", (n_params,), dtype, 0),   # every gradient, laid out like model.flat
    ]


# buffers that hold nothing between calls (a pickle without them gets their initial values)
_SCRATCH = frozenset({"rec", "recT", "backT", "zero_b"})

_ALIGN = 64   # bytes: each buffer starts on a cache line


def carve(declared):
    """One zeroed byte block and a named view into it for each declared buffer, set to its value."""
    offsets, total = [], 0
    for _, shape, dtype, _ in declared:
        offsets.append(total)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        total += -(-nbytes // _ALIGN) * _ALIGN
    raw = np.zeros(total + _ALIGN, np.uint8)
    shift = -raw.ctypes.data % _ALIGN
    block = raw[shift:shift + total]
    views = {}
    for (name, shape, dtype, value), offset in zip(declared, offsets):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        view = block[offset:offset + nbytes].view(dtype).reshape(shape)
        if value:
            view[...] = value
        views[name] = view
    return block, views


class Workspace:
    """Buffers for running ``model`` on batches of B sequences of length T.

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    T : int
        Sequence length (number of time steps).
    B : int
        Batch size (number of independent sequences).

    Attributes
    ----------
    grads : mapping of str to ndarray
        Views into ``grad_flat``, keyed like ``model.params``. Overwritten by every call.
    grad_flat : ndarray (n_params,)
        All gradients, laid out like ``model.flat``.
    hs : ndarray (T+1, B, H)
        h_0 .. h_T of the last forward pass.
    dh0 : ndarray (B, H)
        ∂L/∂h_0 of the last backward pass.
    """

    # set once, when the workspace is made: replacing one by hand could hand a kernel a buffer
    # of another size (an out-of-range write), so assignment is refused; write into them in place
    _FIXED = frozenset({"T", "B", "signature", "cell", "dtype", "grads", "_block", "_declared", "_views"}
                       | {name for cell in CELLS for name, *_ in declare(1, 1, 1, 1, 1, np.float64, 1, cell)})

    def __setattr__(self, name, value):
        if name in self._FIXED and name in self.__dict__:
            raise AttributeError(f"Workspace.{name} is fixed when the workspace is made; write into "
                                 f"it in place (ws.{name}[...] = ...) or make a new Workspace")
        object.__setattr__(self, name, value)

    def __init__(self, model, T, B):
        if not isinstance(model, RNNBase):
            raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
        self.T = positive_int(T, "T")
        self.B = positive_int(B, "B")
        self.signature = model_signature(model)
        self.cell, D, H, O, _, dtype = self.signature
        T, B = self.T, self.B
        self.dtype = dtype
        self._make_buffers(model.n_params)
        self.last_carry = self.carry_full             # the weights the last backward pass used
        self._x = None                                # dense inputs kept by forward(), made on first use
        self._dX = None                               # ∂L/∂X, made on first request
        self.forward_kind = None                      # "dense"/"tokens" after forward(), None otherwise
        self.last_backward = None                     # "readout" (loss_and_grad, backward) or "layer"
        self._busy = threading.Lock()                 # held by the call using it (one thread at a time)
        self._entries = {}                            # compiled entry points by kernel (api._compiled)
        self._cell_views = None                       # (model views, act, the cell's NamedTuple) (api)

    def _make_buffers(self, n_params):
        """Every fixed buffer as a named view into one block (see ``declare``), and the gradient views."""
        cell, D, H, O, bias, dtype = self.signature
        self._declared = declare(self.T, self.B, D, H, O, dtype, n_params, cell)
        self._block, views = carve(self._declared)
        vars(self).update(views)
        self._views = tuple(views.items())                    # (name, view), for read_only_buffer
        self.grads = flat_views(self.grad_flat, CELLS[cell].param_layout(D, H, O, bias))

    def __getstate__(self):
        names = [name for name, *_ in self._declared]
        return {"T": self.T, "B": self.B, "signature": self.signature, "dtype": self.dtype,
                "buffers": {name: getattr(self, name) for name in names},
                "x": self._x, "dX": self._dX, "forward_kind": self.forward_kind,
                "last_backward": self.last_backward,
                "last_carry_is_full": self.last_carry is self.carry_full}

    def __setstate__(self, state):
        """Rebuild the block and copy the saved buffers in, after checking that each has its declared
        shape and dtype (a tampered pickle is refused, never handed to a kernel)."""
        T, B = positive_int(state["T"], "T"), positive_int(state["B"], "B")
        signature = tuple(state["signature"])
        if len(signature) == 5:                       # pickled by the Elman-only release
            signature = ("rnn",) + signature
        cell, D, H, O, bias, dtype = signature
        if not isinstance(cell, str) or cell not in CELLS:
            raise ValueError(f"a pickled Workspace has cell={cell!r}")
        D, H, O = (positive_int(v, n) for v, n in ((D, "D"), (H, "H"), (O, "O")))
        if not isinstance(bias, bool):
            raise ValueError(f"a pickled Workspace has bias={bias!r}")
        dtype = check_dtype(dtype)
        object.__setattr__(self, "T", T)
        object.__setattr__(self, "B", B)
        object.__setattr__(self, "signature", (cell, D, H, O, bias, dtype))
        object.__setattr__(self, "cell", cell)
        object.__setattr__(self, "dtype", dtype)
        n_params = sum(int(np.prod(shape)) for _, shape in CELLS[cell].param_layout(D, H, O, bias))
        self._make_buffers(n_params)
        saved = dict(state["buffers"])
        if len(tuple(state["signature"])) == 5:   # the previous release: its two scratch buffers renamed
            for name in ("stepT", "zero_h"):
                saved.pop(name, None)
            for name, shape, dt, value in self._declared:
                if name not in saved and name in _SCRATCH:
                    saved[name] = np.full(shape, value, dt)
        if set(saved) != {name for name, *_ in self._declared}:
            missing = sorted({name for name, *_ in self._declared} - set(saved))
            extra = sorted(set(saved) - {name for name, *_ in self._declared})
            raise ValueError(f"a pickled Workspace does not hold the buffers its cell declares "
                             f"(missing {missing}, unexpected {extra})")
        for name, shape, dt, _ in self._declared:
            value = np.asarray(saved[name])
            if value.shape != shape or value.dtype != np.dtype(dt):
                raise ValueError(f"a pickled Workspace's {name} has shape {value.shape} and dtype "
                                 f"{value.dtype}, not {shape} and {np.dtype(dt)}")
            getattr(self, name)[...] = value
        extra = {}
        for key, want in (("x", (T, B, D)), ("dX", (T, B, D))):
            value = state[key]
            if value is not None:
                value = np.array(value, copy=True)
                if value.shape != want or value.dtype != dtype:
                    raise ValueError(f"a pickled Workspace's {key} buffer has shape {value.shape}, not {want}")
            extra[key] = value
        kind = state["forward_kind"]
        if kind not in (None, "dense", "tokens") or (kind == "dense" and extra["x"] is None):
            raise ValueError(f"a pickled Workspace has forward_kind={kind!r}")
        self._x, self._dX, self.forward_kind = extra["x"], extra["dX"], kind
        last = state.get("last_backward", "readout" if kind is None else None)
        if last not in (None, "readout", "layer"):
            raise ValueError(f"a pickled Workspace has last_backward={last!r}")
        self.last_backward = last
        self.last_carry = self.carry_full if state["last_carry_is_full"] else self.carry
        self._busy = threading.Lock()
        self._entries = {}
        self._cell_views = None

    def read_only_buffer(self):
        """The name of the first fixed buffer whose ``flags.writeable`` was set to False, or None.

        Every call writes into the buffers, and the kernels, once typed for writable arrays,
        would write into a read-only one regardless: the API refuses it first.
        """
        for name, view in self._views:
            if not view.flags.writeable:
                return name
        return None

    def buffers(self):
        """The arrays that hold the workspace's memory: the block, and the input and ∂L/∂X buffers once made."""
        return [a for a in (self._block, self._x, self._dX) if a is not None]

    def overlaps(self, a):
        """Whether the memory of array ``a`` may overlap the workspace's (bounds only, as ``np.may_share_memory``)."""
        return any(np.may_share_memory(a, buf) for buf in self.buffers())

    def x_buffer(self):
        """(T, B, D) buffer for dense inputs kept between ``forward`` and ``backward``."""
        if self._x is None:
            _, D, _, _, _, dtype = self.signature
            self._x = np.zeros((self.T, self.B, D), dtype)
        return self._x

    def dX_buffer(self):
        """(T, B, D) buffer for ∂L/∂X, made on the first request."""
        if self._dX is None:
            _, D, _, _, _, dtype = self.signature
            self._dX = np.zeros((self.T, self.B, D), dtype)
        return self._dX

    @property
    def nbytes(self):
        """Bytes held by all buffers."""
        return sum(a.nbytes for a in self.buffers())

    def __repr__(self):
        cell, D, H, O, bias, dtype = self.signature
        return (f"Workspace(cell={cell!r}, T={self.T}, B={self.B}, D={D}, H={H}, O={O}, bias={bias}, "
                f"dtype={dtype.name}, {self.nbytes / 2**20:.1f} MiB)")
