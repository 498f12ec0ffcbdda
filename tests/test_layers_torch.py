"""fastbptt.reference_layers against PyTorch: stacks, directions, packed sequences, loss weights, dropout masks.

PyTorch's ``nn.RNN``/``nn.GRU``/``nn.LSTM`` with ``num_layers`` and ``bidirectional`` run over
``pack_padded_sequence(..., enforce_sorted=False)``, then ``nn.Linear``-style readout and the
loss over the valid positions, is the second oracle of issue 9: loss, h_n, every gradient,
∂L/∂X and ∂L/∂h0 must agree to 1e-10 in float64. Dropout masks cannot be handed to PyTorch's
own stack, so for them the stack is built from one-layer modules with the masks multiplied in.

``torch_loss_and_grad`` returns the reference's tuple, so tests/test_layers.py also checks
fastbptt itself against it.
"""

import numpy as np
import pytest

from fastbptt.core import reference_layers as RL
from helpers import assert_close

TORCH_CLASS = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


# ---------------------------------------------------------------- problems (plain NumPy)

def random_params(cell, D, H, O, num_layers, dirs, rng, bias=True, scale=0.6):
    """Parameters named as the models name them, each drawn from N(0, scale²)."""
    G = RL.GATES[cell]
    params = {}
    for k in range(num_layers):
        D_in = D if k == 0 else dirs * H
        for d in range(dirs):
            s = RL.suffix(k, d, num_layers, dirs)
            shapes = {"W_hx": (H, D_in), "W_ih": (G * H, D_in), "W_hh": (G * H, H),
                      "b_h": (H,), "b_ih": (G * H,), "b_hh": (G * H,)}
            for n in RL.local_names(cell):
                if bias or n.startswith("W"):
                    params[n + s] = rng.normal(0.0, scale, size=shapes[n])
    params["W_qh"] = rng.normal(0.0, scale, size=(O, dirs * H))
    if bias:
        params["b_q"] = rng.normal(0.0, scale, size=O)
    return params


def random_problem(cell, T, B, D, H, O, num_layers, dirs, *, seed=0, lengths="ragged", loss="cross_entropy",
                   inputs="dense", weights=False, dropout=0.0, bias=True, h0=True):
    """params, X, Y, state0 (L·dirs, B, H) (a pair for the LSTM) and the keyword arguments of the run.

    Padding (t >= lengths[b]) holds NaN inputs, out-of-range ids and targets: an oracle must not read it.
    """
    rng = np.random.default_rng(seed)
    params = random_params(cell, D, H, O, num_layers, dirs, rng, bias)
    if lengths == "ragged":
        n = rng.integers(1, T + 1, size=B)
        n[rng.integers(B)] = T                      # one full sequence, and a length-1 one when B > 1
        if B > 1:
            n[(np.argmax(n) + 1) % B] = 1
    else:
        n = None
    valid = np.ones((T, B), bool) if n is None else np.arange(T)[:, None] < n[None, :]
    if inputs == "dense":
        X = rng.normal(size=(T, B, D))
        X[~valid] = np.nan
    else:
        X = rng.integers(0, D, size=(T, B))
        X[~valid] = D + 7
    if loss == "cross_entropy":
        Y = rng.integers(0, O, size=(T, B))
        Y[~valid] = -3
    else:
        Y = rng.normal(size=(T, B, O))
        Y[~valid] = np.nan
    shape = (num_layers * dirs, B, H)
    state0 = None
    if h0:
        state0 = rng.normal(size=shape)
        if cell == "lstm":
            state0 = (state0, rng.normal(size=shape))
    kwargs = dict(cell=cell, num_layers=num_layers, bidirectional=dirs == 2, lengths=n, loss=loss)
    if weights:
        w = rng.uniform(0.0, 2.0, size=(T, B))
        w[rng.random((T, B)) < 0.2] = 0.0           # positions left unscored
        w[0, 0] = 1.0
        kwargs["loss_weights"] = w
    if dropout:
        kwargs["masks"] = [(rng.random((T, B, dirs * H)) >= dropout) / (1 - dropout)
                           for _ in range(num_layers - 1)]
    return params, X, Y, state0, kwargs


# ---------------------------------------------------------------- PyTorch as an oracle

def torch_name(name, cell):
    """A model's parameter name -> PyTorch's: W_ih_l1_reverse -> weight_ih_l1_reverse,
    plain W_hh -> weight_hh_l0; the Elman cell's W_hx -> weight_ih, b_h -> bias_ih."""
    base, _, rest = name.partition("_l")
    if not rest:
        base, rest = name, "0"
    torch_base = {"W_hx": "weight_ih", "W_ih": "weight_ih", "W_hh": "weight_hh",
                  "b_h": "bias_ih", "b_ih": "bias_ih", "b_hh": "bias_hh"}[base]
    return f"{torch_base}_l{rest}"


def _module(torch, cell, D, H, num_layers, bidirectional, bias, activation):
    kwargs = {"nonlinearity": activation} if cell == "rnn" else {}
    return getattr(torch.nn, TORCH_CLASS[cell])(D, H, num_layers=num_layers, bidirectional=bidirectional,
                                                bias=bias, dtype=torch.float64, **kwargs)


def _load(torch, module, params, cell, rename=lambda n: n):
    """Copy params by name into module (Elman: bias_hh = 0, bias_ih = b_h); returns {torch name: our name}."""
    names = {}
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        for name, value in params.items():
            if name in ("W_qh", "b_q") or rename(name) is None:
                continue
            tname = torch_name(rename(name), cell)
            getattr(module, tname).copy_(torch.from_numpy(value))
            names[tname] = name
    return names


def torch_loss_and_grad(torch, params, X, Y, state0=None, *, cell, num_layers=1, bidirectional=False,
                        lengths=None, loss_weights=None, loss="cross_entropy", masks=None, activation="tanh"):
    """PyTorch's (loss, grads, state_T, dstate0, dX) for the reference's arguments.

    Without masks: one ``nn.RNN/GRU/LSTM(num_layers=L, bidirectional=...)``; with them, L
    one-layer modules and the masks multiplied between them. Packed sequences when lengths
    are given. States are always (L·dirs, B, H) here (pairs for the LSTM).
    """
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    nn_f = torch.nn.functional
    dirs = 2 if bidirectional else 1
    T, B = X.shape[:2]
    s0 = RL.suffix(0, 0, num_layers, dirs)
    W_in = params[("W_hx" if cell == "rnn" else "W_ih") + s0]
    H, D = params["W_hh" + s0].shape[1], W_in.shape[1]
    bias = "b_q" in params
    n = np.full(B, T) if lengths is None else np.asarray(lengths)
    valid = np.arange(T)[:, None] < n[None, :]
    if X.ndim == 2:
        Xd = np.zeros((T, B, D))
        Xd[valid] = np.eye(D)[X[valid]]
    else:
        Xd = np.where(valid[:, :, None], X, 0.0)
    x = torch.tensor(Xd, requires_grad=True)
    shape = (num_layers * dirs, B, H)
    parts = [np.zeros(shape)] * (2 if cell == "lstm" else 1) if state0 is None else (
        list(state0) if cell == "lstm" else [state0])
    leaves = [torch.tensor(np.reshape(p, shape), requires_grad=True) for p in parts]

    def run(module, inp, first):
        """One module over inp (T, B, ·) from state rows first .. ; returns (out (T, B, ·), states)."""
        rows = slice(first, first + module.num_layers * dirs)
        h = tuple(s[rows] for s in leaves)
        h = h if cell == "lstm" else h[0]
        if lengths is None:
            out, hn = module(inp, h)
        else:
            packed = pack_padded_sequence(inp, torch.tensor(n), enforce_sorted=False)
            out, hn = module(packed, h)
            out, _ = pad_packed_sequence(out, total_length=T)
        return out, (hn if cell == "lstm" else (hn,))

    modules, names = [], {}
    if masks is None:
        m = _module(torch, cell, D, H, num_layers, bidirectional, bias, activation)
        names[0] = _load(torch, m, params, cell)
        modules.append(m)
        out, states = run(m, x, 0)
    else:
        out, finals = x, []
        for k in range(num_layers):
            m = _module(torch, cell, D if k == 0 else dirs * H, H, 1, bidirectional, bias, activation)

            def rename(name, k=k):      # layer k's weights are this module's layer 0
                s = [RL.suffix(k, d, num_layers, dirs) for d in range(dirs)]
                for d, sd in enumerate(s):
                    local = name[:len(name) - len(sd)]
                    if name.endswith(sd) and local in RL.local_names(cell):
                        return local + RL.suffix(0, d, 2, dirs)
                return None
            names[k] = _load(torch, m, params, cell, rename)
            modules.append(m)
            out, st = run(m, out, k * dirs)
            finals.append(st)
            if k < num_layers - 1:
                out = out * torch.tensor(masks[k])
        states = tuple(torch.cat([f[i] for f in finals]) for i in range(len(finals[0])))
    out = out * torch.tensor(valid[:, :, None].astype(np.float64))
    W_qh = torch.tensor(params["W_qh"], requires_grad=True)
    b_q = torch.tensor(params["b_q"], requires_grad=True) if bias else None
    logits = out @ W_qh.T + (b_q if bias else 0)
    vb = torch.tensor(valid)
    if loss == "cross_entropy":
        ell = nn_f.cross_entropy(logits[vb], torch.tensor(Y[valid]), reduction="none")
    else:
        ell = ((logits[vb] - torch.tensor(Y[valid])) ** 2).mean(dim=1)
    w = torch.ones(int(valid.sum()), dtype=torch.float64) if loss_weights is None else \
        torch.tensor(np.asarray(loss_weights, np.float64)[valid])
    L = (w * ell).sum() / w.sum()
    L.backward()
    grads = {"W_qh": W_qh.grad.numpy()}
    if bias:
        grads["b_q"] = b_q.grad.numpy()
    for m, nm in zip(modules, names.values()):
        for tname, name in nm.items():
            grads[name] = getattr(m, tname).grad.numpy()
    state_T = tuple(s.detach().numpy() for s in states)
    dstate0 = tuple(s.grad.numpy() for s in leaves)
    if cell != "lstm":
        state_T, dstate0 = state_T[0], dstate0[0]
    return L.item(), grads, state_T, dstate0, x.grad.numpy()


def full_state(state, cell, num_layers, dirs):
    """Any state as (L·dirs, B, H) arrays (a tuple for the LSTM), for comparisons."""
    parts = state if cell == "lstm" else (state,)
    out = tuple(np.reshape(p, (num_layers * dirs,) + np.shape(p)[-2:]) for p in parts)
    return out if cell == "lstm" else out[0]


def assert_same_result(got, want, cell, num_layers, dirs, dtype=np.float64, what=""):
    """Compare two (loss, grads, state_T, dstate0, dX) tuples, naming what differs."""
    L1, g1, s1, ds1, dx1 = got
    L2, g2, s2, ds2, dx2 = want
    assert_close(f"{what}loss", L1, L2, dtype)
    assert sorted(g1) == sorted(g2), f"{what}grad names {sorted(g1)} != {sorted(g2)}"
    for name in g2:
        assert_close(f"{what}d{name}", g1[name], g2[name], dtype)
    for label, a, b in (("state_T", s1, s2), ("dstate0", ds1, ds2)):
        if a is None and b is None:     # not compared
            continue
        a, b = full_state(a, cell, num_layers, dirs), full_state(b, cell, num_layers, dirs)
        if cell != "lstm":
            a, b = (a,), (b,)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(f"{what}{label}[{'hc'[i]}]", x, y, dtype)
    assert_close(f"{what}dX", dx1, dx2, dtype)


# ---------------------------------------------------------------- the reference against PyTorch

CELLS = ["rnn", "gru", "lstm"]
CASES = {   # name: (lengths, inputs, loss, loss weights)
    "full-dense-ce": ("full", "dense", "cross_entropy", False),
    "ragged-tokens-ce": ("ragged", "tokens", "cross_entropy", False),
    "ragged-dense-mse-weights": ("ragged", "dense", "mse", True),
    "ragged-dense-ce-weights": ("ragged", "dense", "cross_entropy", True),
    "full-tokens-mse-weights": ("full", "tokens", "mse", True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dirs", [1, 2])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_reference_against_pytorch(torch, cell, num_layers, dirs, case):
    lengths, inputs, loss, weights = CASES[case]
    params, X, Y, state0, kw = random_problem(cell, T=6, B=4, D=3, H=4, O=5, num_layers=num_layers, dirs=dirs,
                                              seed=num_layers * 10 + dirs, lengths=lengths, loss=loss,
                                              inputs=inputs, weights=weights)
    want = torch_loss_and_grad(torch, params, X, Y, state0, **kw)
    got = RL.loss_and_grad(params, X, Y, state0, **kw)
    assert_same_result(got, want, cell, num_layers, dirs)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dirs", [1, 2])
def test_reference_with_dropout_masks_against_pytorch(torch, cell, dirs):
    """Masks between the layers: PyTorch's one-layer modules stacked by hand with the same masks."""
    params, X, Y, state0, kw = random_problem(cell, T=5, B=3, D=3, H=4, O=4, num_layers=3, dirs=dirs, seed=7,
                                              weights=True, dropout=0.4)
    want = torch_loss_and_grad(torch, params, X, Y, state0, **kw)
    got = RL.loss_and_grad(params, X, Y, state0, **kw)
    assert_same_result(got, want, cell, 3, dirs)
    # the masks matter: without them the result differs
    kw.pop("masks")
    assert abs(RL.loss_and_grad(params, X, Y, state0, **kw)[0] - got[0]) > 1e-6


def test_torch_oracle_stacks_by_hand_like_pytorch(torch):
    """The hand-built stack (used with masks) equals PyTorch's own when every mask is one."""
    params, X, Y, state0, kw = random_problem("lstm", T=5, B=3, D=3, H=4, O=4, num_layers=2, dirs=2, seed=8)
    ones = [np.ones((5, 3, 8))]
    assert_same_result(torch_loss_and_grad(torch, params, X, Y, state0, masks=ones, **kw),
                       torch_loss_and_grad(torch, params, X, Y, state0, **kw), "lstm", 2, 2)


@pytest.mark.parametrize("cell", CELLS)
def test_reference_without_bias_relu_and_zero_state_against_pytorch(torch, cell):
    activation = "relu" if cell == "rnn" else "tanh"
    params, X, Y, state0, kw = random_problem(cell, T=5, B=3, D=3, H=4, O=4, num_layers=2, dirs=2, seed=9,
                                              bias=False, h0=False)
    want = torch_loss_and_grad(torch, params, X, Y, state0, activation=activation, **kw)
    got = RL.loss_and_grad(params, X, Y, state0, activation=activation, **kw)
    assert_same_result(got, want, cell, 2, 2)


@pytest.mark.parametrize("cell", CELLS)
def test_reference_layers_against_pytorch_with_output_and_state_gradients(torch, cell):
    """layers_forward/layers_backward with ∂L/∂H and ∂L/∂state_T from outside (what layer_backward takes):
    PyTorch's L = Σ H ⊙ R + Σ state_T ⊙ S over packed sequences."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    num_layers, dirs, T, B, D, H = 2, 2, 5, 3, 3, 4
    params, X, _, state0, kw = random_problem(cell, T=T, B=B, D=D, H=H, O=2, num_layers=num_layers, dirs=dirs,
                                              seed=11)
    kw.pop("loss")
    rng = np.random.default_rng(12)
    R = rng.normal(size=(T, B, dirs * H))
    parts = state0 if cell == "lstm" else (state0,)
    S = tuple(rng.normal(size=p.shape) for p in parts)
    Htop, state_T, tape = RL.layers_forward(params, X, state0, **kw)
    grads, dX, dstate0 = RL.layers_backward(params, tape, R, S if cell == "lstm" else S[0])

    m = _module(torch, cell, D, H, num_layers, True, True, "tanh")
    names = _load(torch, m, params, cell)
    x = torch.tensor(np.nan_to_num(X), requires_grad=True)
    leaves = [torch.tensor(p, requires_grad=True) for p in parts]
    packed = pack_padded_sequence(x, torch.tensor(kw["lengths"]), enforce_sorted=False)
    out, hn = m(packed, tuple(leaves) if cell == "lstm" else leaves[0])
    out, _ = pad_packed_sequence(out, total_length=T)
    hn = hn if cell == "lstm" else (hn,)
    loss = (out * torch.tensor(R)).sum() + sum((h * torch.tensor(s)).sum() for h, s in zip(hn, S))
    loss.backward()
    assert_close("H", Htop, out.detach().numpy(), np.float64)
    for name, tname in ((v, k) for k, v in names.items()):
        assert_close(f"d{name}", grads[name], getattr(m, tname).grad.numpy(), np.float64)
    assert sorted(grads) == sorted(names.values())
    valid = np.arange(T)[:, None] < kw["lengths"][None, :]
    assert_close("dX", dX, x.grad.numpy() * valid[:, :, None], np.float64)
    ds = dstate0 if cell == "lstm" else (dstate0,)
    st = state_T if cell == "lstm" else (state_T,)
    for a, b, c, d in zip(ds, leaves, st, hn):
        assert_close("dstate0", a, b.grad.numpy(), np.float64)
        assert_close("state_T", c, d.detach().numpy(), np.float64)
