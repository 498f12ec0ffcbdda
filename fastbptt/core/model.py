"""The models: one recurrent cell and a linear readout, parameters in one flat buffer with named views.

    RNN (Elman)  h_t = φ(W_hx x_t + W_hh h_{t-1} + b_h)
    GRU, LSTM    PyTorch's cells (``fastbptt.core.cells.gru``, ``.lstm``)
    all          o_t = W_qh h_t + b_q

Shapes (D input size, H hidden size, O output size, G gates: 1, 3, 4)::

    RNN        W_hx (H, D)     W_hh (H, H)     b_h (H,)
    GRU, LSTM  W_ih (G·H, D)   W_hh (G·H, H)   b_ih (G·H,)   b_hh (G·H,)   gates stacked as PyTorch's
    all        W_qh (O, H)     b_q (O,)

Parameters and their gradients share the same layout, so an optimizer can
update ``model.flat`` from a gradient's flat buffer in one pass. The cell's own
description (layout, buffers, pointwise math) is in ``fastbptt.core.cells``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import numpy as np

# the checks live in validation; the underscore names are the old ones, kept for callers
from .validation import DTYPES, check_dtype, check_seed
from .validation import positive_int as _positive_int
from .validation import real as _real

from .cells import elman as _elman
from .cells import gru as _gru
from .cells import lstm as _lstm

ACTIVATIONS = _elman.ACTIVATIONS


def param_layout(input_size, hidden_size, output_size, bias=True):
    """Names and shapes of the Elman RNN's parameters, in the order they lie in the flat buffer.

    (Every model's own is ``model.layout``.)

    Returns
    -------
    list of (str, tuple)
    """
    return _elman.param_layout(input_size, hidden_size, output_size, bias)


def layer_suffix(layer, direction, num_layers=1, num_directions=1):
    """PyTorch's suffix of a recurrent parameter: "" for a one-layer, one-direction model, else
    "_l{layer}" and "_reverse" for the reverse direction."""
    if num_layers == 1 and num_directions == 1:
        return ""
    return f"_l{layer}" + ("_reverse" if direction else "")


def stack_layout(cell, D, H, O, bias, num_layers=1, num_directions=1):
    """The parameters of a stack of ``num_layers`` layers of ``num_directions`` directions of
    ``cell`` (a module of ``fastbptt.core.cells``) under the readout, in the flat buffer's order.

    Layer by layer, direction by direction, as PyTorch's ``_flat_weights``: the cell's W_ih,
    W_hh, b_ih, b_hh with PyTorch's suffix; layer k > 0 reads dirs·H inputs. Then W_qh
    (O, dirs·H) and b_q. One layer in one direction is the cell's own layout.
    """
    if num_layers == 1 and num_directions == 1:
        return list(cell.param_layout(D, H, O, bias))
    layout = []
    for k in range(num_layers):
        Dk = D if k == 0 else num_directions * H
        for d in range(num_directions):
            sfx = layer_suffix(k, d, num_layers, num_directions)
            layout += [(name + sfx, shape) for name, shape in cell.param_layout(Dk, H, O, bias)
                       if name not in ("W_qh", "b_q")]
    layout.append(("W_qh", (O, num_directions * H)))
    if bias:
        layout.append(("b_q", (O,)))
    return layout


_SUFFIX = re.compile(r"_l[0-9]+(_reverse)?$")


def dropout_generator(seed):
    """The generator of a model's dropout masks: a stream of its own, from the same ``seed``."""
    if isinstance(seed, np.random.Generator):
        try:
            return seed.spawn(1)[0]
        except (TypeError, ValueError, AttributeError):    # a bit generator without a SeedSequence
            return np.random.default_rng(int(seed.integers(2 ** 63)))
    return np.random.default_rng(None if seed is None else [seed, 0xD50])


def generator_state(generator):
    """What a pickle or checkpoint keeps of a generator: its bit generator's state (which names
    the bit generator's class)."""
    return generator.bit_generator.state


def generator_from_state(state, what):
    """A ``numpy.random.Generator`` in ``state`` (from ``generator_state``), of the bit generator it names."""
    try:
        kind = getattr(np.random, state["bit_generator"])
        if not (isinstance(kind, type) and issubclass(kind, np.random.BitGenerator)):
            raise ValueError(f"{state['bit_generator']!r} is not a numpy bit generator")
        bit = kind()
        bit.state = state
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{what}'s dropout generator state is damaged: {e}") from None
    return np.random.Generator(bit)


class ViewMap(Mapping):
    """A read-only mapping of names to arrays: entries cannot be replaced, added or removed.

    The arrays themselves are writable views (write into them in place). Unlike
    ``types.MappingProxyType`` it pickles; its owner rebuilds it on unpickling so that
    the views lie in the owner's own buffer.
    """

    __slots__ = ("_views",)

    def __init__(self, views):
        self._views = dict(views)

    def __getitem__(self, name):
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"{name!r} is not one of the names here: {list(self._views)} (a model of "
                           f"several layers or directions suffixes its names: W_ih_l0, "
                           f"W_hh_l1_reverse, ...)") from None

    def __iter__(self):
        return iter(self._views)

    def __len__(self):
        return len(self._views)

    def __repr__(self):
        return "{" + ", ".join(f"{k!r}: array{v.shape}" for k, v in self._views.items()) + "}"

    def __reduce__(self):
        return (ViewMap, (self._views,))


def flat_views(flat, layout):
    """Named writable views into ``flat`` following ``layout``, as a read-only ``ViewMap``."""
    views, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        views[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return ViewMap(views)


class RNNBase:
    """What every model shares: one recurrent cell with a linear readout, all parameters in one buffer.

    Not made directly: use ``RNN`` (Elman), ``GRU`` or ``LSTM``, which differ only in
    their cell (``fastbptt.core.cells``).

    Attributes
    ----------
    flat : ndarray, shape (n_params,)
        All parameters, contiguous. Update it in place (``model.flat -= lr * g``); assigning
        a new array (``model.flat = model.flat - lr * g``) copies its values in.
    params : mapping of str to ndarray
        Writable views into ``flat``, by name (``model.layout`` lists them with their
        shapes). The mapping is read-only; ``load_params`` copies new values in.
    cell : str
        ``"rnn"``, ``"gru"`` or ``"lstm"``.
    input_size, hidden_size, output_size, bias, dtype, layout
        Read-only: they are what ``flat`` was built for. ``copy.deepcopy`` and ``pickle``
        give an independent model with its own buffer.
    """

    _CELL = None            # the cell's module in fastbptt.core.cells
    activation = None       # φ, for the Elman cell only

    def __init__(self, input_size, hidden_size, output_size, bias=True, dtype=np.float32, seed=0,
                 init="uniform", scale=None, *, num_layers=1, bidirectional=False, dropout=0.0):
        if self._CELL is None:
            raise TypeError("RNNBase is not a model: make a fastbptt.RNN, GRU or LSTM")
        self._setup(input_size, hidden_size, output_size, bias, dtype, num_layers, bidirectional,
                    dropout, seed)
        self.reset_parameters(seed=seed, init=init, scale=scale)

    def _setup(self, input_size, hidden_size, output_size, bias, dtype, num_layers=1,
               bidirectional=False, dropout=0.0, seed=0, buffer=None):
        D = _positive_int(input_size, "input_size")
        H = _positive_int(hidden_size, "hidden_size")
        O = _positive_int(output_size, "output_size")
        L = _positive_int(num_layers, "num_layers")
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        if not isinstance(bidirectional, (bool, np.bool_)):
            raise TypeError(f"bidirectional must be a bool, got {bidirectional!r}")
        check_seed(seed)
        self._stack = (L, 2 if bidirectional else 1)
        self._build(D, H, O, bool(bias), check_dtype(dtype), np.zeros(0), buffer=buffer)
        self.dropout = dropout
        self.training = True
        self.generator = dropout_generator(seed)

    @property
    def cell(self):
        """The cell's name: ``"rnn"``, ``"gru"`` or ``"lstm"`` (read-only)."""
        return self._CELL.NAME

    @property
    def _act_code(self):
        """The activation code the kernels take (the Elman cell's φ; unused by the gated cells)."""
        return 0

    def _build(self, D, H, O, bias, dtype, flat, buffer=None):
        """Set the layout, the flat buffer (zeros, or a copy of ``flat`` when it has the size) and the views.

        ``buffer``, a contiguous 1-D array of the dtype and size, becomes the flat buffer itself
        (shared, not copied): for a bridge whose parameters live in another library's memory.
        """
        self._sizes = (D, H, O, bias)
        self._dtype = dtype
        self._layout = tuple(stack_layout(self._CELL, D, H, O, bias, *self._stack))
        n = sum(int(np.prod(shape)) for _, shape in self._layout)
        try:
            if buffer is not None:
                if buffer.shape != (n,) or buffer.dtype != dtype or not buffer.flags.c_contiguous \
                        or not buffer.flags.writeable:
                    raise ValueError(f"the shared buffer must be a writable contiguous ({n},) array of "
                                     f"{dtype.name}, got {buffer.shape} {buffer.dtype}")
                self._flat = buffer
            else:
                self._flat = np.zeros(n, dtype)
        except MemoryError:
            raise MemoryError(f"a {type(self).__name__} with input_size={D}, hidden_size={H}, output_size={O} has {n:,} "
                              f"parameters ({n * dtype.itemsize / 2**30:,.1f} GiB of {dtype.name}), "
                              f"more than this machine can allocate; use smaller sizes") from None
        if flat.size == n:
            self._flat[...] = flat
        # two sets of views: the public ``params`` and the ones the API hands to the kernels,
        # so that nothing done to a public view (reshaping it in place, say) reaches a kernel
        self._params = flat_views(self._flat, self._layout)
        self._kernel_views = flat_views(self._flat, self._layout)
        # what the API hands the kernels, by (layer, direction): (W_ih, b_ih, W_hh, b_hh), None for a
        # bias the model lacks (the Elman cell has no b_ih)
        L, dirs = self._stack
        self._roles = {}
        self._names = {}
        for k in range(L):
            for d in range(dirs):
                sfx = layer_suffix(k, d, L, dirs)
                names = self._CELL.NAMES
                get = lambda role: (None if names[role] is None or (role.startswith("b_") and not bias)  # noqa: E731
                                    else self._kernel_views[names[role] + sfx])
                self._roles[k, d] = (get("W_ih"), get("b_ih"), get("W_hh"), get("b_hh"))
                self._names[k, d] = {role: None if names[role] is None or (role.startswith("b_") and not bias)
                                     else names[role] + sfx for role in names}

    # -- sizes and layout are read-only: they are what the flat buffer was built for
    input_size = property(lambda self: self._sizes[0], doc="D, the size of x_t (read-only).")
    hidden_size = property(lambda self: self._sizes[1], doc="H, the size of h_t (read-only).")
    output_size = property(lambda self: self._sizes[2], doc="O, the size of o_t (read-only).")
    bias = property(lambda self: self._sizes[3], doc="Whether b_h and b_q exist (read-only).")
    dtype = property(lambda self: self._dtype, doc="The parameters' dtype (read-only).")
    layout = property(lambda self: list(self._layout),
                      doc="(name, shape) of every parameter, in the order they lie in ``flat``.")

    num_layers = property(lambda self: self._stack[0], doc="L, the number of stacked layers (read-only).")
    num_directions = property(lambda self: self._stack[1],
                              doc="2 for a bidirectional model, else 1 (read-only).")
    bidirectional = property(lambda self: self._stack[1] == 2,
                             doc="Whether every layer also runs in reverse (read-only).")

    @property
    def n_states(self):
        """L·dirs: how many (B, H) states a model carries (h0 is (L·dirs, B, H) when > 1)."""
        return self._stack[0] * self._stack[1]

    @property
    def dropout(self):
        """p in [0, 1], the probability of zeroing each element of a layer's output but the last's,
        while ``training`` (inverted dropout, as ``torch.nn.RNN``'s ``dropout``: the kept ones are
        scaled by 1/(1-p)); p = 1 zeroes every one, so the layers above get zeros and the layers
        below no gradient from them, as in ``torch.nn``. Settable."""
        return self._dropout

    @dropout.setter
    def dropout(self, value):
        p = _real(value, "dropout")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {value!r}")
        if p > 0 and self._stack[0] == 1:
            warnings.warn("dropout applies between stacked layers (to every layer's output but the "
                          f"last), so with num_layers=1 dropout={p:g} changes nothing", UserWarning,
                          stacklevel=2)
        self._dropout = p

    @property
    def training(self):
        """Whether dropout applies (True after construction and ``train()``, False after ``eval()``)."""
        return self._training

    @training.setter
    def training(self, value):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"training must be a bool, got {value!r}")
        self._training = bool(value)

    def train(self, mode=True):
        """Set ``training`` (dropout on when True) and return the model, as PyTorch's ``Module.train``."""
        self.training = mode
        return self

    def eval(self):
        """``train(False)``: dropout off, for evaluation and generation. Returns the model."""
        return self.train(False)

    @property
    def generator(self):
        """The ``numpy.random.Generator`` that draws the dropout masks (seeded from ``seed``)."""
        return self._generator

    @generator.setter
    def generator(self, value):
        if not isinstance(value, np.random.Generator):
            raise TypeError(f"generator must be a numpy.random.Generator, got {type(value).__name__}")
        self._generator = value

    def _dropout_active(self):
        return self._training and self._dropout > 0 and self._stack[0] > 1

    def layer_names(self, layer=0, direction=0):
        """The names of layer ``layer``'s parameters in ``direction`` (0 forward, 1 reverse), by role:
        {"W_ih": ..., "W_hh": ..., "b_ih": ... or None, "b_hh": ... or None}.

        E.g. ``{"W_ih": "W_ih_l1_reverse", ...}``; the Elman cell's are W_hx, W_hh, b_h (no b_ih).
        """
        L, dirs = self._stack
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)) \
                or not -L <= layer < L:
            raise ValueError(f"layer must be an int in [0, {L}), got {layer!r}")
        if isinstance(direction, (bool, np.bool_)) or not isinstance(direction, (int, np.integer)) \
                or direction not in range(dirs):
            raise ValueError(f"direction must be 0{' or 1' if dirs == 2 else ''} for this model, "
                             f"got {direction!r}")
        sfx = layer_suffix(int(layer) % L, int(direction), L, dirs)
        names = {}
        for role, name in self._CELL.NAMES.items():
            names[role] = None if name is None or (role.startswith("b_") and not self.bias) \
                else name + sfx
        return names

    @property
    def flat(self):
        """All parameters, one contiguous (n_params,) array; ``params`` are views into it.

        Assigning to it copies the values in (``model.flat = model.flat - lr * g`` updates the
        parameters); the buffer itself is never replaced, so the views stay valid.
        """
        return self._flat

    @flat.setter
    def flat(self, value):
        if value is self._flat:          # the end of an in-place update: model.flat -= lr * g
            return
        if isinstance(value, np.ma.MaskedArray):
            raise TypeError("model.flat cannot be set from a masked array; pass value.filled(...)")
        value = np.asarray(value)
        if value.shape != self._flat.shape:
            raise ValueError(f"model.flat must be set from an array of shape {self._flat.shape}, "
                             f"got {value.shape}; the parameters keep their values")
        if value.dtype.kind not in "fiu":
            raise TypeError(f"model.flat must be set from real numbers, got dtype {value.dtype}")
        if value.dtype.itemsize > self._dtype.itemsize or value.dtype.kind != "f":
            finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
            biggest = float(np.max(np.abs(finite), initial=0))
            if biggest > float(np.finfo(self._dtype).max):
                raise ValueError(f"model.flat must be set from values that {self._dtype.name} can hold, "
                                 f"got {biggest:.3g}; the parameters keep their values")
        self._flat[...] = value

    @property
    def params(self):
        """Writable views into ``flat``, by name; the mapping itself is read-only (use ``load_params``)."""
        return self._params

    @property
    def n_params(self):
        """Number of scalar parameters."""
        return self._flat.size

    def __getstate__(self):
        D, H, O, bias = self._sizes
        return {"cell": self.cell, "sizes": (D, H, O, bias), "dtype": self._dtype.str,
                "activation": self.activation, "flat": self._flat,
                "num_layers": self._stack[0], "bidirectional": self._stack[1] == 2,
                "dropout": self._dropout, "training": self._training,
                "generator": generator_state(self._generator)}

    def __setstate__(self, state):
        """Rebuild from the sizes and the flat buffer, checked as the constructor checks them."""
        what = f"a pickled {type(self).__name__}"
        if state.get("cell", "rnn") != self.cell:       # pickles of the Elman-only release have no cell
            raise ValueError(f"{what} holds a {state.get('cell')!r} cell, not {self.cell!r}")
        D, H, O, bias = state["sizes"]
        D, H, O = (_positive_int(v, n) for v, n in ((D, "input_size"), (H, "hidden_size"),
                                                    (O, "output_size")))
        if not isinstance(bias, (bool, np.bool_)):
            raise ValueError(f"{what} has bias={bias!r}")
        flat = state["flat"]
        if not isinstance(flat, np.ndarray) or isinstance(flat, np.ma.MaskedArray) or flat.ndim != 1:
            raise ValueError(f"{what}'s flat buffer must be a plain 1-D ndarray")
        L = _positive_int(state.get("num_layers", 1), "num_layers")
        bidirectional = state.get("bidirectional", False)
        if not isinstance(bidirectional, (bool, np.bool_)):
            raise ValueError(f"{what} has bidirectional={bidirectional!r}")
        self._stack = (L, 2 if bidirectional else 1)
        self._build(D, H, O, bool(bias), check_dtype(np.dtype(state["dtype"])), np.zeros(0))
        self.dropout = state.get("dropout", 0.0)
        self.training = state.get("training", True)
        self._generator = generator_from_state(state["generator"], what) if "generator" in state \
            else dropout_generator(0)
        if self._flat.size != flat.size:
            raise ValueError(f"{what}'s flat buffer has {flat.size} values, "
                             f"its sizes need {self._flat.size}")
        self.flat = flat
        if self._CELL is _elman:
            self.activation = state["activation"]

    def reset_parameters(self, seed=0, init="uniform", scale=None):
        """Draw the weights again (see the class docstring).

        Nothing changes when an argument is refused, or when the weights drawn would
        not fit the dtype (``scale`` too large).
        """
        if not isinstance(init, str) or init not in ("uniform", "normal"):
            raise ValueError(f"init must be 'uniform' or 'normal', got {init!r}")
        if scale is None:
            scale = 1.0 / np.sqrt(self.hidden_size) if init == "uniform" else 0.01
        scale = _real(scale, "scale")
        if not np.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        rng = np.random.default_rng(check_seed(seed))
        drawn = {}
        for name, shape in self._layout:
            role = _SUFFIX.sub("", name)       # b_ih_l1_reverse -> b_ih
            if role.startswith("b_") and not (init == "uniform" and role in ("b_ih", "b_hh")):
                drawn[name] = np.zeros(shape)
            elif init == "uniform":
                drawn[name] = rng.uniform(-scale, scale, size=shape)
            else:
                drawn[name] = rng.normal(0.0, scale, size=shape)
        biggest = max(float(np.max(np.abs(w), initial=0.0)) for w in drawn.values())
        if biggest > float(np.finfo(self._dtype).max):
            raise ValueError(f"scale={scale:g} draws weights up to {biggest:.3g}, beyond the largest "
                             f"{self._dtype.name} ({np.finfo(self._dtype).max:.3g}); use a smaller scale")
        for name, value in drawn.items():
            self._params[name][...] = value

    def load_params(self, params):
        """Copy ``params`` (a mapping name -> array) into the model, after checking every name and shape."""
        if not hasattr(params, "keys"):
            raise TypeError(f"params must be a mapping of name to array, got {type(params).__name__}")
        expected = {name for name, _ in self.layout}
        missing, extra = expected - set(params), set(params) - expected
        if missing or extra:
            raise ValueError(f"params must have exactly the keys {sorted(expected)}; "
                             f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        checked = {}
        for name, shape in self.layout:
            if isinstance(params[name], np.ma.MaskedArray):
                raise TypeError(f"params[{name!r}] is a masked array; pass .filled(value) to choose "
                                f"what the masked entries hold")
            value = np.asarray(params[name])
            if value.dtype != self.dtype:
                raise TypeError(f"params[{name!r}] must have the model's dtype {self.dtype}, "
                                f"got {value.dtype}")
            if value.shape != shape:
                raise ValueError(f"params[{name!r}] must have shape {shape}, got {value.shape}")
            checked[name] = value
        for name, value in checked.items():
            self._params[name][...] = value

    @classmethod
    def from_params(cls, params, activation="tanh", dtype=None):
        """Build a model whose sizes and bias are read off ``params`` (which are copied).

        The dtype is that of the input weights unless ``dtype`` asks for a conversion;
        ``activation`` is the Elman cell's φ (ignored by ``GRU`` and ``LSTM``).
        """
        if cls._CELL is None:
            raise TypeError("call from_params on fastbptt.RNN, GRU or LSTM")
        w_in = cls._CELL.NAMES["W_ih"]
        if not hasattr(params, "keys"):
            raise ValueError(f"params must be a mapping with at least {w_in!r}, 'W_hh' and 'W_qh'")
        # a stack's names carry PyTorch's suffixes: count its layers and directions
        stacked = "W_hh" not in params and "W_hh_l0" in params
        L = 1
        while stacked and f"W_hh_l{L}" in params:
            L += 1
        dirs = 2 if stacked and "W_hh_l0_reverse" in params else 1
        sfx = "_l0" if stacked else ""
        w_in, w_hh = w_in + sfx, "W_hh" + sfx
        if w_in not in params or "W_qh" not in params or w_hh not in params:
            raise ValueError(f"params must be a mapping with at least {w_in!r}, {w_hh!r} and 'W_qh'")
        W_in, W_hh, W_qh = (np.asarray(params[k]) for k in (w_in, w_hh, "W_qh"))
        for name, value, want in ((w_in, W_in, "(G·H, D)"), (w_hh, W_hh, "(G·H, H)"),
                                  ("W_qh", W_qh, "(O, dirs·H)")):
            if value.ndim != 2:
                raise ValueError(f"params[{name!r}] must have shape {want}, got {value.shape}")
        D, H = W_in.shape[1], W_hh.shape[1]
        if W_hh.shape[0] != cls._CELL.GATES * H:
            raise ValueError(f"params[{w_hh!r}] must have shape (G·H, H) = ({cls._CELL.GATES} H, H) for a "
                             f"{cls.__name__}, got {W_hh.shape}")
        bias = cls._CELL.NAMES["b_hh"] + sfx in params
        kwargs = {"activation": activation} if cls._CELL is _elman else {}
        model = cls(D, H, W_qh.shape[0], bias=bias, dtype=W_in.dtype if dtype is None else dtype,
                    num_layers=L, bidirectional=dirs == 2, **kwargs)
        if dtype is not None:  # an explicit request to convert
            params = {name: np.asarray(value).astype(model.dtype) for name, value in params.items()}
        model.load_params(params)
        return model

    @classmethod
    def _over(cls, buffer, input_size, hidden_size, output_size, bias=True, *, num_layers=1,
              bidirectional=False, activation="tanh"):
        """A model whose ``flat`` is ``buffer`` itself, shared and not initialized: for a bridge whose
        parameters live in another library's memory (``fastbptt.torch``). ``buffer`` is a writable
        contiguous 1-D float32 or float64 array of the layout's size."""
        model = cls.__new__(cls)
        dtype = check_dtype(buffer.dtype)
        model._setup(input_size, hidden_size, output_size, bias, dtype, num_layers, bidirectional,
                     buffer=buffer)             # the layout is built once, over the buffer: no copy
        if cls._CELL is _elman:
            model.activation = activation
        return model

    def __repr__(self):
        act = f", activation={self.activation!r}" if self._CELL is _elman else ""
        L, dirs = self._stack
        stack = (f", num_layers={L}" if L > 1 else "") + (", bidirectional=True" if dirs == 2 else "") \
            + (f", dropout={self._dropout:g}" if self._dropout else "")
        return (f"{type(self).__name__}(input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"output_size={self.output_size}{act}, bias={self.bias}, dtype={self.dtype.name}{stack})")


class RNN(RNNBase):
    """An Elman RNN with a linear readout, in the notation of Dive into Deep Learning.

    Parameters
    ----------
    input_size : int
        D, the size of x_t (or the vocabulary size for token inputs).
    hidden_size : int
        H, the size of h_t.
    output_size : int
        O, the size of o_t (the number of classes for cross-entropy).
    activation : {"tanh", "relu", "identity"}
        φ. ``"identity"`` with ``bias=False`` is the textbook's linear model.
    bias : bool
        Whether b_h and b_q exist.
    dtype : float32 or float64
        The dtype of every parameter, input and gradient; nothing is cast silently.
    seed : int >= 0, None or numpy.random.Generator
        Seed of the initialization (``numpy.random.default_rng``).
    init : {"uniform", "normal"}
        ``"uniform"`` (default) draws every weight from U(-s, s) with s = 1/sqrt(H),
        as ``torch.nn.RNN`` does; ``"normal"`` draws from N(0, s²) with s = 0.01,
        as Dive into Deep Learning's from-scratch RNN does. Biases start at zero.
    scale : float, optional
        Overrides s.

    Attributes
    ----------
    params : mapping of str to ndarray
        Writable views into ``flat``: ``W_hx`` (H, D), ``W_hh`` (H, H), ``b_h`` (H,),
        ``W_qh`` (O, H), ``b_q`` (O,) (no ``b_*`` when ``bias=False``).

    The other attributes are those of every model (``RNNBase``): ``flat``, ``cell``
    (``"rnn"``), the read-only sizes, ``dtype`` and ``layout``.
    """

    _CELL = _elman

    def __init__(self, input_size, hidden_size, output_size, activation="tanh",
                 bias=True, dtype=np.float32, seed=0, init="uniform", scale=None, *,
                 num_layers=1, bidirectional=False, dropout=0.0):
        self._setup(input_size, hidden_size, output_size, bias, dtype, num_layers, bidirectional,
                    dropout, seed)
        self.activation = activation
        self.reset_parameters(seed=seed, init=init, scale=scale)

    @property
    def activation(self):
        """φ: ``"tanh"``, ``"relu"`` or ``"identity"`` (may be set to another of these)."""
        return self._activation

    @activation.setter
    def activation(self, value):
        if not isinstance(value, str) or value not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {value!r}")
        self._activation = value

    @property
    def _act_code(self):
        return ACTIVATIONS[self._activation]


_GATED_DOC = """{what}

    Parameters
    ----------
    input_size : int
        D, the size of x_t (or the vocabulary size for token inputs).
    hidden_size : int
        H, the size of h_t{state}.
    output_size : int
        O, the size of o_t (the number of classes for cross-entropy).
    bias : bool
        Whether b_ih, b_hh and b_q exist.
    dtype : float32 or float64
        The dtype of every parameter, input and gradient; nothing is cast silently.
    seed : int >= 0, None or numpy.random.Generator
        Seed of the initialization (``numpy.random.default_rng``).
    init : {{"uniform", "normal"}}
        ``"uniform"`` (default) draws every weight and b_ih, b_hh from U(-s, s) with
        s = 1/sqrt(H), as ``torch.nn.{torch}`` does; ``"normal"`` draws the weights from
        N(0, s²) with s = 0.01, as Dive into Deep Learning does, and zero biases. The
        readout's b_q starts at zero either way.
    scale : float, optional
        Overrides s.

    Attributes
    ----------
    params : mapping of str to ndarray
        Writable views into ``flat``: ``W_ih`` ({G}H, D), ``W_hh`` ({G}H, H), ``b_ih``,
        ``b_hh`` ({G}H,), ``W_qh`` (O, H), ``b_q`` (O,) (no ``b_*`` when ``bias=False``).
        The gates are stacked in PyTorch's order ({gates}), so
        ``model.params["W_ih"][...] = torch_{lower}.weight_ih_l0.detach().numpy()`` copies
        PyTorch's weights one to one. ``model.gate(name, gate)`` is the view of one gate.

    The other attributes are those of every model (``RNNBase``): ``flat``, ``cell``
    (``"{lower}"``), the read-only sizes, ``dtype`` and ``layout``.
    """


class _Gated(RNNBase):
    """The GRU and the LSTM: gates stacked along the first axis of W_ih, W_hh, b_ih, b_hh."""

    @property
    def activation(self):
        """None: a gated cell's nonlinearities are fixed (σ and tanh)."""
        return None

    @activation.setter
    def activation(self, value):
        raise AttributeError(f"a {type(self).__name__} has no activation to set (its gates use σ and "
                             f"tanh); the activation belongs to fastbptt.RNN")

    def gate(self, name, gate):
        """The view of one gate's block of ``params[name]``: e.g. ``model.gate("W_hh", "z")`` (H, H).

        name : "W_ih", "W_hh", "b_ih" or "b_hh";  gate : one of ``GATES`` (PyTorch's order)
        """
        gates = self._CELL.GATE_NAMES
        roles = {n for n in self._params if _SUFFIX.sub("", n) in ("W_ih", "W_hh", "b_ih", "b_hh")}
        if not isinstance(name, str) or name not in roles:
            raise ValueError(f"gate() takes one of {sorted(roles)}, got {name!r}")
        if gate not in gates:
            raise ValueError(f"a {type(self).__name__}'s gates are {gates}, got {gate!r}")
        k, H = gates.index(gate), self.hidden_size
        return self._params[name][k * H:(k + 1) * H]


class GRU(_Gated):
    __doc__ = _GATED_DOC.format(
        what="A GRU with a linear readout, as ``torch.nn.GRU`` computes it (gates r, z, n).\n\n"
             "    r = σ(W_ir x + b_ir + W_hr h + b_hr)     z = σ(W_iz x + b_iz + W_hz h + b_hz)\n"
             "    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))     h' = (1 − z) ⊙ n + z ⊙ h\n\n"
             "    (Dive into Deep Learning applies r before the product: W_hh (r ⊙ h).)",
        state="", torch="GRU", G=3, gates="r, z, n", lower="gru")
    _CELL = _gru
    GATES = _gru.GATE_NAMES


class LSTM(_Gated):
    __doc__ = _GATED_DOC.format(
        what="An LSTM with a linear readout, as ``torch.nn.LSTM`` computes it (gates i, f, g, o).\n\n"
             "    i, f, g, o = σ(a_i), σ(a_f), tanh(a_g), σ(a_o)   a = W_ih x + b_ih + W_hh h + b_hh\n"
             "    c' = f ⊙ c + i ⊙ g        h' = o ⊙ tanh(c')\n\n"
             "    The state is the pair (h, c): ``h0`` and the returned states are pairs.",
        state=" and of the cell state c_t", torch="LSTM", G=4, gates="i, f, g, o", lower="lstm")
    _CELL = _lstm
    GATES = _lstm.GATE_NAMES


CELLS = {"rnn": RNN, "gru": GRU, "lstm": LSTM}
