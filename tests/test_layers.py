"""Issue 9: stacks, bidirectional layers, sequences of different lengths, loss weights, dropout.

The oracle is ``fastbptt.core.reference_layers`` (plain NumPy, every sequence run alone),
itself checked here against central finite differences and the one-layer references, and
in tests/test_layers_torch.py against PyTorch's packed nn.RNN/GRU/LSTM. fastbptt is then
compared with it for every cell, 1-3 layers, one or two directions, with and without
lengths and loss weights, both losses, token and dense inputs, both methods, float64 to
1e-10 and float32 loosely; ``forward``/``backward`` and ``layer_forward``/``layer_backward``;
parallel bitwise serial; dropout masks; each sequence alone; padding never read; PyTorch
directly; hypothesis over the shapes (when installed).

Padding (t >= lengths[b]) holds NaN inputs, out-of-range ids and targets throughout.
"""

import numpy as np
import pytest

import fastbptt
from fastbptt.core import reference, reference_cells
from fastbptt.core import reference_layers as RL
from helpers import assert_close
from test_layers_torch import CASES, assert_same_result, random_problem, torch_loss_and_grad
from cells_registry import assert_fd_close
from test_reference import numerical_grad

try:    # an optional extra: its test skips without it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

CELLS = ["rnn", "gru", "lstm"]
per_cell = pytest.mark.parametrize("cell", CELLS)
METHODS = ["fused", "blas"]


def parts(state, cell):
    """A state's arrays as a tuple: (h,) or (h, c)."""
    return tuple(state) if cell == "lstm" else (state,)


def join(arrays, cell):
    return tuple(arrays) if cell == "lstm" else arrays[0]


# ============================================================================ the reference itself


@per_cell
@pytest.mark.parametrize("inputs,loss", [("dense", "cross_entropy"), ("tokens", "mse")])
def test_reference_one_layer_is_the_cell_reference(cell, inputs, loss):
    """One layer, one direction, no lengths: exactly fastbptt.reference / reference_cells, carry included."""
    params, X, Y, state0, kw = random_problem(cell, T=5, B=3, D=4, H=3, O=4, num_layers=1, dirs=1, seed=1,
                                              lengths="full", loss=loss, inputs=inputs)
    s0 = join([p[0] for p in parts(state0, cell)], cell)
    carry = np.random.default_rng(2).uniform(0, 1.5, size=(5, 3))
    got = RL.loss_and_grad(params, X, Y, s0, carry=carry, **kw)
    if cell == "rnn":
        want = reference.loss_and_grad(params, X, Y, s0, "tanh", loss, carry)
    else:
        want = reference_cells.loss_and_grad(params, X, Y, s0, cell, loss, carry)
    assert_same_result(got, want, cell, 1, 1)
    assert np.shape(parts(got[2], cell)[0]) == (3, 3)          # (B, H) for one layer and direction


def _fd_check(params, X, state0, f, got, cell):
    """Central differences of f() in every parameter, the state and the valid inputs against got."""
    _, grads, _, dstate0, dX = got
    assert sorted(grads) == sorted(params)
    for name, value in params.items():
        assert_fd_close(f"d{name}", grads[name], numerical_grad(f, value))
    for i, (s, ds) in enumerate(zip(parts(state0, cell), parts(dstate0, cell))):
        assert_fd_close(f"dstate0[{i}]", ds, numerical_grad(f, s))
    if X.ndim == 3:                    # f reads X: padding positions must get 0 both ways
        assert_fd_close("dX", dX, numerical_grad(f, X))


@per_cell
@pytest.mark.parametrize("num_layers,dirs,loss", [(2, 2, "cross_entropy"), (3, 1, "mse")])
def test_reference_matches_finite_differences(cell, num_layers, dirs, loss):
    """Ragged lengths, loss weights, dropout masks, a given state: every gradient by central differences."""
    params, X, Y, state0, kw = random_problem(cell, T=4, B=3, D=2, H=2, O=3, num_layers=num_layers, dirs=dirs,
                                              seed=3 + num_layers, loss=loss, weights=True, dropout=0.3)
    X = np.nan_to_num(X)               # differences move padding inputs too: they must change nothing

    def f():
        return RL.loss_and_grad(params, X, Y, state0, **kw)[0]

    _fd_check(params, X, state0, f, RL.loss_and_grad(params, X, Y, state0, **kw), cell)


@per_cell
def test_reference_layers_backward_matches_finite_differences_with_state_gradients(cell):
    """layers_backward from ∂L/∂H and ∂L/∂state_T: L = Σ H ⊙ R + Σ state_T ⊙ S."""
    params, X, _, state0, kw = random_problem(cell, T=4, B=3, D=2, H=2, O=3, num_layers=2, dirs=2, seed=4)
    for key in ("loss",):
        kw.pop(key)
    X = np.nan_to_num(X)
    rng = np.random.default_rng(5)
    R = rng.normal(size=(4, 3, 4))
    S = tuple(rng.normal(size=s.shape) for s in parts(state0, cell))

    def f():
        H, sT, _ = RL.layers_forward(params, X, state0, **kw)
        return np.sum(H * R) + sum(np.sum(a * s) for a, s in zip(parts(sT, cell), S))

    _, _, tape = RL.layers_forward(params, X, state0, **kw)
    grads, dX, dstate0 = RL.layers_backward(params, tape, R, join(S, cell))
    _fd_check({k: v for k, v in params.items() if k not in ("W_qh", "b_q")}, X, state0, f,
              (None, grads, None, dstate0, dX), cell)


@per_cell
def test_reference_stack_with_carry_is_one_layer_sweeps_composed(cell):
    """Carry weighs every layer's sweep: a 2-layer stack equals two one-layer runs, the upper one's
    ∂L/∂X fed to the lower one as its ∂L/∂H (ragged lengths, carry per step and sequence)."""
    T, B = 5, 3
    params, X, Y, state0, kw = random_problem(cell, T=T, B=B, D=3, H=3, O=4, num_layers=2, dirs=1, seed=6)
    carry = np.random.default_rng(7).choice([0.0, 0.5, 1.0, 1.7], size=(T, B))
    got = RL.loss_and_grad(params, X, Y, state0, carry=carry, **kw)

    def layer(k):
        return {n: params[f"{n}_l{k}"] for n in RL.local_names(cell)}
    s = [join([p[k] for p in parts(state0, cell)], cell) for k in range(2)]
    one = dict(cell=cell, lengths=kw["lengths"])
    H0, sT0, tape0 = RL.layers_forward(layer(0), X, s[0], **one)
    top = {**layer(1), "W_qh": params["W_qh"], "b_q": params["b_q"]}
    L, g1, sT1, ds1, dH0 = RL.loss_and_grad(top, H0, Y, s[1], loss=kw["loss"], carry=carry, **one)
    g0, dX, ds0 = RL.layers_backward(layer(0), tape0, dH0, carry=carry)
    want_grads = {**{f"{n}_l0": v for n, v in g0.items()}, **{f"{n}_l1": v for n, v in g1.items()
                                                              if n in RL.local_names(cell)},
                  "W_qh": g1["W_qh"], "b_q": g1["b_q"]}
    stack = lambda a, b: join([np.stack([x, y]) for x, y in zip(parts(a, cell), parts(b, cell))], cell)  # noqa
    assert_same_result(got, (L, want_grads, stack(sT0, sT1), stack(ds0, ds1), dX), cell, 2, 1)
    # and the carry matters
    assert not np.allclose(RL.loss_and_grad(params, X, Y, state0, **kw)[1]["W_hh_l0"], got[1]["W_hh_l0"])


@per_cell
def test_reference_never_reads_padding(cell):
    params, X, Y, state0, kw = random_problem(cell, T=5, B=3, D=3, H=2, O=3, num_layers=2, dirs=2, seed=8,
                                              inputs="tokens", weights=True)
    clean_X, clean_Y = X.copy(), Y.copy()
    valid = np.arange(5)[:, None] < kw["lengths"][None, :]
    clean_X[~valid], clean_Y[~valid] = 0, 0
    kw["loss_weights"][~valid] = np.nan
    got = RL.loss_and_grad(params, X, Y, state0, **kw)
    assert_same_result(got, RL.loss_and_grad(params, clean_X, clean_Y, state0, **kw), cell, 2, 2)
    assert np.all(got[4][~valid] == 0)


# ============================================================================ fastbptt against the reference


def model_for(params, cell, num_layers, dirs, dtype=np.float64, dropout=0.0, activation="tanh"):
    """A fastbptt model holding ``params`` (named and ordered as it names its own, checked)."""
    s0 = RL.suffix(0, 0, num_layers, dirs)
    H, D = params["W_hh" + s0].shape[1], params[("W_hx" if cell == "rnn" else "W_ih") + s0].shape[1]
    O = params["W_qh"].shape[0]
    kwargs = {"activation": activation} if cell == "rnn" else {}
    model = fastbptt.CELLS[cell](D, H, O, bias="b_q" in params, dtype=dtype, seed=0, num_layers=num_layers,
                                 bidirectional=dirs == 2, dropout=dropout, **kwargs)
    assert list(model.params) == list(params), "the model's parameter names or order"
    for name, value in params.items():
        model.params[name][...] = value
    return model


def model_state(state, cell, num_layers, dirs, dtype=np.float64):
    """random_problem's (L·dirs, B, H) state in the model's format: (B, H) for one layer and direction."""
    if state is None:
        return None
    arrays = [np.asarray(p, dtype) for p in parts(state, cell)]
    if num_layers == 1 and dirs == 1:
        arrays = [a[0] for a in arrays]
    return join(arrays, cell)


def as64(a):
    return a if a is None or a.dtype.kind in "iu" else a.astype(np.float64)


def copied(result):
    """Deep copies of a result tuple (the library returns views into its workspace)."""
    out = []
    for r in result:
        if isinstance(r, dict) or hasattr(r, "items"):
            out.append({k: np.array(v) for k, v in r.items()})
        elif isinstance(r, tuple):
            out.append(tuple(np.array(x) for x in r))
        elif r is None:
            out.append(None)
        else:
            out.append(np.array(r) if np.ndim(r) else float(r))
    return tuple(out)


class Setup:
    """A problem for both fastbptt (model, its dtype) and the reference (float64 copies)."""

    def __init__(self, cell, num_layers, dirs, dtype=np.float64, *, T=6, B=4, D=3, H=4, O=5, seed=0,
                 lengths="ragged", loss="cross_entropy", inputs="dense", weights=False, h0=True, dropout=0.0,
                 activation="tanh", bias=True):
        self.cell, self.L, self.dirs, self.dtype = cell, num_layers, dirs, dtype
        self.params, X, Y, state0, self.kw = random_problem(
            cell, T=T, B=B, D=D, H=H, O=O, num_layers=num_layers, dirs=dirs, seed=seed, lengths=lengths,
            loss=loss, inputs=inputs, weights=weights, h0=h0, bias=bias)
        self.activation = activation
        self.model = model_for(self.params, cell, num_layers, dirs, dtype, dropout, activation)
        self.X = X if X.dtype.kind in "iu" else X.astype(dtype)
        self.Y = Y if Y.dtype.kind in "iu" else Y.astype(dtype)
        self.state0 = model_state(state0, cell, num_layers, dirs, dtype)
        self.loss = loss
        self.valid = np.arange(T)[:, None] < (np.full(B, T) if self.kw["lengths"] is None
                                                else self.kw["lengths"])[None, :]

    @property
    def params64(self):
        return {k: np.array(v, np.float64) for k, v in self.model.params.items()}

    @property
    def state64(self):
        return None if self.state0 is None else join([as64(p) for p in parts(self.state0, self.cell)], self.cell)

    def core_kw(self):
        return {k: self.kw.get(k) for k in ("lengths", "loss_weights")}

    def reference(self, masks=None, carry=None):
        kw = dict(self.kw, masks=masks, carry=carry, activation=self.activation)
        return RL.loss_and_grad(self.params64, as64(self.X), as64(self.Y), self.state64, **kw)

    def core(self, **extra):
        extra.setdefault("return_dh0", True)
        extra.setdefault("return_dX", True)
        return copied(fastbptt.loss_and_grad(self.model, self.X, self.Y, self.state0, self.loss,
                                             **self.core_kw(), **extra))

    def check(self, got, want, what=""):
        assert_same_result(got, want, self.cell, self.L, self.dirs, self.dtype, what)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dirs", [1, 2])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@per_cell
def test_loss_and_grad_against_reference(cell, num_layers, dirs, case, method):
    lengths, inputs, loss, weights = CASES[case]
    s = Setup(cell, num_layers, dirs, seed=num_layers * 10 + dirs, lengths=lengths, inputs=inputs, loss=loss,
              weights=weights, h0=case != "ragged-tokens-ce")
    s.check(s.core(method=method), s.reference())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["ragged-tokens-ce", "ragged-dense-mse-weights"])
@pytest.mark.parametrize("num_layers,dirs", [(2, 2), (3, 1)])
@per_cell
def test_loss_and_grad_float32_against_reference(cell, num_layers, dirs, case, method):
    lengths, inputs, loss, weights = CASES[case]
    s = Setup(cell, num_layers, dirs, np.float32, seed=5, lengths=lengths, inputs=inputs, loss=loss,
              weights=weights)
    s.check(s.core(method=method), s.reference())


@per_cell
@pytest.mark.parametrize("method", METHODS)
def test_stack_with_carry_against_reference(cell, method):
    s = Setup(cell, 2, 1, seed=21, weights=True)
    carry = np.random.default_rng(3).choice([0.0, 0.5, 1.0], size=(6, 4))
    s.check(s.core(method=method, carry=carry), s.reference(carry=carry))
    s.check(s.core(method=method, carry=carry[:, 0]), s.reference(carry=carry[:, 0]), "carry (T,): ")


@pytest.mark.parametrize("cell,activation,bias", [("rnn", "relu", True), ("rnn", "identity", False),
                                                   ("gru", "tanh", False), ("lstm", "tanh", False)])
@pytest.mark.parametrize("method", METHODS)
def test_activations_and_no_bias_against_reference(cell, activation, bias, method):
    s = Setup(cell, 2, 2, seed=24, weights=True, activation=activation, bias=bias)
    s.check(s.core(method=method), s.reference())


def test_carry_refused_for_bidirectional_models():
    s = Setup("gru", 1, 2, seed=22)
    with pytest.raises(ValueError, match="carry"):
        s.core(carry=np.ones(6))


@per_cell
def test_flags_off_return_the_same_values(cell):
    s = Setup(cell, 2, 2, seed=23, weights=True)
    full = s.core()
    short = copied(fastbptt.loss_and_grad(s.model, s.X, s.Y, s.state0, s.loss, **s.core_kw()))
    assert len(short) == 3
    assert short[0] == full[0]
    for name in full[1]:
        assert np.array_equal(short[1][name], full[1][name]), name
    for a, b in zip(parts(short[2], cell), parts(full[2], cell)):
        assert np.array_equal(a, b)
    only_dX = fastbptt.loss_and_grad(s.model, s.X, s.Y, s.state0, s.loss, return_dX=True, **s.core_kw())
    assert len(only_dX) == 4 and np.array_equal(only_dX[3], full[4])


def _reference_from_dO(s, dO, masks=None):
    """The reference's (grads, state_T, dstate0, dX) and outputs for a caller's ∂L/∂o."""
    p = s.params64
    kw = {k: v for k, v in s.kw.items() if k not in ("loss", "loss_weights")}
    O, _ = RL.forward(p, as64(s.X), s.state64, masks=masks, activation=s.activation, **kw)
    Htop, state_T, tape = RL.layers_forward(p, as64(s.X), s.state64, masks=masks, activation=s.activation, **kw)
    dO = np.where(s.valid[:, :, None], dO, 0.0)
    grads, dX, dstate0 = RL.layers_backward(p, tape, dO @ p["W_qh"])
    grads["W_qh"] = np.einsum("tbo,tbh->oh", dO, Htop)
    if "b_q" in p:
        grads["b_q"] = dO.sum(axis=(0, 1))
    return O, (0.0, grads, state_T, dstate0, dX)


@per_cell
@pytest.mark.parametrize("num_layers,dirs,inputs", [(2, 2, "tokens"), (3, 1, "dense"), (1, 2, "dense")])
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_against_reference(cell, num_layers, dirs, inputs, method):
    """forward's outputs (zero at padding), then backward from a caller's ∂L/∂o (NaN at padding: ignored)."""
    s = Setup(cell, num_layers, dirs, seed=31, inputs=inputs)
    ws = fastbptt.Workspace(s.model, 6, 4)
    O, state_T = fastbptt.forward(s.model, s.X, s.state0, lengths=s.kw["lengths"], workspace=ws, method=method)
    O, state_T = np.array(O), copied((state_T,))[0]
    dO = np.random.default_rng(32).normal(size=O.shape)
    dO[~s.valid] = np.nan
    out = copied(fastbptt.backward(s.model, dO, workspace=ws, return_dh0=True, return_dX=True, method=method))
    want_O, want = _reference_from_dO(s, dO)
    assert_close("O", O, want_O, np.float64)
    assert np.all(O[~s.valid] == 0), "outputs at padding are not zero"
    s.check((0.0, out[0], state_T, out[1], out[2]), want)


@per_cell
@pytest.mark.parametrize("num_layers,dirs", [(2, 2), (3, 1), (1, 2), (1, 1)])
@pytest.mark.parametrize("method", METHODS)
def test_layer_forward_backward_against_reference(cell, num_layers, dirs, method):
    """The top layer's output H (zero at padding), then ∂L/∂H and ∂L/∂state_T from outside."""
    s = Setup(cell, num_layers, dirs, seed=41 + num_layers)
    ws = fastbptt.Workspace(s.model, 6, 4)
    Hout, state_T = fastbptt.layer_forward(s.model, s.X, s.state0, lengths=s.kw["lengths"], workspace=ws,
                                           method=method)
    Hout, state_T = np.array(Hout), copied((state_T,))[0]
    rng = np.random.default_rng(42)
    dH = rng.normal(size=Hout.shape)
    dH[~s.valid] = np.nan
    dstate_T = model_state(join([rng.normal(size=(num_layers * dirs, 4, 4)) for _ in parts(s.state0, cell)],
                                cell), cell, num_layers, dirs)
    grads, dX, dstate0 = copied(fastbptt.layer_backward(s.model, dH, dstate_T, workspace=ws, method=method))
    p = s.params64
    kw = {k: v for k, v in s.kw.items() if k not in ("loss", "loss_weights")}
    want_H, want_sT, tape = RL.layers_forward(p, as64(s.X), s.state64, **kw)
    want_g, want_dX, want_ds0 = RL.layers_backward(p, tape, np.nan_to_num(dH), dstate_T)
    assert_close("H", Hout, want_H, np.float64)
    assert Hout.shape == (6, 4, dirs * 4) and np.all(Hout[~s.valid] == 0)
    assert all(np.all(grads[n] == 0) for n in ("W_qh", "b_q")), "the readout's gradients are not zero"
    s.check((0.0, {n: grads[n] for n in want_g}, state_T, dstate0, dX),
            (0.0, want_g, want_sT, want_ds0, want_dX))


@per_cell
@pytest.mark.parametrize("method", METHODS)
def test_layer_api_with_dropout_against_reference(cell, method):
    """layer_forward draws the masks too (training): the reference with ws.dropout_masks() agrees."""
    s = Setup(cell, 3, 2, seed=45, dropout=0.5)
    ws = fastbptt.Workspace(s.model, 6, 4)
    Hout, _ = fastbptt.layer_forward(s.model, s.X, s.state0, lengths=s.kw["lengths"], workspace=ws, method=method)
    Hout = np.array(Hout)
    masks = ws.dropout_masks()
    assert any(np.any(m == 0) for m in masks)
    dH = np.random.default_rng(46).normal(size=Hout.shape)
    grads, dX, dstate0 = copied(fastbptt.layer_backward(s.model, dH, workspace=ws, method=method))
    kw = {k: v for k, v in s.kw.items() if k not in ("loss", "loss_weights")}
    want_H, _, tape = RL.layers_forward(s.params64, as64(s.X), s.state64, masks=masks, **kw)
    want_g, want_dX, want_ds0 = RL.layers_backward(s.params64, tape, dH)
    assert_close("H", Hout, want_H, np.float64)
    s.check((0.0, {n: grads[n] for n in want_g}, None, dstate0, dX), (0.0, want_g, None, want_ds0, want_dX))


@per_cell
@pytest.mark.parametrize("method", METHODS)
def test_realistic_size_against_reference(cell, method):
    """T = 40, B = 13, H = 37, two bidirectional layers, ragged lengths and loss weights, tokens
    (serial: parallel=True is bitwise serial, below, and compiles in minutes for float64 too)."""
    s = Setup(cell, 2, 2, T=40, B=13, D=7, H=37, O=9, seed=47, weights=True, inputs="tokens")
    s.model.flat[...] *= 0.5
    s.check(s.core(method=method), s.reference())


@per_cell
@pytest.mark.parametrize("method", METHODS)
def test_workspace_reused_with_other_lengths(cell, method):
    """One workspace, calls with lengths, without, in another order, all full, and the first again."""
    s = Setup(cell, 2, 2, seed=48, weights=True)
    ws = fastbptt.Workspace(s.model, 6, 4)
    first = s.kw["lengths"]
    s.X, s.Y = np.nan_to_num(s.X), np.where(s.valid if s.Y.ndim == 2 else s.valid[:, :, None], s.Y, 0)
    for lengths in (first, None, first[::-1].copy(), np.full(4, 6), first):
        s.kw["lengths"] = lengths
        s.check(s.core(workspace=ws, method=method), s.reference(), f"lengths={lengths}: ")


@per_cell
def test_caller_arrays_are_left_alone(cell):
    s = Setup(cell, 2, 2, seed=49, weights=True)
    ins = (s.X, s.Y, s.kw["lengths"], s.kw["loss_weights"], *parts(s.state0, cell))
    before = [np.array(a, copy=True) for a in ins]
    s.core()
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, ins))


@per_cell
def test_state_T_fed_back_as_h0_carries_every_layer(cell):
    """Two chunks through one workspace, the first's state_T (views into it) fed back as h0."""
    s = Setup(cell, 2, 2, seed=50, lengths="full")
    kw = {k: v for k, v in s.kw.items() if k != "lengths"}
    ws = fastbptt.Workspace(s.model, 3, 4)
    _, _, state = fastbptt.loss_and_grad(s.model, s.X[:3], s.Y[:3], s.state0, workspace=ws)
    _, _, state = fastbptt.loss_and_grad(s.model, s.X[3:], s.Y[3:], state, workspace=ws)
    want = RL.loss_and_grad(s.params64, s.X[:3], s.Y[:3], s.state64, **kw)[2]
    want = RL.loss_and_grad(s.params64, s.X[3:], s.Y[3:], want, **kw)[2]
    for i, (a, b) in enumerate(zip(parts(state, cell), parts(want, cell))):
        assert_close(f"state_T[{i}]", a, b, np.float64)


# ============================================================================ lengths


@per_cell
@pytest.mark.parametrize("loss,weights", [("cross_entropy", False), ("mse", True)])
def test_lengths_equal_each_sequence_alone(cell, loss, weights):
    """With lengths, the batch is its sequences run alone through fastbptt (T = lengths[b], B = 1),
    the loss and the gradients weighted by each sequence's share Σ_t w_tb / Σ w."""
    s = Setup(cell, 2, 2, seed=51, loss=loss, weights=weights, inputs="dense")
    if weights:
        s.kw["loss_weights"] = np.random.default_rng(52).uniform(0.5, 2.0, size=(6, 4))
    got = s.core(method="fused")
    w = np.ones((6, 4)) if not weights else s.kw["loss_weights"]
    n = s.kw["lengths"]
    share = np.array([w[:n[b], b].sum() for b in range(4)]) / sum(w[:n[b], b].sum() for b in range(4))
    loss_sum, grads = 0.0, {k: np.zeros_like(v) for k, v in got[1].items()}
    dX = np.zeros_like(got[4])
    states, dstates = [], []
    for b in range(4):
        one = lambda a: a if a is None else a[:n[b], b:b + 1]       # noqa: E731
        s0 = join([p[:, b:b + 1] for p in parts(s.state0, cell)], cell)
        L, g, sT, ds0, dXb = copied(fastbptt.loss_and_grad(
            s.model, one(s.X), one(s.Y), s0, loss, loss_weights=one(s.kw.get("loss_weights")),
            return_dh0=True, return_dX=True, method="fused"))
        loss_sum += share[b] * L
        for k in grads:
            grads[k] += share[b] * g[k]
        dX[:n[b], b:b + 1] = share[b] * dXb
        states.append(sT)
        dstates.append(tuple(share[b] * a for a in parts(ds0, cell)))
    cat = lambda xs: join([np.concatenate([parts(x, cell)[i] for x in xs], axis=1)   # noqa: E731
                           for i in range(len(parts(xs[0], cell)))], cell)
    s.check(got, (loss_sum, grads, cat(states), cat([join(d, cell) for d in dstates]), dX))


@per_cell
@pytest.mark.parametrize("inputs,loss", [("tokens", "cross_entropy"), ("dense", "mse")])
@pytest.mark.parametrize("method", METHODS)
def test_padding_is_never_read(cell, inputs, loss, method):
    """Out-of-range ids and labels, NaN inputs and targets past each end: accepted (check_finite on) and
    bitwise the result of zeros there."""
    s = Setup(cell, 2, 2, seed=61, inputs=inputs, loss=loss, weights=True)
    got = s.core(method=method)
    s.X[~s.valid] = 0
    s.Y[~s.valid] = 0
    clean = s.core(method=method)
    assert got[0] == clean[0]
    for name in clean[1]:
        assert np.array_equal(got[1][name], clean[1][name]), name
    for i in (2, 3):
        for a, b in zip(parts(got[i], cell), parts(clean[i], cell)):
            assert np.array_equal(a, b)
    assert np.array_equal(got[4], clean[4]) and np.all(got[4][~s.valid] == 0)


@per_cell
def test_full_lengths_equal_no_lengths(cell):
    s = Setup(cell, 2, 2, seed=62, lengths="full", weights=True)
    plain = s.core()
    s.kw["lengths"] = np.full(4, 6)
    s.check(s.core(), plain)


# ============================================================================ parallel


def _bits(result, cell):
    L, grads, sT, ds0, dX = result
    out = {"loss": np.float64(L).tobytes(), "dX": dX.tobytes()}
    out.update({f"d{k}": np.asarray(v).tobytes() for k, v in grads.items()})
    for label, state in (("state_T", sT), ("dstate0", ds0)):
        out.update({f"{label}[{i}]": a.tobytes() for i, a in enumerate(parts(state, cell))})
    return out


@per_cell
@pytest.mark.parametrize("num_layers,dirs,inputs,loss", [(2, 2, "tokens", "cross_entropy"),
                                                         (3, 1, "dense", "mse")])
@pytest.mark.parametrize("method", METHODS)
def test_parallel_is_bitwise_serial(cell, num_layers, dirs, inputs, loss, method):
    """T·B = 520, B = 13 (a multiple of no thread count), ragged lengths, loss weights, float32;
    dropout drawn from the same generator state; carry for the one-direction stack."""
    T, B = 40, 13
    s = Setup(cell, num_layers, dirs, np.float32, T=T, B=B, D=7, H=16, O=9, seed=71, inputs=inputs, loss=loss,
              weights=True, dropout=0.3)
    s.model.flat[...] *= 0.5
    carry = np.random.default_rng(72).choice([0.0, 0.5, 1.0], size=(T, B)) if dirs == 1 else None
    runs = []
    for parallel in (False, True):
        s.model.generator = np.random.default_rng(73)
        runs.append(_bits(s.core(method=method, parallel=parallel, carry=carry), cell))
    differ = [k for k in runs[0] if runs[0][k] != runs[1][k]]
    assert not differ, f"parallel=True is not bitwise serial: {differ}"


# ============================================================================ dropout


@per_cell
@pytest.mark.parametrize("dirs", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_dropout_masks_against_reference(cell, dirs, method):
    """Training with dropout: the masks the call used (ws.dropout_masks(), caller's order) given to the
    reference reproduce its result; they are 0 or 1/(1-p), about p of them 0, new at each call."""
    p = 0.4
    s = Setup(cell, 3, dirs, seed=81, dropout=p, weights=True)
    ws = fastbptt.Workspace(s.model, 6, 4)
    got = s.core(method=method, workspace=ws)
    masks = ws.dropout_masks()
    assert len(masks) == 2 and all(m.shape == (6, 4, dirs * 4) for m in masks)
    values = np.concatenate([m.ravel() for m in masks])
    assert set(np.unique(values)) <= {0.0, np.float64(1 / (1 - p))}
    assert 0.15 < np.mean(values == 0) < 0.65
    s.check(got, s.reference(masks=[np.array(m, np.float64) for m in masks]))
    again = s.core(method=method, workspace=ws)
    assert not all(np.array_equal(a, b) for a, b in zip(masks, ws.dropout_masks()))
    s.check(again, s.reference(masks=[np.array(m, np.float64) for m in ws.dropout_masks()]), "second call: ")


@per_cell
def test_dropout_off_in_eval_mode_and_reproducible_from_the_seed(cell):
    s = Setup(cell, 2, 2, seed=82, dropout=0.5)
    assert s.model.training
    s.model.eval()
    assert not s.model.training
    ws = fastbptt.Workspace(s.model, 6, 4)
    s.check(s.core(workspace=ws), s.reference())
    assert all(np.all(m == 1) for m in ws.dropout_masks())
    s.model.train()
    first = _bits(s.core(), cell)
    assert _bits(s.core(), cell) != first                 # the generator moved on
    twin = Setup(cell, 2, 2, seed=82, dropout=0.5)        # same seed: same masks
    assert _bits(twin.core(), cell) == first


# ============================================================================ PyTorch on fastbptt


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("cell,num_layers,dirs,inputs,loss,weights,activation", [
    ("lstm", 2, 2, "tokens", "cross_entropy", False, "tanh"),
    ("gru", 3, 1, "dense", "mse", True, "tanh"),
    ("rnn", 2, 2, "dense", "cross_entropy", True, "relu"),
    ("gru", 1, 2, "tokens", "cross_entropy", True, "tanh"),
])
def test_against_pytorch(torch, cell, num_layers, dirs, inputs, loss, weights, activation):
    s = Setup(cell, num_layers, dirs, seed=91, inputs=inputs, loss=loss, weights=weights, activation=activation)
    want = torch_loss_and_grad(torch, s.params, s.X, s.Y, s.state64, activation=activation, **s.kw)
    s.check(s.core(), want)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_against_pytorch(torch, cell):
    s = Setup(cell, 3, 2, seed=92, dropout=0.5)
    ws = fastbptt.Workspace(s.model, 6, 4)
    got = s.core(workspace=ws)
    want = torch_loss_and_grad(torch, s.params, s.X, s.Y, s.state64, masks=ws.dropout_masks(), **s.kw)
    s.check(got, want)


# ============================================================================ hypothesis


if given is not None:
    @st.composite
    def problems(draw):
        T, B = draw(st.integers(1, 6)), draw(st.integers(1, 5))
        lengths = draw(st.one_of(st.none(), st.lists(st.integers(1, T), min_size=B, max_size=B)))
        return dict(cell=draw(st.sampled_from(CELLS)), num_layers=draw(st.integers(1, 3)),
                    dirs=draw(st.integers(1, 2)), T=T, B=B, lengths=lengths,
                    loss=draw(st.sampled_from(["cross_entropy", "mse"])),
                    inputs=draw(st.sampled_from(["dense", "tokens"])), method=draw(st.sampled_from(METHODS)),
                    seed=draw(st.integers(0, 2 ** 16)))

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(problems())
    def test_hypothesis_against_reference(pr):
        s = Setup(pr["cell"], pr["num_layers"], pr["dirs"], T=pr["T"], B=pr["B"], D=3, H=3, O=4, seed=pr["seed"],
                  lengths="full", loss=pr["loss"], inputs=pr["inputs"])
        if pr["lengths"] is not None:
            s.kw["lengths"] = np.array(pr["lengths"])
            s.valid = np.arange(pr["T"])[:, None] < s.kw["lengths"][None, :]
        s.check(s.core(method=pr["method"]), s.reference())
else:  # pragma: no cover
    @pytest.mark.skip(reason="hypothesis is not installed (pip install 'fastbptt[test]')")
    def test_hypothesis_against_reference():
        pass
