"""The Elman RNN's parameters: one flat contiguous buffer and named views into it.

    h_t = φ(W_hx x_t + W_hh h_{t-1} + b_h)        o_t = W_qh h_t + b_q

Shapes (D input size, H hidden size, O output size)::

    W_hx (H, D)   W_hh (H, H)   b_h (H,)   W_qh (O, H)   b_q (O,)

Parameters and their gradients share the same layout, so an optimizer can
update ``model.flat`` from a gradient's flat buffer in one pass.
"""

from __future__ import annotations

import types

import numpy as np

ACTIVATIONS = {"identity": 0, "tanh": 1, "relu": 2}
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def param_layout(input_size, hidden_size, output_size, bias=True):
    """Names and shapes of the parameters, in the order they lie in the flat buffer.

    Returns
    -------
    list of (str, tuple)
    """
    D, H, O = input_size, hidden_size, output_size
    layout = [("W_hx", (H, D)), ("W_hh", (H, H))]
    if bias:
        layout.append(("b_h", (H,)))
    layout.append(("W_qh", (O, H)))
    if bias:
        layout.append(("b_q", (O,)))
    return layout


def flat_views(flat, layout):
    """Named writable views into ``flat`` following ``layout``, as a read-only mapping."""
    views, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        views[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return types.MappingProxyType(views)


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_dtype(dtype, name="dtype"):
    """Return ``dtype`` as a NumPy dtype if it is float32 or float64, else raise TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dt not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


class RNN:
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
    seed : int or None
        Seed of the initialization (``numpy.random.default_rng``).
    init : {"uniform", "normal"}
        ``"uniform"`` (default) draws every weight from U(-s, s) with s = 1/sqrt(H),
        as ``torch.nn.RNN`` does; ``"normal"`` draws from N(0, s²) with s = 0.01,
        as Dive into Deep Learning's from-scratch RNN does. Biases start at zero.
    scale : float, optional
        Overrides s.

    Attributes
    ----------
    flat : ndarray, shape (n_params,)
        All parameters, contiguous.
    params : mapping of str to ndarray
        Writable views into ``flat``: ``W_hx``, ``W_hh``, ``b_h``, ``W_qh``, ``b_q``
        (no ``b_*`` when ``bias=False``).
    """

    def __init__(self, input_size, hidden_size, output_size, activation="tanh",
                 bias=True, dtype=np.float32, seed=0, init="uniform", scale=None):
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.output_size = _positive_int(output_size, "output_size")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        self.bias = bool(bias)
        self.dtype = check_dtype(dtype)
        self.layout = param_layout(self.input_size, self.hidden_size, self.output_size, self.bias)
        self.flat = np.zeros(sum(int(np.prod(s)) for _, s in self.layout), dtype=self.dtype)
        self.params = flat_views(self.flat, self.layout)
        self.reset_parameters(seed=seed, init=init, scale=scale)

    @property
    def n_params(self):
        """Number of scalar parameters."""
        return self.flat.size

    def reset_parameters(self, seed=0, init="uniform", scale=None):
        """Draw the weights again (see the class docstring); biases become zero."""
        if init not in ("uniform", "normal"):
            raise ValueError(f"init must be 'uniform' or 'normal', got {init!r}")
        if scale is None:
            scale = 1.0 / np.sqrt(self.hidden_size) if init == "uniform" else 0.01
        if not np.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        rng = np.random.default_rng(seed)
        for name, shape in self.layout:
            if name.startswith("b_"):
                self.params[name][...] = 0
            elif init == "uniform":
                self.params[name][...] = rng.uniform(-scale, scale, size=shape)
            else:
                self.params[name][...] = rng.normal(0.0, scale, size=shape)

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
            value = np.asarray(params[name])
            if value.dtype != self.dtype:
                raise TypeError(f"params[{name!r}] must have the model's dtype {self.dtype}, "
                                f"got {value.dtype}")
            if value.shape != shape:
                raise ValueError(f"params[{name!r}] must have shape {shape}, got {value.shape}")
            checked[name] = value
        for name, value in checked.items():
            self.params[name][...] = value

    @classmethod
    def from_params(cls, params, activation="tanh", dtype=None):
        """Build a model whose sizes and bias are read off ``params`` (which are copied).

        The dtype is that of ``params['W_hx']`` unless ``dtype`` asks for a conversion.
        """
        if not hasattr(params, "keys") or "W_hx" not in params or "W_qh" not in params:
            raise ValueError("params must be a mapping with at least 'W_hx' and 'W_qh'")
        W_hx, W_qh = np.asarray(params["W_hx"]), np.asarray(params["W_qh"])
        if W_hx.ndim != 2:
            raise ValueError(f"params['W_hx'] must have shape (H, D), got {W_hx.shape}")
        if W_qh.ndim != 2:
            raise ValueError(f"params['W_qh'] must have shape (O, H), got {W_qh.shape}")
        H, D = W_hx.shape
        model = cls(D, H, W_qh.shape[0], activation=activation, bias="b_h" in params,
                    dtype=W_hx.dtype if dtype is None else dtype)
        if dtype is not None:  # an explicit request to convert
            params = {name: np.asarray(value).astype(model.dtype) for name, value in params.items()}
        model.load_params(params)
        return model

    def __repr__(self):
        return (f"RNN(input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"output_size={self.output_size}, activation={self.activation!r}, "
                f"bias={self.bias}, dtype={self.dtype.name})")
