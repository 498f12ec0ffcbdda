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

A workspace knows which model filled it: ``backward`` and ``layer_backward`` (and the
diagnostics) refuse a model object other than the one whose ``forward``, ``layer_forward``
or ``loss_and_grad`` ran last, even one of the same shapes, and ``backward`` refuses
parameters changed since its ``forward`` (compared bit for bit with a copy ``forward``
keeps when T·B >= ``api.KEEP_PARAMS_MIN_POSITIONS``), as PyTorch refuses a backward after
an in-place change of a weight. A copy or a pickle does not know its model (it is not
pickled): it takes any model of its signature whose parameters are those its forward
pass kept (any model of its signature, when that pass kept none).
"""

import threading
import weakref

import numpy as np

from .cells import CELLS
from .model import RNNBase, flat_views, stack_layout
from .validation import check_dtype, count, positive_int


def model_signature(model):
    """What a workspace must agree on with the model it serves:
    (cell, D, H, O, bias, dtype, num_layers, num_directions)."""
    return (model.cell, model.input_size, model.hidden_size, model.output_size, model.bias, model.dtype,
            model.num_layers, model.num_directions)


def layer_prefix(layer, direction):
    """The prefix of a layer's buffers in ``declare``: none for layer 0's forward direction (so a
    one-layer model's buffers keep their names: ``ws.hs``), else ``"l{k}."``/``"l{k}_reverse."``."""
    if layer == 0 and direction == 0:
        return ""
    return f"l{layer}" + ("_reverse" if direction else "") + "."


def declare(T, B, D, H, O, dtype, n_params, cell="rnn", num_layers=1, num_directions=1):
    """Every fixed buffer of a workspace: (name, shape, dtype, initial value), in block order.

    Layer by layer, direction by direction: the cell's own buffers (``CELLS[cell].declare``)
    and the scratch of its products, under ``layer_prefix``; a reverse direction of a layer
    above the first also keeps its input and ∂L/∂input reversed in time (``xr``, ``dxr``);
    a layer whose output is not its ``hs`` (two directions concatenated, or dropout below the
    top) has ``y``, ``dy`` and ``mask``. Then the buffers every model needs.
    """
    L, dirs = num_layers, num_directions
    GH = CELLS[cell].GATES * H
    out = []
    for k in range(L):
        Dk = D if k == 0 else dirs * H
        for d in range(dirs):
            p = layer_prefix(k, d)
            own = CELLS[cell].declare(T, B, H, dtype) + [
                ("W_hhT", (H, GH), dtype, 0),           # W_hhᵀ, contiguous
                ("rec", (B, GH), dtype, 0),             # b_hh + W_hh h_{t-1} of one step (fused)
                ("recT", (GH, B), dtype, 0),            # W_hh h_{t-1} of one step, transposed (per-step BLAS)
                ("backT", (H, B), dtype, 0),            # W_hhᵀ drec_{t+1} of one step, transposed (per-step BLAS)
            ]
            if d == 1 and k > 0:
                own += [("xr", (T, B, Dk), dtype, 0),   # the layer's input, each sequence reversed
                        ("dxr", (T, B, Dk), dtype, 0)]  # ∂L/∂xr
            out += [(p + name, shape, dt, value) for name, shape, dt, value in own]
        if dirs == 2 or k < L - 1:
            out.append((f"l{k}.y", (T, B, dirs * H), dtype, 0))      # the layer's output
        if dirs == 2:
            out.append((f"l{k}.dy", (T, B, dirs * H), dtype, 0))     # ∂L/∂(the layer's output)
        if k < L - 1:
            out.append((f"l{k}.mask", (T, B, dirs * H), dtype, 0))   # its dropout mask
    n_states = L * dirs
    out += [
        ("out", (T * B, O), dtype, 0),          # o_t, then ∂L/∂o_t
        ("row_loss", (T * B,), dtype, 0),       # ℓ(o_t, y_t) per position
        ("zero_b", (GH,), dtype, 0),            # the biases of a model without them
        ("ones", (T * B,), dtype, 1),           # sums over positions as GEMVs
        ("carry_full", (T, B), dtype, 1),       # carry weights of full BPTT
        ("carry", (T, B), dtype, 1),            # caller's carry weights, copied
        ("tokens", (T, B), np.intp, 0),         # token ids, when inputs are tokens
        ("targets", (T * B,), np.intp, 0),      # class labels, for cross-entropy
        ("grad_flat", (n_params,), dtype, 0),   # every gradient, laid out like model.flat
        ("counts", (T,), np.intp, B),           # ... with lengths: how many sequences are longer than t
        ("row_order", (B,), np.intp, 0),        # with lengths: row i holds the caller's sequence row_order[i]
        ("inverse", (B,), np.intp, 0),          # ... and the caller's sequence b is row inverse[b]
        ("lengths", (B,), np.intp, T),          # ... the length of each row (longest first)
        ("weights", (T * B,), dtype, 1),        # loss weight of each position (0 on padding)
        ("state", (n_states, B, H), dtype, 0),  # the last states, in the caller's order
        ("dstate", (n_states, B, H), dtype, 0),  # ∂L/∂(the first states), in the caller's order
    ]
    if cell == "lstm":
        out += [("cstate", (n_states, B, H), dtype, 0), ("dcstate", (n_states, B, H), dtype, 0)]
    if dirs == 2:
        out.append(("tokens_r", (T, B), np.intp, 0))     # token ids, each sequence reversed
    return out


def _valid_plan(counts, order, inverse, lengths, T, B):
    """Whether a workspace's record of lengths is self-consistent (all indices in range)."""
    return (np.array_equal(np.sort(order), np.arange(B)) and np.array_equal(order[inverse], np.arange(B))
            and np.all((lengths >= 1) & (lengths <= T)) and np.all(np.diff(lengths) <= 0)
            and np.array_equal(counts, (lengths[None, :] > np.arange(T)[:, None]).sum(axis=1)))


class LayerBuffers:
    """The buffers of one layer in one direction: the names the cell's ``kernel_views`` reads
    (``hs``, ``gx``, ``dh``, ...), views into the workspace's block. Fixed, as the workspace's
    own: write into them in place."""

    def __init__(self, views):
        vars(self).update(views)
        object.__setattr__(self, "_cell_views", None)

    def __setattr__(self, name, value):
        if name != "_cell_views":
            raise AttributeError(f"a layer's buffers are fixed when the workspace is made; write into "
                                 f"them in place (.{name}[...] = ...)")
        object.__setattr__(self, name, value)

    def __repr__(self):
        return f"LayerBuffers({', '.join(k for k in vars(self) if not k.startswith('_'))})"


# buffers that hold nothing between calls (a pickle without them gets their initial values)
_SCRATCH = frozenset({"rec", "recT", "backT", "zero_b"})
# buffers this release added to a one-layer workspace: a pickle of an older one gets their initial values
_ADDED = frozenset({"counts", "row_order", "inverse", "lengths", "weights", "state", "dstate",
                    "cstate", "dcstate"})

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
    _FIXED = frozenset({"T", "B", "signature", "cell", "dtype", "grads", "_block", "_declared", "_views",
                        "_layers", "num_layers", "num_directions"}
                       | {name for cell in CELLS for name, *_ in declare(1, 1, 1, 1, 1, np.float64, 1, cell, 1, 2)})

    def __setattr__(self, name, value):
        if name in self._FIXED and name in self.__dict__:
            raise AttributeError(f"Workspace.{name} is fixed when the workspace is made; write into "
                                 f"it in place (ws.{name}[...] = ...) or make a new Workspace")
        object.__setattr__(self, name, value)

    def __init__(self, model, T, B):
        if not isinstance(model, RNNBase):
            raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
        self.T = positive_int(T, "T")
        self.B = count(B, "B")                        # B = 0: an empty batch (as torch.nn.RNN takes)
        self.signature = model_signature(model)
        self.cell, D, H, O, _, dtype, self.num_layers, self.num_directions = self.signature
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
        self._lengths_on = False                      # whether the last forward pass had lengths
        self._dropout_on = False                      # ... and dropout
        self._seal()
        self._full_plan()
        self._scratch = {}                            # buffers made on first use (ws.scratch)
        self._owner = None                            # weakref to the model of the last forward pass
        self._params = None                           # model.flat as forward() ran it (made on first use)
        self._params_same = None                      # ... and where model.flat equals it, bit for bit
        self._params_kept = False                     # ... and whether it holds the last forward's

    def _filled_by(self, model, keep_params=False):
        """Record that ``model`` ran the forward pass now in the workspace; with ``keep_params``,
        keep a copy of its parameters (``forward``/``layer_forward``: backward comes later)."""
        ref = self._owner
        if ref is None or ref() is not model:
            self._owner = weakref.ref(model)
        if keep_params:
            if self._params is None or self._params.shape != model.flat.shape:
                self._params = np.empty_like(model.flat)
                self._params_same = np.empty(model.flat.shape, dtype=bool)   # for the comparison
            np.copyto(self._params, model.flat)
        self._params_kept = keep_params

    def _forgotten(self):
        """A call is about to overwrite the buffers: they belong to no model until it ends."""
        self._owner = None
        self._params_kept = False
        self.forward_kind = None

    def _forward_params_match(self, model):
        """Whether ``model.flat`` is bit for bit what the last forward pass kept (True when it kept none)."""
        if not self._params_kept:
            return True
        a, b = model.flat, self._params
        if a.shape != b.shape:
            return False
        bits = np.dtype(f"u{a.dtype.itemsize}")
        same = self._params_same                  # made with the copy: nothing allocated per call
        np.equal(a.view(bits), b.view(bits), out=same)
        return bool(same.all())

    def _carve(self, declared):
        """The block and a named view into it for each declared buffer (``carve``). A subclass may carve
        them from memory it already holds (``fastbptt.torch``: a shorter T within a longer workspace's)."""
        return carve(declared)

    def _make_buffers(self, n_params):
        """Every fixed buffer as a named view into one block (see ``declare``), the layers' views
        and the gradient views."""
        cell, D, H, O, bias, dtype, L, dirs = self.signature
        self._declared = declare(self.T, self.B, D, H, O, dtype, n_params, cell, L, dirs)
        self._block, views = self._carve(self._declared)
        vars(self).update({k: v for k, v in views.items() if "." not in k})
        self._views = tuple(views.items())                    # (name, view), for read_only_buffer
        layers = []
        for k in range(L):
            row = []
            for d in range(dirs):
                p = layer_prefix(k, d)
                own = {name[len(p):]: v for name, v in views.items()
                       if name.startswith(p) and "." not in name[len(p):]} if p else None
                row.append(self if not p else LayerBuffers(own))
            layers.append(row)
        self._layers = tuple(tuple(r) for r in layers)
        self._outputs = tuple(                                # per layer: (y, dy, mask) or None
            tuple(views.get(f"l{k}.{n}") for n in ("y", "dy", "mask")) for k in range(L))
        self.grads = flat_views(self.grad_flat, stack_layout(CELLS[cell], D, H, O, bias, L, dirs))

    def layer(self, layer=0, direction=0):
        """The buffers of layer ``layer`` in ``direction`` (0 forward, 1 reverse): ``hs``, ``dh``, ``gx``, ...

        Rows are in the workspace's order (``order``, when the last call had lengths); a reverse
        direction's steps are in its own order (step s of sequence b is time lengths[b]-1-s).
        Layer 0's forward direction is the workspace itself (``ws.hs``, ``ws.dh0``, ...).
        """
        L, dirs = self.num_layers, self.num_directions
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)) \
                or not -L <= layer < L:
            raise ValueError(f"layer must be an int in [0, {L}), got {layer!r}")
        if isinstance(direction, (bool, np.bool_)) or not isinstance(direction, (int, np.integer)) \
                or direction not in range(dirs):
            raise ValueError(f"direction must be 0{' or 1' if dirs == 2 else ''}, got {direction!r}")
        return self._layers[layer][direction]

    @property
    def order(self):
        """(B,) after a call with lengths: row i of every buffer holds the caller's sequence order[i]
        (longest first); None when rows are in the caller's order."""
        return self.row_order if self.has_lengths else None

    def dropout_masks(self):
        """The dropout masks of the last forward pass, one (T, B, dirs·H) array per layer below the
        top, in the caller's batch order (copies); multipliers 0 or 1/(1-p) (all 0 for p = 1). All ones when that pass
        had no dropout (evaluation mode, p = 0) or before any forward pass."""
        masks = []
        for k in range(self.num_layers - 1):
            m = self._outputs[k][2]
            if not self._dropout_on:
                masks.append(np.ones_like(m))
                continue
            masks.append(np.take(m, self.inverse, axis=1) if self.has_lengths else m.copy())
        return masks

    def scratch(self, name, shape, dtype=None):
        """A buffer made on its first request and kept (inputs reversed in time, outputs in the
        caller's order, ...): those not every call needs, which may be large. Made again when
        the shape or dtype asked for differs; counted in ``buffers()``, ``overlaps`` and ``nbytes``."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        a = self._scratch.get(name)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype:
            a = np.zeros(shape, dtype)
            self._scratch[name] = a
        return a

    def __getstate__(self):
        return {"T": self.T, "B": self.B, "signature": self.signature, "dtype": self.dtype,
                "buffers": dict(self._views), "has_lengths": self._lengths_on,
                "dropout_on": self._dropout_on,
                "x": self._x, "dX": self._dX, "forward_kind": self.forward_kind,
                "last_backward": self.last_backward,
                "last_carry_is_full": self.last_carry is self.carry_full,
                "params_at_forward": self._params.copy() if self._params_kept and self.forward_kind else None}

    def __setstate__(self, state):
        """Rebuild the block and copy the saved buffers in, after checking that each has its declared
        shape and dtype (a tampered pickle is refused, never handed to a kernel)."""
        T, B = positive_int(state["T"], "T"), count(state["B"], "B")
        signature = tuple(state["signature"])
        old = len(signature) < 8                      # pickled by a one-layer release
        if len(signature) == 5:                       # pickled by the Elman-only release
            signature = ("rnn",) + signature
        if len(signature) == 6:
            signature = signature + (1, 1)
        if len(signature) != 8:
            raise ValueError(f"a pickled Workspace has signature={state['signature']!r}")
        cell, D, H, O, bias, dtype, L, dirs = signature
        if not isinstance(cell, str) or cell not in CELLS:
            raise ValueError(f"a pickled Workspace has cell={cell!r}")
        D, H, O = (positive_int(v, n) for v, n in ((D, "D"), (H, "H"), (O, "O")))
        if not isinstance(bias, bool):
            raise ValueError(f"a pickled Workspace has bias={bias!r}")
        dtype = check_dtype(dtype)
        L = positive_int(L, "num_layers")
        if isinstance(dirs, (bool, np.bool_)) or not isinstance(dirs, (int, np.integer)) or dirs not in (1, 2):
            raise ValueError(f"a pickled Workspace has num_directions={dirs!r}")
        for name, value in (("T", T), ("B", B), ("signature", (cell, D, H, O, bias, dtype, L, dirs)),
                            ("cell", cell), ("dtype", dtype), ("num_layers", L), ("num_directions", dirs)):
            object.__setattr__(self, name, value)
        n_params = sum(int(np.prod(shape)) for _, shape in stack_layout(CELLS[cell], D, H, O, bias, L, dirs))
        self._make_buffers(n_params)
        saved = dict(state["buffers"])
        if old:                                   # buffers added since: their initial values
            for name, shape, dt, value in self._declared:
                if name not in saved and name in _ADDED:
                    saved[name] = np.full(shape, value, dt)
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
        views = dict(self._views)
        for name, shape, dt, _ in self._declared:
            value = np.asarray(saved[name])
            if value.shape != shape or value.dtype != np.dtype(dt):
                raise ValueError(f"a pickled Workspace's {name} has shape {value.shape} and dtype "
                                 f"{value.dtype}, not {shape} and {np.dtype(dt)}")
            views[name][...] = value
        has_lengths = state.get("has_lengths", False)
        if not isinstance(has_lengths, bool):
            raise ValueError(f"a pickled Workspace has has_lengths={has_lengths!r}")
        if has_lengths and not _valid_plan(self.counts, self.row_order, self.inverse, self.lengths, T, B):
            raise ValueError("a pickled Workspace's lengths (counts, row_order, inverse, lengths) "
                             "are damaged")
        self._lengths_on = has_lengths
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
        self._scratch = {}
        self._full_plan()
        dropout_on = state.get("dropout_on", False)
        if not isinstance(dropout_on, bool):
            raise ValueError(f"a pickled Workspace has dropout_on={dropout_on!r}")
        self._dropout_on = dropout_on
        kept = state.get("params_at_forward")          # absent from older pickles: nothing to compare
        if kept is not None:
            kept = np.array(kept, copy=True)
            if kept.shape != (n_params,) or kept.dtype != dtype or kind is None:
                raise ValueError(f"a pickled Workspace's params_at_forward has shape {kept.shape} and dtype "
                                 f"{kept.dtype}, not ({n_params},) and {dtype}, or no forward pass")
        self._owner = None                             # not pickled: a copy takes any model of its signature
        self._params, self._params_kept = kept, kept is not None
        self._params_same = None if kept is None else np.empty(kept.shape, dtype=bool)
        self._seal()

    def _seal(self):
        """Remember the record of lengths as the API wrote it (``_sealed`` tells a change by hand)."""
        self._record = b"".join(a.tobytes() for a in (self.counts, self.row_order, self.inverse, self.lengths))

    def _sealed(self):
        """Whether the record of lengths is as the last call wrote it."""
        return self._record == b"".join(a.tobytes() for a in (self.counts, self.row_order, self.inverse,
                                                              self.lengths))

    @property
    def has_lengths(self):
        """Whether the last forward pass had ``lengths`` (rows are then sorted: see ``order``)."""
        return self._lengths_on

    def _full_plan(self):
        """Private (order, inverse, lengths, counts) of full-length sequences, for the kernels that
        take them: not public attributes, so nothing set by hand reaches a kernel."""
        identity = np.arange(self.B, dtype=np.intp)
        self._full = (identity, identity, np.full(self.B, self.T, np.intp), np.full(self.T, self.B, np.intp))

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
        return [a for a in (self._block, self._x, self._dX, self._params) if a is not None] \
            + list(self._scratch.values())

    def overlaps(self, a):
        """Whether the memory of array ``a`` may overlap the workspace's (bounds only, as ``np.may_share_memory``)."""
        return any(np.may_share_memory(a, buf) for buf in self.buffers())

    def x_buffer(self):
        """(T, B, D) buffer for dense inputs kept between ``forward`` and ``backward``."""
        if self._x is None:
            D, dtype = self.signature[1], self.signature[5]
            self._x = np.zeros((self.T, self.B, D), dtype)
        return self._x

    def dX_buffer(self):
        """(T, B, D) buffer for ∂L/∂X, made on the first request."""
        if self._dX is None:
            D, dtype = self.signature[1], self.signature[5]
            self._dX = np.zeros((self.T, self.B, D), dtype)
        return self._dX

    @property
    def nbytes(self):
        """Bytes held by all buffers."""
        return sum(a.nbytes for a in self.buffers())

    def __repr__(self):
        cell, D, H, O, bias, dtype, L, dirs = self.signature
        return (f"Workspace(cell={cell!r}, L={L}, dirs={dirs}, T={self.T}, B={self.B}, D={D}, H={H}, O={O}, bias={bias}, "
                f"dtype={dtype.name}, {self.nbytes / 2**20:.1f} MiB)")
