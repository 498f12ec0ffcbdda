"""Gradient clipping and optimizers that update the flat parameter buffer in place.

A model keeps every parameter in one contiguous buffer ``model.flat`` and a
workspace keeps every gradient, laid out the same way, in ``ws.grad_flat``; so
clipping and every optimizer here are single compiled loops over two or three flat
arrays, with no per-parameter Python loop and no temporary arrays::

    loss, grads, h = fastbptt.loss_and_grad(model, X, Y, h, workspace=ws)
    norm = clip_grad_norm(ws.grad_flat, 1.0)         # d2l's θ; returns the norm before clipping
    opt.step(ws.grad_flat)                           # opt = SGD(model, lr=1.0), Adam(model, 1e-3), ...

Update rules (g the gradient, p the parameters, t the step count from 1):

- ``SGD``:          p ← p - lr·g
- ``SGD`` momentum: v ← μ·v + g;  p ← p - lr·v      (as ``torch.optim.SGD``)
- ``Adagrad``:      G ← G + g²;  p ← p - lr·g / √(G + ε)        (as min-char-rnn, ε = 1e-8)
- ``Adam``:         g ← g + λ·p (if λ);  m ← β₁m + (1-β₁)g;  v ← β₂v + (1-β₂)g²;
                    p ← p - lr·(m / (1-β₁ᵗ)) / (√(v / (1-β₂ᵗ)) + ε)    (as ``torch.optim.Adam``)
- ``AdamW``:        p ← p·(1 - lr·λ), then Adam without the λ·p term (as ``torch.optim.AdamW``)

Arithmetic is in float64 inside the kernels; results are stored in the model's dtype.
The public classes validate once, in Python; the kernels only compute.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..core.model import RNN, RNNBase, ViewMap
from ..core.validation import number

_number = number     # the old name, kept for callers (it lives in core.validation)

# ----------------------------------------------------------------------------- kernels


@njit(cache=True, nogil=True)
def _sum_squares(g):
    """Σ g² in float64, in a fixed order: eight interleaved partial sums (independent
    chains, so the loop is not bound by the latency of one addition), then the tail."""
    n = g.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    m = n - n % 8
    for i in range(0, m, 8):
        a0 = np.float64(g[i])
        a1 = np.float64(g[i + 1])
        a2 = np.float64(g[i + 2])
        a3 = np.float64(g[i + 3])
        a4 = np.float64(g[i + 4])
        a5 = np.float64(g[i + 5])
        a6 = np.float64(g[i + 6])
        a7 = np.float64(g[i + 7])
        s0 += a0 * a0
        s1 += a1 * a1
        s2 += a2 * a2
        s3 += a3 * a3
        s4 += a4 * a4
        s5 += a5 * a5
        s6 += a6 * a6
        s7 += a7 * a7
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for i in range(m, n):
        s += np.float64(g[i]) * g[i]
    return s


@njit(cache=True, nogil=True)
def _max_abs(g):
    """max |g| (for a gradient without NaN)."""
    m = 0.0
    for i in range(g.shape[0]):
        a = abs(np.float64(g[i]))
        if a > m:
            m = a
    return m


@njit(cache=True, nogil=True)
def _sum_squares_scaled(g, m):
    """Σ (g / m)²: each term at most 1, so neither overflows nor loses the small ones."""
    s = 0.0
    for i in range(g.shape[0]):
        a = np.float64(g[i]) / m
        s += a * a
    return s


@njit(cache=True, nogil=True)
def _scale(g, factor):
    """g ← factor · g."""
    for i in range(g.shape[0]):
        g[i] = g[i] * factor


@njit(cache=True, nogil=True)
def _clamp(g, c):
    """g ← min(max(g, -c), c)."""
    for i in range(g.shape[0]):
        if g[i] > c:
            g[i] = c
        elif g[i] < -c:
            g[i] = -c


@njit(cache=True, nogil=True)
def _sgd(p, g, lr):
    for i in range(p.shape[0]):
        p[i] = p[i] - lr * g[i]


@njit(cache=True, nogil=True)
def _sgd_momentum(p, g, v, lr, mu):
    for i in range(p.shape[0]):
        vi = mu * v[i] + g[i]
        v[i] = vi
        p[i] = p[i] - lr * v[i]


@njit(cache=True, nogil=True)
def _adagrad(p, g, G, lr, eps):
    for i in range(p.shape[0]):
        gi = np.float64(g[i])
        G[i] = G[i] + gi * gi
        p[i] = p[i] - lr * gi / np.sqrt(np.float64(G[i]) + eps)


@njit(cache=True, nogil=True)
def _adam(p, g, m, v, lr, beta1, beta2, eps, c1, c2, decay, coupled):
    """One Adam/AdamW step. c1 = 1 - β₁ᵗ, c2 = 1 - β₂ᵗ. ``coupled``: λ·p joins the gradient
    (Adam's L2 penalty); else p shrinks by (1 - lr·λ) first (AdamW's decoupled decay)."""
    step = lr / c1                      # lr·m/(1-β₁ᵗ) / (√v/√(1-β₂ᵗ) + ε), as torch.optim.Adam
    inv_sqrt_c2 = 1.0 / np.sqrt(c2)
    shrink = 1.0 - lr * decay
    for i in range(p.shape[0]):
        pi = np.float64(p[i])
        gi = np.float64(g[i])
        if coupled:
            gi += decay * pi
        else:
            pi *= shrink
        m[i] = beta1 * m[i] + (1.0 - beta1) * gi
        v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi
        p[i] = pi - step * m[i] / (np.sqrt(np.float64(v[i])) * inv_sqrt_c2 + eps)


# ----------------------------------------------------------------------------- checks


def _grad_buffer(grad, name="grad", writable=True):
    """The flat gradient itself (a Workspace's ``grad_flat``, or a 1-D float array; changed in place
    when ``writable``)."""
    if hasattr(grad, "grad_flat") and isinstance(grad.grad_flat, np.ndarray):
        grad = grad.grad_flat
    if isinstance(grad, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array; pass {name}.filled(0.0)")
    if not isinstance(grad, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array (such as workspace.grad_flat) or a Workspace, "
                        f"got {type(grad).__name__}")
    if grad.ndim != 1:
        raise ValueError(f"{name} must be 1-D (the flat gradient, such as workspace.grad_flat), "
                         f"got shape {grad.shape}")
    if grad.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must hold float32 or float64, got dtype {grad.dtype}")
    if writable and not (grad.flags.c_contiguous and grad.flags.writeable):
        raise ValueError(f"{name} must be contiguous and writable: it is changed in place")
    if not grad.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous (np.ascontiguousarray({name}))")
    return grad


# ----------------------------------------------------------------------------- clipping


_SMALL = 1e-280
"""Below this, a float64 sum of squares may have lost terms to underflow (g² < 2.2e-308)."""


def _norm_parts(g):
    """(m, s) with ‖g‖ = m·√s, computed without overflow or underflow.

    The fast path is the plain float64 sum of squares (m = 1). Only when that sum
    overflows (‖g‖ > 1.3e154, float64 gradients only) or may have underflowed does it
    scale by m = max |g| first, as LAPACK's ``nrm2`` does, so every term is at most 1.
    """
    s = _sum_squares(g)
    if _SMALL <= s < math.inf or s != s:
        return 1.0, s                       # ordinary values, or a NaN (which stays NaN)
    m = _max_abs(g)
    if m == 0.0 or m == math.inf:
        return 1.0, s                       # all zero (s = 0), or an Inf element (s = Inf)
    return m, _sum_squares_scaled(g, m)


def _norm(g):
    m, s = _norm_parts(g)
    return m * math.sqrt(s)


def grad_norm(grad):
    """The L2 norm of all gradients as one vector, accumulated in float64.

    Exact to rounding for any finite float64 gradient, however large or small its
    elements (no overflow of the squares; see ``_norm_parts``).

    Parameters
    ----------
    grad : ndarray (n_params,) or Workspace
        The flat gradient (``workspace.grad_flat``) or the workspace holding it.
    """
    return _norm(_grad_buffer(grad, writable=False))


def clip_grad_norm(grad, max_norm):
    """Scale the flat gradient in place so its global L2 norm is at most ``max_norm``.

    d2l's ``grad_clipping``: with ‖g‖ the norm of all parameters' gradients as one
    vector, g ← (θ / ‖g‖) g only when ‖g‖ > θ.

    Parameters
    ----------
    grad : ndarray (n_params,) float32/float64, or Workspace
        Changed in place (use ``workspace.grad_flat``).
    max_norm : float > 0
        θ.

    Returns
    -------
    float
        ‖g‖ before clipping (log it). A NaN norm leaves the gradient unchanged.
    """
    grad = _grad_buffer(grad)
    theta = number(max_norm, "max_norm", low=0.0, low_open=True)
    m, s = _norm_parts(grad)
    norm = m * math.sqrt(s)
    if norm > theta:
        # θ/‖g‖ as (θ/m)/√s: finite and nonzero even where ‖g‖ itself overflows to Inf
        _scale(grad, (theta / m) / math.sqrt(s))
    return norm


def clip_grad_value(grad, clip_value=5.0):
    """Clamp every gradient element in place to [-c, c] (min-char-rnn's ``np.clip(d, -5, 5)``).

    Parameters
    ----------
    grad : ndarray (n_params,) float32/float64, or Workspace
        Changed in place.
    clip_value : float > 0
        c.

    Returns
    -------
    float
        The global L2 norm of the gradient before clipping.
    """
    grad = _grad_buffer(grad)
    c = number(clip_value, "clip_value", low=0.0, low_open=True)
    norm = _norm(grad)
    _clamp(grad, c)
    return norm


# ----------------------------------------------------------------------------- optimizers


_MAX_STEPS = 2 ** 62
"""The largest step count a state may hold (a larger one can only be a damaged file)."""


def _check_steps(t):
    """A saved step count: an int in [0, _MAX_STEPS] (not a bool, a float or a string)."""
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or not 0 <= t <= _MAX_STEPS:
        raise ValueError(f"the step count t must be an int in [0, {_MAX_STEPS}], got {t!r}")
    return int(t)


class Optimizer:
    """Base class: an update rule over ``model.flat`` with state arrays laid out like it.

    Subclasses set ``name``, ``_state_names`` and implement ``_update``. ``step`` checks
    the gradient and calls the compiled kernel; ``state_dict`` and ``load_state_dict``
    round-trip everything a bitwise-identical continuation needs.

    ``copy.deepcopy`` and ``pickle`` give an independent optimizer with its own state
    arrays, bound to a copy of its model: copy the pair together,
    ``model2, opt2 = copy.deepcopy((model, opt))``, and ``opt2`` updates ``model2``.
    """

    name = "optimizer"
    _state_names = ()

    @classmethod
    def state_names_for(cls, hyper):
        """The state arrays an optimizer of this class with (checked) ``hyper`` keeps."""
        return tuple(cls._state_names)

    def __init__(self, model, **hyper):
        if not isinstance(model, RNNBase):
            raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
        self._model = model
        self._hyper = hyper
        self._t = 0                                   # steps taken
        self._state = {name: np.zeros_like(model.flat) for name in self._state_names}

    # read-only: a model, state array, step count or hyperparameter changed by hand would reach
    # the compiled update unchecked (a state array of another size is an out-of-bounds write)
    model = property(lambda self: self._model, doc="The model this optimizer updates (read-only).")
    t = property(lambda self: self._t, doc="Steps taken (read-only; ``load_state_dict`` restores it).")
    hyper = property(lambda self: ViewMap(self._hyper),
                     doc="Hyperparameters, a read-only mapping (``lr`` is assignable on its own).")
    state = property(lambda self: ViewMap(self._state),
                     doc="State arrays laid out like ``model.flat`` (read-only mapping; write in place).")

    def __getstate__(self):
        return {"model": self._model, "state_dict": self.state_dict()}

    def __setstate__(self, saved):
        """Rebuild through the constructor and ``load_state_dict``, so a tampered pickle is refused."""
        model, sd = saved["model"], saved["state_dict"]
        if not isinstance(sd, dict) or not isinstance(sd.get("hyper"), dict):
            raise ValueError("a pickled optimizer must hold a state_dict() with its hyperparameters")
        fresh = type(self)(model, **sd["hyper"])
        vars(self).update(vars(fresh))
        self.load_state_dict(sd)

    @property
    def lr(self):
        """The learning rate (assignable, e.g. for a schedule)."""
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value):
        self._hyper["lr"] = number(value, "lr", low=0.0, low_open=True)

    def step(self, grad):
        """Update ``model.flat`` in place from the flat gradient.

        Parameters
        ----------
        grad : ndarray (n_params,) of the model's dtype, or Workspace
            ``workspace.grad_flat`` after ``loss_and_grad`` (only read).
        """
        grad = _grad_buffer(grad, writable=False)
        flat = self._model.flat
        if grad.shape != flat.shape or grad.dtype != flat.dtype:
            raise ValueError(f"grad must have shape {flat.shape} and dtype {flat.dtype} like model.flat, "
                             f"got shape {grad.shape} and dtype {grad.dtype}")
        if not flat.flags.writeable:
            raise ValueError("model.flat is read-only (its flags.writeable was set to False); "
                             "set model.flat.flags.writeable = True")
        for name, value in self._state.items():   # what the kernel writes: exactly model.flat's layout
            if (value.shape != flat.shape or value.dtype != flat.dtype or not value.flags.c_contiguous
                    or not value.flags.writeable):
                raise ValueError(f"optimizer state {name!r} no longer matches model.flat (shape "
                                 f"{value.shape}, dtype {value.dtype}); make a new optimizer or "
                                 f"load_state_dict() a saved one")
        self._t += 1
        self._update(flat, grad)

    def _update(self, p, g):  # pragma: no cover - abstract
        raise NotImplementedError

    def _warm_up(self):
        """Compile the kernel for this dtype (on scratch arrays), so timing excludes it."""
        saved = self._model, self._state, self._t
        scratch = RNN(1, 1, 1, bias=False, dtype=self._model.dtype)
        try:
            self._model, self._t = scratch, 0
            self._state = {name: np.zeros_like(scratch.flat) for name in self._state_names}
            self.step(np.zeros_like(scratch.flat))
        finally:
            self._model, self._state, self._t = saved

    def state_dict(self):
        """Name, hyperparameters, step count and state arrays (copies)."""
        return {"name": self.name, "hyper": dict(self._hyper), "t": self._t,
                "state": {k: v.copy() for k, v in self._state.items()}}

    def load_state_dict(self, sd):
        """Restore what ``state_dict`` returned (from this kind of optimizer, for this model's size).

        Everything is checked before anything changes: a ``ValueError`` names what does
        not fit (name, step count, hyperparameters, state arrays).
        """
        if not isinstance(sd, dict):
            raise TypeError(f"sd must be a dict from state_dict(), got {type(sd).__name__}")
        if sd.get("name") != self.name:
            raise ValueError(f"state is for optimizer {sd.get('name')!r}, not {self.name!r}")
        t = _check_steps(sd.get("t"))
        hyper = sd.get("hyper")
        if not isinstance(hyper, dict):
            raise ValueError(f"hyper must be a dict of hyperparameters, got {hyper!r}")
        try:
            hyper = type(self)._check_hyper(**hyper)
        except TypeError as exc:        # an unknown or missing name, or a value that is not a number
            raise ValueError(f"hyperparameters {hyper!r} do not fit {type(self).__name__}: {exc}") from None
        self._check_compatible(hyper)
        state = sd.get("state")
        if not isinstance(state, dict) or set(state) != set(self._state_names):
            got = sorted(state) if isinstance(state, dict) else state
            raise ValueError(f"state must hold {sorted(self._state_names)}, got {got}")
        for k, v in state.items():
            if isinstance(v, np.ma.MaskedArray):
                raise TypeError(f"optimizer state {k!r} is a masked array; pass .filled(0.0)")
            v = np.asarray(v)
            if v.shape != self._model.flat.shape or v.dtype != self._model.flat.dtype:
                raise ValueError(f"optimizer state {k!r} has shape {v.shape} and dtype {v.dtype}, "
                                 f"but the model needs {self._model.flat.shape} and {self._model.flat.dtype}")
        self._hyper = hyper
        self._t = int(t)
        for k, v in state.items():
            self._state[k][...] = v

    def _check_compatible(self, hyper):
        """Refuse a state whose hyperparameters need other state arrays than this optimizer has."""

    @staticmethod
    def _check_hyper(**hyper):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent, with optional momentum (d2l's ``sgd`` when momentum = 0).

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    lr : float > 0
    momentum : float in [0, 1)
        μ; the velocity follows ``torch.optim.SGD`` (v ← μv + g, p ← p - lr·v).
    """

    name = "sgd"

    def __init__(self, model, lr, momentum=0.0):
        super().__init__(model, **self._check_hyper(lr=lr, momentum=momentum))

    @property
    def _state_names(self):
        return self.state_names_for(self._hyper)

    @classmethod
    def state_names_for(cls, hyper):
        return ("velocity",) if hyper["momentum"] > 0 else ()

    @staticmethod
    def _check_hyper(lr, momentum=0.0):
        return {"lr": number(lr, "lr", low=0.0, low_open=True),
                "momentum": number(momentum, "momentum", low=0.0, high=1.0, high_open=True)}

    def _check_compatible(self, hyper):
        if (hyper["momentum"] > 0) != (self._hyper["momentum"] > 0):
            raise ValueError(f"state is for SGD with momentum={hyper['momentum']}, but this one has "
                             f"momentum={self._hyper['momentum']}")

    def _update(self, p, g):
        h = self._hyper
        if h["momentum"] > 0:
            _sgd_momentum(p, g, self._state["velocity"], h["lr"], h["momentum"])
        else:
            _sgd(p, g, h["lr"])


class Adagrad(Optimizer):
    """Adagrad as in Karpathy's min-char-rnn: G ← G + g², p ← p - lr·g/√(G + ε).

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    lr : float > 0
        min-char-rnn uses 0.1.
    eps : float > 0
        Inside the square root, as in min-char-rnn.
    """

    name = "adagrad"
    _state_names = ("sum_squares",)

    def __init__(self, model, lr=0.1, eps=1e-8):
        super().__init__(model, **self._check_hyper(lr=lr, eps=eps))

    @staticmethod
    def _check_hyper(lr, eps=1e-8):
        return {"lr": number(lr, "lr", low=0.0, low_open=True),
                "eps": number(eps, "eps", low=0.0, low_open=True)}

    def _update(self, p, g):
        _adagrad(p, g, self._state["sum_squares"], self._hyper["lr"], self._hyper["eps"])


class Adam(Optimizer):
    """Adam (Kingma & Ba), as ``torch.optim.Adam``; ``weight_decay`` adds λ·p to the gradient.

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    lr : float > 0
    betas : (float, float), each in [0, 1)
    eps : float > 0
    weight_decay : float >= 0
        λ.
    """

    name = "adam"
    _state_names = ("exp_avg", "exp_avg_sq")
    _coupled = True

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(model, **self._check_hyper(lr=lr, betas=betas, eps=eps,
                                                    weight_decay=weight_decay))

    @staticmethod
    def _check_hyper(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        return {"lr": number(lr, "lr", low=0.0, low_open=True),
                "betas": (number(betas[0], "betas[0]", low=0.0, high=1.0, high_open=True),
                          number(betas[1], "betas[1]", low=0.0, high=1.0, high_open=True)),
                "eps": number(eps, "eps", low=0.0, low_open=True),
                "weight_decay": number(weight_decay, "weight_decay", low=0.0)}

    def _update(self, p, g):
        h = self._hyper
        b1, b2 = h["betas"]
        c1, c2 = 1.0 - b1 ** self._t, 1.0 - b2 ** self._t
        _adam(p, g, self._state["exp_avg"], self._state["exp_avg_sq"], h["lr"], b1, b2, h["eps"],
              c1, c2, h["weight_decay"], self._coupled)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``:
    p ← p·(1 - lr·λ) before the Adam step. Parameters as ``Adam``; λ defaults to 0.01."""

    name = "adamw"
    _coupled = False

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


OPTIMIZERS = {"sgd": SGD, "momentum": SGD, "adagrad": Adagrad, "adam": Adam, "adamw": AdamW}
"""Names accepted by ``make_optimizer`` (``"momentum"`` is SGD with momentum 0.9 by default)."""


def make_optimizer(name, model, lr, **kwargs):
    """An optimizer by name: ``"sgd"``, ``"momentum"``, ``"adagrad"``, ``"adam"`` or ``"adamw"``.

    Extra keyword arguments go to the class (``"momentum"`` sets ``momentum=0.9`` unless given).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    if name == "momentum":
        kwargs.setdefault("momentum", 0.9)
    return OPTIMIZERS[name](model, lr, **kwargs)


def check_config(name, hyper, t):
    """Check a saved optimizer's name, hyperparameters and step count without building it.

    Returns
    -------
    tuple of str
        The names of the state arrays that optimizer keeps.

    Raises
    ------
    ValueError
        Naming what does not fit.
    """
    cls = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam, "adamw": AdamW}.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}")
    _check_steps(t)
    if not isinstance(hyper, dict):
        raise ValueError(f"hyper must be a dict of hyperparameters, got {hyper!r}")
    try:
        hyper = cls._check_hyper(**hyper)
    except TypeError as exc:
        raise ValueError(f"hyperparameters {hyper!r} do not fit {cls.__name__}: {exc}") from None
    return cls.state_names_for(hyper)


def optimizer_from_state_dict(model, sd):
    """Build the optimizer ``sd`` (from ``state_dict``) describes, bound to ``model``, and restore it."""
    if not isinstance(sd, dict):
        raise TypeError(f"sd must be a dict from state_dict(), got {type(sd).__name__}")
    cls = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam, "adamw": AdamW}.get(sd.get("name"))
    if cls is None:
        raise ValueError(f"unknown optimizer {sd.get('name')!r}")
    hyper = sd.get("hyper")
    if not isinstance(hyper, dict):
        raise ValueError(f"hyper must be a dict of hyperparameters, got {hyper!r}")
    try:
        opt = cls(model, **hyper)
    except TypeError as exc:
        if not isinstance(model, RNNBase):
            raise
        raise ValueError(f"hyperparameters {hyper!r} do not fit {cls.__name__}: {exc}") from None
    opt.load_state_dict(sd)
    return opt
