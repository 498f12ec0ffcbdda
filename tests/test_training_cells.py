"""The training side for every cell (Elman RNN, GRU, LSTM): optimizers, checkpoints, predict,
truncated BPTT, gradient-flow diagnostics (against PyTorch's autograd), the command line and
``python -m fastbptt warmup``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbptt
from fastbptt import charrnn, checkpoint, data, diagnostics, optim, reference, reference_cells, training
from fastbptt.generate import predict
from helpers import assert_close

try:
    import torch
except ImportError:  # pragma: no cover - torch is in the development environment
    torch = None

CELLS = ["rnn", "gru", "lstm"]
GATED = ["gru", "lstm"]
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def make_model(cell, D=5, H=6, O=5, dtype=np.float64, seed=0, scale=0.6, bias=True):
    """A model of ``cell`` with weights ~ N(0, scale²): gates and φ' vary."""
    model = fastbptt.CELLS[cell](D, H, O, dtype=dtype, seed=seed, bias=bias)
    rng = np.random.default_rng(seed + 100)
    for p in model.params.values():
        p[...] = rng.normal(0.0, scale, size=p.shape)
    return model


def random_state(cell, B, H, rng, dtype=np.float64):
    h = rng.normal(size=(B, H)).astype(dtype)
    return (h, rng.normal(size=(B, H)).astype(dtype)) if cell == "lstm" else h


def as64(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(np.asarray(s, np.float64).copy() for s in state)
    return np.asarray(state, np.float64).copy()


def ref(cell, params, X, Y, state0, carry=None):
    """The plain NumPy reference (float64): (loss, grads, state_T)."""
    if cell == "rnn":
        L, g, hT, _, _ = reference.loss_and_grad(params, X, Y, state0, "tanh", carry=carry)
        return L, g, hT
    L, g, sT, _, _ = reference_cells.loss_and_grad(params, X, Y, state0, cell, carry=carry)
    return L, g, sT


def assert_state_close(name, got, want, dtype=np.float64):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == 2, f"{name}: expected a pair (h, c)"
        for k, (g, w) in enumerate(zip(got, want)):
            assert_close(f"{name}[{k}]", g, w, dtype)
    else:
        assert_close(name, got, want, dtype)


def flat_of(model, grads):
    return np.concatenate([np.asarray(grads[k], np.float64).ravel() for k, _ in model.layout])


def small_corpus(n=600):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    vocab = data.Vocab(list(text))
    return np.array(vocab[list(text)][:n]), vocab


# ----------------------------------------------------------------------------- 1. every entry point takes every cell


@pytest.mark.parametrize("call", ["optimizer", "save", "load", "train_step", "predict", "hidden_grads"])
def test_a_non_model_is_refused_naming_every_cell(call, tmp_path):
    model = make_model("gru")
    ws = fastbptt.Workspace(model, 3, 2)
    calls = {
        "optimizer": lambda: optim.SGD("model", lr=0.1),
        "save": lambda: checkpoint.save(tmp_path / "m.npz", "model"),
        "load": lambda: checkpoint.load(tmp_path / "m.npz", "model"),
        "train_step": lambda: training.train_step("model", np.zeros((3, 2), int), np.zeros((3, 2), int),
                                                  optim.SGD(model, 0.1), workspace=ws),
        "predict": lambda: predict("model", data.Vocab(list("ab")), "a", 2),
        "hidden_grads": lambda: diagnostics.hidden_grads("model", ws),
    }
    with pytest.raises(TypeError, match="model must be a fastbptt.RNN, GRU or LSTM"):
        calls[call]()


# ----------------------------------------------------------------------------- 2. optimizers and clipping


def reference_updates(name, p, grads, lr, steps):
    """The update rules of fastbptt.optim's docstring, in float64, over the flat buffer."""
    p = p.copy()
    v = np.zeros_like(p)
    m = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if name == "sgd":
            p = p - lr * g
        elif name == "momentum":
            v = 0.9 * v + g
            p = p - lr * v
        elif name == "adagrad":
            v = v + g * g
            p = p - lr * g / np.sqrt(v + 1e-8)
        else:
            b1, b2, eps = 0.9, 0.999, 1e-8
            if name == "adamw":
                p = p * (1 - lr * 1e-2)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - (lr / (1 - b1 ** t)) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
    return p


@pytest.mark.parametrize("cell", GATED)
@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_updates_a_gated_model(cell, name):
    model = make_model(cell)
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=model.n_params) for _ in range(3)]
    want = reference_updates(name, model.flat.copy(), grads, 0.05, 3)
    opt = optim.make_optimizer(name, model, 0.05)
    for g in grads:
        opt.step(g)
    np.testing.assert_allclose(model.flat, want, rtol=1e-12, atol=1e-14)
    assert opt.t == 3
    again = optim.optimizer_from_state_dict(model, opt.state_dict())      # its state fits the model
    assert again.t == 3 and again.model is model


@pytest.mark.parametrize("cell", GATED)
def test_clipping_a_gated_model_s_gradient(cell):
    """clip_grad_norm over ws.grad_flat: the norm of every parameter's gradient as one vector, then
    every named gradient scaled by θ/‖g‖."""
    T, B = 4, 3
    model = make_model(cell)
    rng = np.random.default_rng(2)
    X, Y = rng.integers(0, 5, (T, B)), rng.integers(0, 5, (T, B))
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, workspace=ws)
    _, g, _ = ref(cell, {k: v.copy() for k, v in model.params.items()}, X, Y, None)
    norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    assert optim.grad_norm(ws) == pytest.approx(norm, rel=1e-12)
    assert optim.clip_grad_norm(ws.grad_flat, norm / 4) == pytest.approx(norm, rel=1e-12)
    for k in g:
        assert_close(k, ws.grads[k], g[k] / 4, np.float64)
    optim.clip_grad_value(ws.grad_flat, 1e-3)
    assert np.abs(ws.grad_flat).max() <= 1e-3


# ----------------------------------------------------------------------------- 3. checkpoints


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_checkpoint_records_the_cell_and_rebuilds_its_class(cell, dtype, tmp_path):
    model = make_model(cell, dtype=dtype, bias=dtype == np.float64)
    opt = optim.Adam(model, lr=0.01)
    opt.step(np.ones(model.n_params, dtype))
    checkpoint.save(tmp_path / "m.npz", model, opt, extra={"epoch": 2})
    config = checkpoint.read_config(tmp_path / "m.npz")
    assert config["cell"] == cell and ("activation" in config) == (cell == "rnn")
    got = checkpoint.load(tmp_path / "m.npz")
    assert type(got.model) is type(model) and got.model.cell == cell
    assert got.model.dtype == model.dtype and got.model.bias == model.bias
    np.testing.assert_array_equal(got.model.flat, model.flat)
    for k, v in opt.state.items():
        np.testing.assert_array_equal(got.optimizer.state[k], v)
    assert got.optimizer.t == 1 and got.extra == {"epoch": 2}


@pytest.mark.parametrize("cell", CELLS)
def test_loading_into_a_model_of_another_cell_is_refused_untouched(cell, tmp_path):
    model = make_model(cell)
    checkpoint.save(tmp_path / "m.npz", model)
    for other in CELLS:
        if other == cell:
            continue
        target = make_model(other, seed=4)
        before = target.flat.copy()
        name = fastbptt.CELLS[cell].__name__
        with pytest.raises(ValueError, match=rf"holds {name}\(input_size=5.*loads into a fastbptt.{name}"):
            checkpoint.load(tmp_path / "m.npz", target)
        np.testing.assert_array_equal(target.flat, before)


def old_release_checkpoint(path, model, opt, extra):
    """A checkpoint as the Elman-only release's ``checkpoint.save`` wrote it: the same members, and a
    model.config without a cell (its model_config, key for key)."""
    config = {"input_size": model.input_size, "hidden_size": model.hidden_size,
              "output_size": model.output_size, "activation": model.activation,
              "bias": model.bias, "dtype": model.dtype.name}
    sd = opt.state_dict()
    arrays = {"format": np.array("fastbptt-checkpoint-1"), "model.config": np.array(json.dumps(config)),
              "model.flat": model.flat,
              "optim.config": np.array(json.dumps({"name": sd["name"], "hyper": sd["hyper"], "t": sd["t"]}))}
    for name, value in sd["state"].items():
        arrays[f"optim.state.{name}"] = value
    arrays["extra"] = np.array(json.dumps(extra))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_an_elman_checkpoint_of_the_previous_release_still_loads(tmp_path):
    model = fastbptt.RNN(5, 7, 5, activation="relu", seed=3)
    opt = optim.SGD(model, lr=0.5, momentum=0.9)
    opt.step(np.full(model.n_params, 0.25, np.float32))
    old_release_checkpoint(tmp_path / "old.npz", model, opt, {"epoch": 4})
    assert checkpoint.read_config(tmp_path / "old.npz")["cell"] == "rnn"
    got = checkpoint.load(tmp_path / "old.npz")
    assert type(got.model) is fastbptt.RNN and got.model.activation == "relu"
    np.testing.assert_array_equal(got.model.flat, model.flat)
    np.testing.assert_array_equal(got.optimizer.state["velocity"], opt.state["velocity"])
    target = fastbptt.RNN(5, 7, 5, activation="relu", seed=9)       # into a model too
    checkpoint.load(tmp_path / "old.npz", target)
    np.testing.assert_array_equal(target.flat, model.flat)
    with pytest.raises(ValueError, match=r"holds RNN\(.*but the model is GRU\("):
        checkpoint.load(tmp_path / "old.npz", fastbptt.GRU(5, 7, 5))


def rewrite_config(src, dst, change=None, drop=()):
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    config = json.loads(str(arrays["model.config"]))
    config.update(change or {})
    for key in drop:
        config.pop(key)
    arrays["model.config"] = np.array(json.dumps(config))
    np.savez(dst, **arrays)
    return dst


@pytest.mark.parametrize("change,drop,match", [
    ({"cell": "transformer"}, (), "cell 'transformer' is not one of"),
    ({"cell": 3}, (), "cell 3 is not one of"),
    ({"activation": "tanh"}, (), r"of a 'lstm' cell must hold exactly \['bias', 'cell', 'dtype', 'hidden_size'"),
    ({"cell": "rnn"}, (), r"of a 'rnn' cell must hold exactly \['activation'"),
    ({}, ("cell",), r"of a 'rnn' cell must hold exactly"),      # no cell: an Elman file, which has activation
])
def test_a_tampered_cell_is_refused(tmp_path, change, drop, match):
    checkpoint.save(tmp_path / "m.npz", make_model("lstm"))
    bad = rewrite_config(tmp_path / "m.npz", tmp_path / "bad.npz", change, drop)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load(bad)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.read_config(bad)


def a_loader(corpus, seed, T=6, B=3):
    return data.SeqDataLoader(corpus, T, B, "random", rng=np.random.default_rng(seed))


@pytest.mark.parametrize("cell", CELLS)
def test_training_resumed_from_a_checkpoint_continues_bitwise(cell, tmp_path):
    """Three epochs straight = one epoch, save, load into a new process's objects, two more epochs
    (Adam, randomized truncation, the batches' generator kept in ``extra``)."""
    corpus, vocab = small_corpus()
    V = len(vocab)

    def epochs(model, opt, rng, n):
        ws = fastbptt.Workspace(model, 6, 3)
        loader = data.SeqDataLoader(corpus, 6, 3, "sequential", rng=rng)
        for _ in range(n):
            training.train_epoch(model, loader, opt, workspace=ws, clip=1.0, truncation_pi=0.6, rng=rng)

    model = fastbptt.CELLS[cell](V, 8, V, dtype=np.float32, seed=1)
    opt = optim.Adam(model, lr=0.01)
    rng = np.random.default_rng(7)
    epochs(model, opt, rng, 1)
    checkpoint.save(tmp_path / "m.npz", model, opt, extra={"rng": rng.bit_generator.state})
    epochs(model, opt, rng, 2)

    saved = checkpoint.load(tmp_path / "m.npz")
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = saved.extra["rng"]
    assert type(saved.model) is type(model)
    epochs(saved.model, saved.optimizer, rng2, 2)
    np.testing.assert_array_equal(saved.model.flat, model.flat)
    for k, v in opt.state.items():
        np.testing.assert_array_equal(saved.optimizer.state[k], v)
    assert saved.optimizer.t == opt.t


# ----------------------------------------------------------------------------- 4. predict


@pytest.mark.parametrize("cell", CELLS)
def test_greedy_predict_carries_the_whole_state(cell):
    """Each generated token is the argmax of the model run over the whole text before it, from zero:
    the state (the LSTM's h and c) is carried through the warm-up and the generation."""
    vocab = data.Vocab(list("abcdefgh"))
    V = len(vocab)
    model = make_model(cell, D=V, H=7, O=V, seed=3, scale=0.9)
    text = predict(model, vocab, "abcab", 25)
    assert text.startswith("abcab") and len(text) == 30
    ids = np.array(vocab[list(text)])[:, None]
    O, _ = fastbptt.forward(model, ids[:-1])
    np.testing.assert_array_equal(np.argmax(O[4:, 0], axis=1), ids[5:, 0])
    assert len(set(text[5:])) > 1          # not a constant continuation, which would prove little


@pytest.mark.parametrize("cell", GATED)
def test_sampled_predict_is_reproducible_for_gated_cells(cell):
    vocab = data.Vocab(list("abcdefgh"))
    model = make_model(cell, D=len(vocab), H=7, O=len(vocab), dtype=np.float32, seed=3)
    a = predict(model, vocab, "ab", 20, temperature=1.0, rng=5)
    assert a == predict(model, vocab, "ab", 20, temperature=1.0, rng=5)
    assert a != predict(model, vocab, "ab", 20)          # sampled, not greedy


# ----------------------------------------------------------------------------- 5. truncated BPTT


@pytest.mark.parametrize("carry", [False, True])
@pytest.mark.parametrize("cell", GATED)
def test_train_step_carries_state_but_not_gradient_across_chunks(cell, carry):
    """Two steps over consecutive chunks = the reference on chunk 1, an update, then the reference on
    chunk 2 alone from chunk 1's final state (the LSTM's (h, c)), and an update."""
    rng = np.random.default_rng(4)
    T, B = 5, 3
    model = make_model(cell)
    X, Y = rng.integers(0, 5, (2 * T, B)), rng.integers(0, 5, (2 * T, B))
    s0 = random_state(cell, B, 6, rng)
    c1, c2 = (rng.choice([0.0, 2.0], size=(T, B)) for _ in range(2)) if carry else (None, None)
    ws = fastbptt.Workspace(model, T, B)
    opt = optim.SGD(model, lr=0.5)
    p = {k: v.copy() for k, v in model.params.items()}
    L1, g1, s1 = ref(cell, p, X[:T], Y[:T], as64(s0), c1)
    p = {k: p[k] - 0.5 * g1[k] for k in p}
    L2, g2, s2 = ref(cell, p, X[T:], Y[T:], as64(s1), c2)
    p = {k: p[k] - 0.5 * g2[k] for k in p}

    r1 = training.train_step(model, X[:T], Y[:T], opt, workspace=ws, h0=s0, carry=c1)
    assert_close("loss 1", r1.loss, L1, np.float64)
    assert_state_close("state 1", r1.h_T, s1)
    r2 = training.train_step(model, X[T:], Y[T:], opt, workspace=ws, h0=r1.h_T, carry=c2)
    assert_close("loss 2", r2.loss, L2, np.float64)
    assert_state_close("state 2", r2.h_T, s2)
    for k in p:
        assert_close(k, model.params[k], p[k], np.float64)


@pytest.mark.parametrize("cell", GATED)
def test_train_epoch_is_train_step_with_the_state_carried(cell):
    """train_epoch over sequential batches, with randomized truncation = a loop of train_step passing
    each chunk's final state on, with the same draws: bitwise."""
    corpus, vocab = small_corpus()
    V, T, B = len(vocab), 6, 3
    a = fastbptt.CELLS[cell](V, 8, V, dtype=np.float32, seed=2)
    b = fastbptt.CELLS[cell](V, 8, V, dtype=np.float32, seed=2)
    opt_a, opt_b = optim.Adam(a, lr=0.01), optim.Adam(b, lr=0.01)
    ws_a, ws_b = fastbptt.Workspace(a, T, B), fastbptt.Workspace(b, T, B)
    loader = data.SeqDataLoader(corpus, T, B, "sequential", rng=0)
    result = training.train_epoch(a, loader, opt_a, workspace=ws_a, clip=1.0, truncation_pi=0.5, rng=11)

    rng = np.random.default_rng(11)
    state, losses = None, []
    for X, Y in data.SeqDataLoader(corpus, T, B, "sequential", rng=0):
        carry = training.random_truncation(T, 0.5, rng, B, dtype=np.float32)
        step = training.train_step(b, X, Y, opt_b, workspace=ws_b, h0=state, clip=1.0, carry=carry)
        state = step.h_T
        losses.append(step.loss)
        assert isinstance(state, tuple) == (cell == "lstm")
    np.testing.assert_array_equal(a.flat, b.flat)
    assert result.loss == pytest.approx(np.mean(losses), rel=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_the_loss_falls_on_a_small_character_problem(cell):
    corpus, vocab = small_corpus()
    V = len(vocab)
    model = fastbptt.CELLS[cell](V, 24, V, dtype=np.float32, seed=0)
    opt = optim.Adam(model, lr=0.02)
    ws = fastbptt.Workspace(model, 8, 4)
    loader = data.SeqDataLoader(corpus, 8, 4, "sequential", rng=0)
    X, Y = next(iter(loader))
    before = np.exp(fastbptt.loss_and_grad(model, X, Y)[0])        # about V: uniform at the start
    history = [training.train_epoch(model, loader, opt, workspace=ws, clip=1.0).perplexity
               for _ in range(6)]
    assert before > 0.8 * V and history[-1] < 3 < history[0] < before, history


# ----------------------------------------------------------------------------- 6. diagnostics


def torch_gradient_flow(cell, model, X, Y, state0, carry):
    """∂L/∂h_t (and the LSTM's ∂L/∂c_t), t = 1 .. T, by PyTorch's autograd over its own cells, step
    by step in float64. The carry weight c of step t scales what flows back into the state it takes:
    s_in = s.detach() + c (s - s.detach()), the same value with the gradient times c."""
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in model.params.items()}
    T, B = X.shape
    H = model.hidden_size
    if cell == "rnn":
        step = torch.nn.RNNCell(model.input_size, H, nonlinearity="tanh").double()
        weights = (p["W_hx"], p["W_hh"], p["b_h"], torch.zeros(H, dtype=torch.float64))
    else:
        step = getattr(torch.nn, cell.upper() + "Cell")(model.input_size, H).double()
        weights = (p["W_ih"], p["W_hh"], p["b_ih"], p["b_hh"])
    with torch.no_grad():
        for param, w in zip((step.weight_ih, step.weight_hh, step.bias_ih, step.bias_hh), weights):
            param.copy_(w)
    x = torch.nn.functional.one_hot(torch.tensor(X), model.input_size).double()
    c = torch.ones(T, B, 1, dtype=torch.float64) if carry is None else torch.tensor(carry)[:, :, None]

    def weigh(s, k):
        return s.detach() + c[k] * (s - s.detach())
    state = tuple(torch.tensor(s) for s in state0) if cell == "lstm" else torch.tensor(state0)
    hs, cs = [], []
    for k in range(T):
        if cell == "lstm":
            h, cc = step(x[k], (weigh(state[0], k), weigh(state[1], k)))
            cc.retain_grad()
            cs.append(cc)
            state = (h, cc)
        else:
            h = step(x[k], weigh(state, k))
            state = h
        h.retain_grad()
        hs.append(h)
    out = torch.stack(hs) @ p["W_qh"].T + p["b_q"]
    loss = torch.nn.functional.cross_entropy(out.reshape(T * B, -1), torch.tensor(Y).reshape(-1))
    loss.backward()
    dh = torch.stack([h.grad for h in hs]).numpy()
    dc = torch.stack([cc.grad for cc in cs]).numpy() if cell == "lstm" else None
    return loss.item(), dh, dc


def close_norms(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.max(want))


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("method", ["fused", "blas"])
@pytest.mark.parametrize("carry", [None, "TB"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradient_flow_matches_pytorch_autograd(cell, carry, method):
    T, B, V, H = 9, 3, 5, 6
    rng = np.random.default_rng(8)
    model = make_model(cell, D=V, H=H, O=V, seed=5)
    X, Y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    state0 = random_state(cell, B, H, rng)
    c = None if carry is None else rng.choice([0.0, 0.5, 2.0], size=(T, B))
    loss, dh, dc = torch_gradient_flow(cell, model, X, Y, state0, c)

    ws = fastbptt.Workspace(model, T, B)
    got = fastbptt.loss_and_grad(model, X, Y, state0, workspace=ws, carry=c, method=method)[0]
    assert got == pytest.approx(loss, rel=1e-12)
    assert_close("dL/dh", diagnostics.hidden_grads(model, ws), dh, np.float64)
    close_norms(diagnostics.hidden_grad_norms(model, ws), np.sqrt((dh ** 2).sum(axis=(1, 2))))
    close_norms(diagnostics.hidden_grad_norms(model, ws, c, per_sequence=True), np.linalg.norm(dh, axis=2))
    if cell == "lstm":
        assert_close("dL/dc", diagnostics.cell_grads(model, ws), dc, np.float64)
        close_norms(diagnostics.cell_grad_norms(model, ws), np.sqrt((dc ** 2).sum(axis=(1, 2))))
        close_norms(diagnostics.cell_grad_norms(model, ws, per_sequence=True), np.linalg.norm(dc, axis=2))
    flow = diagnostics.gradient_flow(model, X, Y, state0, carry=c)
    assert flow[0] == got
    close_norms(flow[1], np.sqrt((dh ** 2).sum(axis=(1, 2))))


@pytest.mark.parametrize("cell", GATED)
def test_hidden_grads_of_a_gated_cell_are_a_copy_of_the_call_s(cell):
    T, B = 5, 2
    model = make_model(cell, dtype=np.float32)
    rng = np.random.default_rng(3)
    X, Y = rng.integers(0, 5, (T, B)), rng.integers(0, 5, (T, B))
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, workspace=ws)
    got = diagnostics.hidden_grads(model, ws)
    assert got.dtype == np.float32 and got.shape == (T, B, 6)
    got[...] = 0                                    # a copy: the workspace keeps its own
    assert np.any(diagnostics.hidden_grads(model, ws) != 0)


@pytest.mark.parametrize("cell", GATED)
def test_hidden_grads_after_layer_backward(cell):
    """layer_backward with ∂L/∂H = W_qhᵀ ∂L/∂o leaves the same ∂L/∂h_t (and ∂L/∂c_t) as backward(∂L/∂o)."""
    T, B = 6, 3
    rng = np.random.default_rng(6)
    model = make_model(cell)
    X = rng.integers(0, 5, (T, B))
    dO = rng.normal(size=(T, B, 5))
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.forward(model, X, workspace=ws)
    fastbptt.backward(model, dO, workspace=ws)
    want = diagnostics.hidden_grads(model, ws)
    want_c = diagnostics.cell_grads(model, ws) if cell == "lstm" else None
    fastbptt.layer_forward(model, X, workspace=ws)
    fastbptt.layer_backward(model, dO @ model.params["W_qh"], workspace=ws)
    assert_close("dL/dh", diagnostics.hidden_grads(model, ws), want, np.float64)
    if cell == "lstm":
        assert_close("dL/dc", diagnostics.cell_grads(model, ws), want_c, np.float64)


@pytest.mark.parametrize("cell", GATED)
def test_gated_cells_refuse_carry_weights_other_than_the_call_s(cell):
    T, B = 5, 2
    model = make_model(cell)
    rng = np.random.default_rng(3)
    X, Y = rng.integers(0, 5, (T, B)), rng.integers(0, 5, (T, B))
    c = rng.choice([0.0, 2.0], size=(T, B))
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, workspace=ws, carry=c)
    same = diagnostics.hidden_grads(model, ws)
    np.testing.assert_array_equal(diagnostics.hidden_grads(model, ws, carry=c), same)
    with pytest.raises(ValueError, match="differs from the carry weights the last call used"):
        diagnostics.hidden_grads(model, ws, carry=np.ones(T))
    with pytest.raises(ValueError, match="carry must have shape"):
        diagnostics.hidden_grads(model, ws, carry=np.ones(T + 1))
    fastbptt.loss_and_grad(model, X, Y, workspace=ws)                  # full BPTT: ones are fine
    diagnostics.hidden_grads(model, ws, carry=np.ones(T))
    diagnostics.hidden_grads(model, ws, carry=np.ones((T, B)))
    with pytest.raises(ValueError, match="differs from the carry weights"):
        diagnostics.hidden_grads(model, ws, carry=c)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_cell_grads_need_an_lstm(cell):
    model = make_model(cell)
    ws = fastbptt.Workspace(model, 3, 2)
    fastbptt.loss_and_grad(model, np.zeros((3, 2), int), np.zeros((3, 2), int), workspace=ws)
    for f in (diagnostics.cell_grads, diagnostics.cell_grad_norms):
        with pytest.raises(ValueError, match="cell_grads needs an LSTM"):
            f(model, ws)


def test_cell_grad_norms_bad_input():
    model = make_model("lstm")
    ws = fastbptt.Workspace(model, 3, 2)
    fastbptt.forward(model, np.zeros((3, 2), int), workspace=ws)
    with pytest.raises(ValueError, match="holds a forward pass"):
        diagnostics.cell_grad_norms(model, ws)
    with pytest.raises(ValueError, match="different model"):
        diagnostics.cell_grad_norms(make_model("lstm", H=4), ws)
    with pytest.raises(TypeError, match="model must be a fastbptt.RNN, GRU or LSTM"):
        diagnostics.cell_grad_norms("lstm", ws)


def test_the_lstm_s_cell_state_keeps_the_gradient_an_elman_cell_loses():
    """A loss at the last step only. Through an Elman cell with ρ(W_hh) = 0.5 ‖∂L/∂h_t‖ falls like
    0.5^{T-t}; through an LSTM whose forget gates are open (f ≈ 1) ‖∂L/∂c_t‖ barely falls."""
    T, B, H = 30, 2, 6
    rng = np.random.default_rng(0)
    elman = fastbptt.RNN(3, H, 4, activation="identity", bias=False, dtype=np.float64)
    Q, _ = np.linalg.qr(rng.normal(size=(H, H)))
    elman.params["W_hh"][...] = 0.5 * Q
    lstm = make_model("lstm", D=3, H=H, O=4, scale=0.1)
    lstm.gate("b_ih", "f")[...] = 8.0                     # σ(8) ≈ 0.9997
    X = rng.normal(size=(T, B, 3))
    dO = np.zeros((T, B, 4))
    dO[-1] = rng.normal(size=(B, 4))
    norms = {}
    for model in (elman, lstm):
        ws = fastbptt.Workspace(model, T, B)
        fastbptt.forward(model, X, workspace=ws)
        fastbptt.backward(model, dO, workspace=ws)
        norms[model.cell] = (diagnostics.cell_grad_norms if model.cell == "lstm"
                             else diagnostics.hidden_grad_norms)(model, ws)
    assert norms["rnn"][0] < 1e-8 * norms["rnn"][-1]
    assert norms["lstm"][0] > 0.9 * norms["lstm"][-1]


def test_spectral_radius_of_a_gated_model_asks_for_one_gate():
    model = make_model("gru")
    with pytest.raises(ValueError, match=r"pass one of them, such as model.gate\('W_hh', 'z'\)"):
        diagnostics.spectral_radius(model)
    want = np.max(np.abs(np.linalg.eigvals(model.gate("W_hh", "z"))))
    assert diagnostics.spectral_radius(model.gate("W_hh", "z")) == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------- 7. python -m fastbptt train --cell

SMALL = ["--hidden", "12", "--steps", "8", "--batch", "3", "--max-tokens", "1500", "--quiet"]


def run(capsys, *args):
    code = charrnn.main([*SMALL, *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("cell", CELLS)
def test_train_cell_runs_saves_and_resumes_bitwise(capsys, tmp_path, cell):
    common = ["--cell", cell, "--optimizer", "adam", "--lr", "0.01", "--random-truncation", "0.7"]
    code, out, err = run(capsys, *common, "--epochs", "3", "--save", str(tmp_path / "a.npz"))
    assert code == 0, err
    assert f"({cell}, sequential, 3 epochs" in out and "sample: the zen" in out
    assert checkpoint.read_config(tmp_path / "a.npz")["cell"] == cell
    assert type(checkpoint.load(tmp_path / "a.npz").model) is fastbptt.CELLS[cell]
    assert run(capsys, *common, "--epochs", "1", "--save", str(tmp_path / "b.npz"))[0] == 0
    code, out, err = run(capsys, *common, "--epochs", "3", "--resume", str(tmp_path / "b.npz"),
                         "--save", str(tmp_path / "c.npz"))
    assert code == 0, err
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "c.npz") as c:
        for key in ("model.flat", "optim.state.exp_avg", "optim.state.exp_avg_sq"):
            np.testing.assert_array_equal(a[key], c[key])


def test_train_resume_refuses_a_checkpoint_of_another_cell(capsys, tmp_path):
    assert run(capsys, "--cell", "lstm", "--epochs", "1", "--save", str(tmp_path / "m.npz"))[0] == 0
    for cell in ("rnn", "gru"):
        args = ["--epochs", "2", "--resume", str(tmp_path / "m.npz")]
        code, out, err = run(capsys, "--cell", cell, *args)        # without --cell: the checkpoint's
        assert code == 2 and "Traceback" not in err
        assert f"--cell {cell} differs from the lstm that checkpoint" in err and "drop --cell" in err


def test_train_cell_is_checked_and_documented(capsys):
    code, out, err = run(capsys, "--cell", "transformer")
    assert code == 2 and "invalid choice: 'transformer'" in err
    assert charrnn.main(["--help"]) == 0
    assert "--cell {rnn,gru,lstm}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cell must be one of"):
        charrnn.train(np.zeros(100, int), data.Vocab(list("ab")), cell="GRU")


# ----------------------------------------------------------------------------- 8. python -m fastbptt warmup

# Counts Numba's compilations (cache misses) of fastbptt's kernels over what a user runs: the
# cell's every path, other sizes (B = 1, H = 1, no bias), predict, the diagnostics, the optimizers.
USER_SCRIPT = r"""
import gc, sys, warnings
import numpy as np
from numba.core.registry import CPUDispatcher
import fastbptt
from fastbptt import data, diagnostics, optim, training
from fastbptt.generate import predict
cell, dtype = sys.argv[1], np.dtype(sys.argv[2])
warnings.simplefilter("ignore")
rng = np.random.default_rng(5)
for T, B, D, H, O in [(7, 5, 6, 9, 6), (4, 1, 5, 1, 5), (2, 3, 4, 1, 4), (6, 64, 5, 70, 5)]:
    m = fastbptt.CELLS[cell](D, H, O, dtype=dtype, bias=bool(B % 2))
    X = rng.integers(0, D, (T, B)).astype(np.int32)
    Xd = rng.normal(size=(T, B, D)).astype(dtype)
    Y = rng.integers(0, O, (T, B))
    Ym = np.asfortranarray(rng.normal(size=(T, B, O)).astype(dtype))
    for method in ("auto", "fused", "blas"):
        for parallel in (False, True):
            fastbptt.loss_and_grad(m, X, Y, parallel=parallel, method=method, carry=np.ones(T, dtype),
                                   return_dX=True, return_dh0=True)
            fastbptt.loss_and_grad(m, Xd, Ym, loss="mse", parallel=parallel, method=method)
    ws = fastbptt.Workspace(m, T, B)
    fastbptt.loss_and_grad(m, X, Y, workspace=ws)
    diagnostics.hidden_grad_norms(m, ws)
    for name in optim.OPTIMIZERS:
        training.train_step(m, X, Y, optim.make_optimizer(name, m, 0.1), workspace=ws, clip=0.5,
                            clip_value=0.1)
vocab = data.Vocab(list("abcdefg"))
m = fastbptt.CELLS[cell](len(vocab), 8, len(vocab), dtype=dtype)
predict(m, vocab, "abc", 5)
predict(m, vocab, "abc", 5, temperature=1.0, rng=0)
kernels = [f for f in gc.get_objects() if isinstance(f, CPUDispatcher)
           and getattr(f.py_func, "__module__", "").startswith("fastbptt")]
compiled = {f.py_func.__name__: sum(f.stats.cache_misses.values()) for f in kernels}
print("loaded", sum(sum(f.stats.cache_hits.values()) for f in kernels))
print("compiled", {k: v for k, v in compiled.items() if v})
"""


def test_warmup_fills_the_cache_with_every_kernel_a_user_reaches(tmp_path):
    """In a fresh NUMBA_CACHE_DIR, ``warmup --cell gru --dtype float32`` writes the cache; a new process
    then runs the GRU every way a user can, and compiles nothing."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "fastbptt", "warmup", "--cell", "gru", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gru ") and lines[0].endswith(" s  (float32)")
    assert lines[1].startswith("optimizers ") and str(tmp_path / "cache") in lines[-1]
    assert not any(line.startswith(("rnn", "lstm")) for line in lines)
    assert list((tmp_path / "cache").rglob("*.nbi")), "no index file in NUMBA_CACHE_DIR"
    proc = subprocess.run([sys.executable, "-c", USER_SCRIPT, "gru", "float32"], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "compiled {}" in proc.stdout, proc.stdout
    assert int(proc.stdout.split()[1]) > 10


def test_warmup_quiet_and_bad_arguments(capsys, monkeypatch):
    from fastbptt.training import warmup
    done = []
    monkeypatch.setattr(warmup, "warm_cell", lambda cell, dtype: done.append((cell, dtype)))
    monkeypatch.setattr(warmup, "warm_optim", lambda dtype: done.append(("optim", dtype)))
    monkeypatch.setattr(warmup, "unreached", lambda found=None: [])     # nothing compiled here: not checked
    assert warmup.main(["-q", "--cell", "lstm", "--cell", "rnn"]) == 0
    assert capsys.readouterr().out == ""
    assert done == [("lstm", "float32"), ("lstm", "float64"), ("rnn", "float32"), ("rnn", "float64"),
                    ("optim", "float32"), ("optim", "float64")]
    done.clear()
    assert warmup.main(["--dtype", "float64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["rnn", "gru", "lstm", "optimizers", "total"]
    assert done == [("rnn", "float64"), ("gru", "float64"), ("lstm", "float64"), ("optim", "float64")]
    assert warmup.main(["--cell", "transformer"]) == 2
    assert "invalid choice: 'transformer'" in capsys.readouterr().err
    assert warmup.main(["--dtype", "float16"]) == 2
    with pytest.raises(ValueError, match="cell must be one of"):
        warmup.warmup(["GRU"])


def test_top_level_help_lists_warmup():
    proc = subprocess.run([sys.executable, "-m", "fastbptt", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "warmup" in proc.stdout
