"""dropout = 1, the end of torch.nn's range [0, 1]: every unit between layers is dropped, so the
layers above get zeros and the layers below no gradient; no division by zero (1/(1-p)). Checked
against the NumPy reference, central differences, torch.nn and the fastbptt.torch bridge."""

import numpy as np
import pytest

import fastbptt
from fastbptt.core import reference_layers as RL
from helpers import assert_close

CELLS = ["rnn", "gru", "lstm"]
T, B, D, H, O = 12, 6, 5, 16, 4


def make(cell, L=3, bidirectional=True, dropout=1.0, seed=0):
    model = fastbptt.CELLS[cell](D, H, O, dtype=np.float64, seed=seed, num_layers=L,
                                 bidirectional=bidirectional, dropout=dropout)
    rng = np.random.default_rng(seed + 100)
    model.flat[...] = rng.normal(0, 0.5, model.flat.shape)
    return model


def problem(seed=1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(T, B, D))
    Y = rng.integers(0, O, (T, B))
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    return X, Y, lengths


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_one_agrees_with_the_reference_with_zero_masks(cell, bidirectional):
    model = make(cell, bidirectional=bidirectional)
    X, Y, lengths = problem()
    ws = fastbptt.Workspace(model, T, B)
    loss, grads, _, dh0, dX = fastbptt.loss_and_grad(model, X, Y, lengths=lengths, workspace=ws,
                                                     return_dh0=True, return_dX=True)
    masks = ws.dropout_masks()
    assert len(masks) == 2 and all(np.all(m == 0) for m in masks)
    params = {k: v.copy() for k, v in model.params.items()}
    want = RL.loss_and_grad(params, X, Y, None, cell=cell, num_layers=3, bidirectional=bidirectional,
                            lengths=lengths, masks=masks)
    assert abs(loss - want[0]) <= 1e-12 * max(1.0, abs(want[0]))
    for name, g in want[1].items():
        assert_close(name, grads[name], g, np.float64)
    assert_close("dX", dX, want[4], np.float64)
    # nothing reaches the layers below the top one: their gradients and dX are exactly zero
    for name in model.params:
        if "_l0" in name or "_l1" in name:
            assert not np.any(grads[name]), name
    assert not np.any(dX)


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_one_gradients_by_central_differences(cell):
    model = make(cell, L=2, bidirectional=True)
    X, Y, lengths = problem(2)
    loss, grads, _ = fastbptt.loss_and_grad(model, X, Y, lengths=lengths)
    grads = {k: v.copy() for k, v in grads.items()}
    rng = np.random.default_rng(3)
    names = list(model.params)
    for name in names:
        p = model.params[name]
        for idx in [tuple(int(rng.integers(s)) for s in p.shape) for _ in range(3)]:
            old = p[idx]
            h = 1e-6
            p[idx] = old + h
            up = fastbptt.loss_and_grad(model, X, Y, lengths=lengths)[0]
            p[idx] = old - h
            down = fastbptt.loss_and_grad(model, X, Y, lengths=lengths)[0]
            p[idx] = old
            fd = (up - down) / (2 * h)
            assert abs(grads[name][idx] - fd) <= 1e-7 * max(1.0, abs(fd)), (name, idx, grads[name][idx], fd)


def test_dropout_one_draws_nothing_and_eval_turns_it_off():
    model = make("gru", L=2)
    X, Y, _ = problem()
    before = model.generator.bit_generator.state
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, workspace=ws)
    assert model.generator.bit_generator.state == before           # p = 1: zeros, no draw (as torch.nn)
    model.eval()
    got = fastbptt.loss_and_grad(model, X, Y)[0]
    model.dropout = 0.0
    assert got == fastbptt.loss_and_grad(model, X, Y)[0]


def test_dropout_one_is_accepted_by_every_model_and_the_setter():
    for cls in (fastbptt.RNN, fastbptt.GRU, fastbptt.LSTM):
        model = cls(3, 4, 2, num_layers=2, dropout=1.0)
        assert model.dropout == 1.0 and "dropout=1" in repr(model)
        model.dropout = 0.25
        model.dropout = 1
        assert model.dropout == 1.0


# ----------------------------------------------------------------------------- against torch.nn


def torch_module(torch, cell, model):
    """torch.nn's stack with the fastbptt model's recurrent weights (GRU and LSTM name them alike)."""
    cls = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
    mod = cls(D, H, num_layers=model.num_layers, bidirectional=model.bidirectional, dropout=1.0,
              dtype=torch.float64)
    with torch.no_grad():
        for k in range(model.num_layers):
            for d in range(model.num_directions):
                names = model.layer_names(k, d)
                sfx = f"_l{k}" + ("_reverse" if d else "")
                for role, tname in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"), ("b_ih", "bias_ih"),
                                    ("b_hh", "bias_hh")):
                    getattr(mod, tname + sfx).copy_(torch.from_numpy(model.params[names[role]]))
    return mod.train()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_dropout_one_matches_torch_nn_in_training(cell):
    torch = pytest.importorskip("torch")
    model = make(cell, L=3, bidirectional=True)
    X, _, _ = problem(4)
    dH = np.random.default_rng(5).normal(size=(T, B, 2 * H))
    ws = fastbptt.Workspace(model, T, B)
    Hout, _ = fastbptt.layer_forward(model, X, workspace=ws)
    Hout = Hout.copy()
    grads, dX, _ = fastbptt.layer_backward(model, dH, workspace=ws)
    mod = torch_module(torch, cell, model)
    x = torch.from_numpy(X.copy()).requires_grad_(True)
    out, _ = mod(x)
    out.backward(torch.from_numpy(dH))
    assert_close("H", Hout, out.detach().numpy(), np.float64)
    assert_close("dX", dX, x.grad.numpy(), np.float64)
    for k in range(3):
        for d in range(2):
            names = model.layer_names(k, d)
            sfx = f"_l{k}" + ("_reverse" if d else "")
            for role, tname in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"), ("b_ih", "bias_ih"),
                                ("b_hh", "bias_hh")):
                assert_close(names[role], grads[names[role]], getattr(mod, tname + sfx).grad.numpy(), np.float64)


@pytest.mark.parametrize("cls_name", ["RNN", "GRU", "LSTM"])
def test_the_bridge_trains_with_dropout_one_as_torch_nn(cls_name):
    """fastbptt.torch's module with dropout=1.0 (it raised ZeroDivisionError on its first training
    forward): the same outputs and gradients as torch.nn's."""
    torch = pytest.importorskip("torch")
    import fastbptt.torch as ft
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls_name)(D, H, num_layers=2, dropout=1.0, dtype=torch.float64).train()
    fast = getattr(ft, cls_name)(D, H, num_layers=2, dropout=1.0, dtype=torch.float64).train()
    fast.load_state_dict(ref.state_dict())
    X = torch.from_numpy(problem(6)[0])
    outs = []
    for mod in (ref, fast):
        out, _ = mod(X)
        (out ** 2).sum().backward()
        outs.append((out.detach().numpy(), {n: p.grad.numpy().copy() for n, p in mod.named_parameters()}))
    assert_close("output", outs[1][0], outs[0][0], np.float64)
    for name, g in outs[0][1].items():
        assert_close(name, outs[1][1][name], g, np.float64)
