"""The cells of the test matrix (tests/test_cells.py): one entry per cell, so a test is written once.

Each ``Cell`` knows how to build a model of given sizes with large-ish random weights,
how to run its plain-NumPy reference (``fastbptt.reference`` for the Elman cell,
``fastbptt.reference_cells`` for the GRU and LSTM) in float64, how to make a random
initial state (the LSTM's is the pair (h0, c0)), and how to map its weights to and from
PyTorch's modules. The comparisons handle paired states.

The model classes are looked up on ``fastbptt`` when used, not at import, so the matrix
is collected (and the Elman entries run) before every cell exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import fastbptt
from fastbptt import reference, reference_cells
from helpers import assert_close
from test_reference import numerical_grad  # noqa: F401  (the matrix's central differences)

try:    # an optional oracle: the tests that need it skip when it is missing
    import torch
except ImportError:  # pragma: no cover - torch is in the development environment
    torch = None

SCALE = 0.6          # weights ~ N(0, 0.6²) as helpers.make_problem: φ' and the gates vary
SATURATING = 3.0     # the recurrent layer's weights times 3: gates near 0 or 1, tanh near ±1


@dataclass(frozen=True)
class Cell:
    """How the tests drive one cell."""

    id: str                 # "rnn" | "gru" | "lstm": model.cell, the key of fastbptt.CELLS, the test id
    class_name: str         # the model class, an attribute of fastbptt
    gates: int              # G: W_ih is (G·H, D)
    paired: bool            # the state is (h, c)
    torch_name: str         # torch.nn.<torch_name> (whole sequence) and torch.nn.<torch_name>Cell (one step)

    def __repr__(self):
        return self.id

    @property
    def cls(self):
        """The model class (an AttributeError names it while it does not exist)."""
        return getattr(fastbptt, self.class_name)

    # ------------------------------------------------------------------ layout

    def layout(self, D, H, O, bias=True):
        """The documented parameters, (name, shape) in order: the recurrent layer's, then the readout's."""
        G = self.gates
        if self.id == "rnn":
            rec = [("W_hx", (H, D)), ("W_hh", (H, H))] + ([("b_h", (H,))] if bias else [])
        else:
            rec = [("W_ih", (G * H, D)), ("W_hh", (G * H, H))]
            rec += [("b_ih", (G * H,)), ("b_hh", (G * H,))] if bias else []
        return rec + [("W_qh", (O, H))] + ([("b_q", (O,))] if bias else [])

    def recurrent(self, model):
        """Names of the recurrent layer's parameters (what ``layer_backward`` computes)."""
        return [name for name in model.params if name not in ("W_qh", "b_q")]

    @property
    def input_weight(self):
        return "W_hx" if self.id == "rnn" else "W_ih"

    # ------------------------------------------------------------------ models and data

    def build(self, D, H, O, bias=True, dtype=np.float64, seed=0, saturating=False):
        """A model whose every parameter is drawn from N(0, 0.6²); ``saturating`` multiplies the
        recurrent layer's by 3 (the readout keeps 0.6, so the loss stays of order 1)."""
        model = self.cls(D, H, O, bias=bias, dtype=dtype, seed=seed)
        rng = np.random.default_rng(seed)
        rec = set(self.recurrent(model))
        for name, p in model.params.items():
            s = SCALE * (SATURATING if saturating and name in rec else 1.0)
            p[...] = rng.normal(0.0, s, size=p.shape)
        return model

    def random_state(self, rng, B, H, dtype=np.float64):
        """h0 (B, H), or the pair (h0, c0) for the LSTM."""
        h = rng.normal(size=(B, H)).astype(dtype)
        return (h, rng.normal(size=(B, H)).astype(dtype)) if self.paired else h

    # ------------------------------------------------------------------ the reference, in float64

    def params64(self, model):
        """The model's parameters as float64 copies; the GRU/LSTM reference gets zero biases when
        the model has none (their gradients are dropped again by ``reference``)."""
        p = {k: np.array(v, dtype=np.float64) for k, v in model.params.items()}
        if self.id != "rnn" and not model.bias:
            GH, H = p["W_hh"].shape
            p.update(b_ih=np.zeros(GH), b_hh=np.zeros(GH), b_q=np.zeros(p["W_qh"].shape[0]))
        return p

    def reference(self, model, X, Y, state0=None, loss="cross_entropy", carry=None):
        """The reference's (loss, grads, state_T, dstate0, dX) in float64, grads keyed like model.params."""
        p = self.params64(model)
        X, Y = _as64(X), _as64(Y)
        state0 = cast_state(state0, np.float64)
        carry = None if carry is None else np.asarray(carry, np.float64)
        if self.id == "rnn":
            return reference.loss_and_grad(p, X, Y, state0, model.activation, loss, carry)
        L, grads, state_T, dstate0, dX = reference_cells.loss_and_grad(p, X, Y, state0, self.id, loss, carry)
        return L, {k: grads[k] for k in model.params}, state_T, dstate0, dX

    def states(self, model, X, state0=None):
        """The reference's states s_0 .. s_T (each h, or (h, c)), in float64."""
        p = self.params64(model)
        X = _as64(X)
        T, B = X.shape[:2]
        H = model.hidden_size
        D = model.input_size
        if X.ndim == 2:
            X = np.eye(D)[X]
        zeros = np.zeros((B, H))
        state = cast_state(state0, np.float64)
        if state is None:
            state = (zeros, zeros.copy()) if self.paired else zeros
        out = [state]
        for t in range(T):
            if self.id == "rnn":
                phi = reference.PHI[model.activation][0]
                state = phi(X[t] @ p["W_hx"].T + state @ p["W_hh"].T + p.get("b_h", 0))
            elif self.id == "gru":
                state, _ = reference_cells.gru_step(X[t], state, p)
            else:
                state, _ = reference_cells.lstm_step(X[t], state, p)
            out.append(state)
        return out

    def hidden(self, model, X, state0=None):
        """The reference's (H_all (T, B, H), state_T) in float64."""
        s = self.states(model, X, state0)
        return np.stack([h_of(x) for x in s[1:]]), s[-1]

    def outputs(self, model, X, state0=None):
        """The reference's outputs o_1 .. o_T (T, B, O) in float64."""
        H_all, _ = self.hidden(model, X, state0)
        p = self.params64(model)
        return H_all @ p["W_qh"].T + p.get("b_q", 0)

    def reference_with_dO(self, model, X, state0, dO, carry=None):
        """The reference's (loss, grads, state_T, dstate0, dX) for an arbitrary ∂L/∂o.

        The mean squared error has ∂L/∂o = 2 (O - Y) / O.size, so the targets
        Y = O - O.size · dO / 2 make the reference's mse loss have exactly the gradient dO.
        """
        O = self.outputs(model, X, state0)
        Y = O - O.size * np.asarray(dO, np.float64) / 2
        return self.reference(model, X, Y, state0, "mse", carry)

    def hidden_grads(self, model, X, Y, state0=None, loss="cross_entropy"):
        """∂L/∂h_t for t = 1 .. T (T, B, H) from the reference, without a backward of its own:

        L seen from the state s_t is the readout's term of step t plus (T - t)/T times the
        mean loss of steps t+1 .. T run from s_t, whose ∂/∂h_0 the reference gives (for the
        LSTM, with c_t held: the partial derivative in the state (h_t, c_t)).
        """
        T = X.shape[0]
        s = self.states(model, X, state0)
        O = self.outputs(model, X, state0)
        _, dO = reference.loss_and_output_grad(O, _as64(Y), loss)
        W_qh = self.params64(model)["W_qh"]
        out = np.zeros((T,) + h_of(s[0]).shape)
        for t in range(1, T + 1):
            out[t - 1] = dO[t - 1] @ W_qh
            if t < T:
                ds = self.reference(model, X[t:], Y[t:], s[t], loss)[3]
                out[t - 1] += (T - t) / T * h_of(ds)
        return out

    def saturation(self, model, X, state0=None):
        """The share of gate values (tanh of the Elman cell) whose derivative is under 10 % of its
        largest (σ' < 0.025, tanh' < 0.1): large under ``saturating``."""
        p = self.params64(model)
        X = _as64(X)
        if X.ndim == 2:
            X = np.eye(model.input_size)[X]
        s = self.states(model, X, state0)
        small = []
        for t in range(X.shape[0]):
            if self.id == "rnn":
                small.append(1 - s[t + 1] ** 2 < 0.1)
                continue
            step = reference_cells.gru_step if self.id == "gru" else reference_cells.lstm_step
            _, cache = step(X[t], s[t], p)
            if self.id == "gru":
                _, _, r, z, n, _ = cache
                sig, tanh = [r, z], [n]
            else:
                _, _, _, i, f, g, o, _ = cache
                sig, tanh = [i, f, o], [g]
            small += [v * (1 - v) < 0.025 for v in sig] + [1 - v ** 2 < 0.1 for v in tanh]
        return float(np.mean(np.concatenate([a.ravel() for a in small])))

    # ------------------------------------------------------------------ PyTorch

    def torch_layer(self, D, H, bias, rng, scale=SCALE):
        """A float64 torch.nn.RNN/GRU/LSTM with every weight drawn from N(0, scale²)."""
        kwargs = {"nonlinearity": "tanh"} if self.id == "rnn" else {}
        layer = getattr(torch.nn, self.torch_name)(D, H, bias=bias, dtype=torch.float64, **kwargs)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.from_numpy(rng.normal(0.0, scale, size=tuple(p.shape))))
        return layer

    def load_from_torch(self, model, layer):
        """Copy a torch layer's weights into ``model.params`` one to one (the documented mapping):
        W_ih <- weight_ih_l0 ...; for the Elman cell W_hx <- weight_ih_l0, b_h <- bias_ih_l0 + bias_hh_l0."""
        def get(name):
            return getattr(layer, name).detach().numpy()
        if self.id == "rnn":
            model.params["W_hx"][...] = get("weight_ih_l0")
            model.params["W_hh"][...] = get("weight_hh_l0")
            if model.bias:
                model.params["b_h"][...] = get("bias_ih_l0") + get("bias_hh_l0")
        else:
            model.params["W_ih"][...] = get("weight_ih_l0")
            model.params["W_hh"][...] = get("weight_hh_l0")
            if model.bias:
                model.params["b_ih"][...] = get("bias_ih_l0")
                model.params["b_hh"][...] = get("bias_hh_l0")

    def torch_grads(self, module, suffix="_l0"):
        """The recurrent gradients of a torch layer (suffix "_l0") or cell (suffix ""), keyed like model.params."""
        def grad(name):
            p = getattr(module, name + suffix, None)
            return None if p is None else p.grad.numpy()
        if self.id == "rnn":
            out = {"W_hx": grad("weight_ih"), "W_hh": grad("weight_hh"), "b_h": grad("bias_ih")}
        else:
            out = {"W_ih": grad("weight_ih"), "W_hh": grad("weight_hh"),
                   "b_ih": grad("bias_ih"), "b_hh": grad("bias_hh")}
        return {k: v for k, v in out.items() if v is not None}

    def torch_cell(self, model):
        """A float64 torch.nn.RNNCell/GRUCell/LSTMCell with the model's recurrent weights."""
        p = self.params64(model)
        kwargs = {"nonlinearity": "tanh"} if self.id == "rnn" else {}
        cell = getattr(torch.nn, self.torch_name + "Cell")(model.input_size, model.hidden_size,
                                                           bias=model.bias, dtype=torch.float64, **kwargs)
        names = {"weight_ih": self.input_weight, "weight_hh": "W_hh"}
        if model.bias:
            names.update(bias_ih="b_h" if self.id == "rnn" else "b_ih",
                         bias_hh=None if self.id == "rnn" else "b_hh")
        with torch.no_grad():
            for theirs, mine in names.items():
                value = getattr(cell, theirs)
                value.copy_(torch.zeros_like(value) if mine is None else torch.from_numpy(p[mine]))
        return cell


CELLS = [
    Cell("rnn", "RNN", 1, False, "RNN"),
    Cell("gru", "GRU", 3, False, "GRU"),
    Cell("lstm", "LSTM", 4, True, "LSTM"),
]
BY_ID = {cell.id: cell for cell in CELLS}


# ---------------------------------------------------------------------- problems


def make_problem(cell, T=5, B=3, D=4, H=6, O=5, bias=True, loss="cross_entropy", inputs="dense",
                 dtype=np.float64, seed=0, h0=True, saturating=False):
    """A model of ``cell`` and a random batch, like helpers.make_problem. Returns (model, X, Y, state0)."""
    model = cell.build(D, H, O, bias=bias, dtype=dtype, seed=seed, saturating=saturating)
    rng = np.random.default_rng(seed + 1000)
    X = rng.normal(size=(T, B, D)).astype(dtype) if inputs == "dense" else rng.integers(0, D, size=(T, B))
    Y = rng.integers(0, O, size=(T, B)) if loss == "cross_entropy" else rng.normal(size=(T, B, O)).astype(dtype)
    state0 = cell.random_state(rng, B, H, dtype) if h0 else None
    return model, X, Y, state0


CARRY_VALUES = (0.0, 1 / 0.7, 1 / np.pi)   # cuts, and 1/p weights of randomized truncation


def make_carry(kind, T, B, dtype=np.float64, seed=0):
    """None, or carry weights of shape (T,) ("T") or (T, B) ("TB") from {0, 1/0.7, 1/π},
    with a cut (0) at step 1 and none at step 0 (so ∂L/∂state_0 is not all zero)."""
    if kind is None:
        return None
    rng = np.random.default_rng(seed + 7)
    shape = (T,) if kind == "T" else (T, B)
    c = rng.choice(CARRY_VALUES, size=shape)
    c[0] = 1 / np.pi
    if T > 1:
        c[1] = 0.0
    return c.astype(dtype)


# ---------------------------------------------------------------------- states


def halves(state):
    """The arrays of a state: [h], or [h, c] (as a list, in order)."""
    return [state] if isinstance(state, np.ndarray) else list(state)


def h_of(state):
    """h of a state h or (h, c)."""
    return state if isinstance(state, np.ndarray) else state[0]


def cast_state(state, dtype):
    """A state (None, h or (h, c)) as new arrays of ``dtype``."""
    if state is None:
        return None
    if isinstance(state, np.ndarray):
        return state.astype(dtype)
    return tuple(np.asarray(s).astype(dtype) for s in state)


def copy_state(state):
    """A copy of a state (None, h or (h, c)), same dtype."""
    if state is None or isinstance(state, np.ndarray):
        return None if state is None else state.copy()
    return tuple(np.array(s, copy=True) for s in state)


def state_arrays(cell, state, name="state"):
    """The arrays of a state returned by fastbptt, after checking its form: an ndarray, or for
    the LSTM a tuple of two (h, c)."""
    if cell.paired:
        assert isinstance(state, tuple) and len(state) == 2, (
            f"{name} of the {cell.id} must be a pair (h, c), got {type(state).__name__}")
        assert all(isinstance(s, np.ndarray) for s in state), f"{name}: both halves must be arrays"
        return list(state)
    assert isinstance(state, np.ndarray), f"{name} of the {cell.id} must be an array, got {type(state).__name__}"
    return [state]


def assert_state_close(cell, name, got, want, dtype):
    """assert_close for every half of a state (want as the reference returns it)."""
    want = [want] if isinstance(want, np.ndarray) else list(want)
    got = state_arrays(cell, got, name)
    assert len(got) == len(want), f"{name}: {len(got)} arrays, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"{name}[{i}]", g, w, dtype)


def assert_grads_close(got, want, dtype, names=None):
    """assert_close for every gradient in ``names`` (default: every key of ``want``), keys checked."""
    names = list(want) if names is None else names
    for name in names:
        assert name in got, f"gradient {name!r} missing; got {sorted(got)}"
        assert_close(f"grads[{name!r}]", got[name], want[name], dtype)


# ---------------------------------------------------------------------- finite differences


def assert_fd_close(name, got, want, rtol=1e-6):
    """Against central differences (error ~1e-9 at eps 1e-6): relative to the largest |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-3)
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= rtol * scale, f"{name}: max abs error {err:.3e} against finite differences (scale {scale:.3e})"


def _as64(a):
    a = np.asarray(a)
    return a if a.dtype.kind in "iu" else a.astype(np.float64)
