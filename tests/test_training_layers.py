"""The training tools on stacked, bidirectional models with dropout and lengths (issue 9):
the command line's --layers and --dropout, truncated BPTT carrying (L·dirs, B, H) states,
training and evaluation modes, checkpoints of stacks and their dropout generator (bitwise
resume), generation, per-layer diagnostics, and examples/bidirectional_tagger.py."""

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastbptt
from fastbptt import charrnn, checkpoint, data, diagnostics, optim, training
from fastbptt.generate import predict

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "12", "--steps", "8", "--batch", "4", "--max-tokens", "600", "--quiet"]
CELLS = ["rnn", "gru", "lstm"]


def make(cell="gru", D=5, H=4, O=5, L=2, bidirectional=False, dropout=0.0, seed=0, dtype=np.float64):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # dropout with one layer warns; some tests mean it
        model = fastbptt.CELLS[cell](D, H, O, seed=seed, dtype=dtype, num_layers=L,
                                     bidirectional=bidirectional, dropout=dropout)
    rng = np.random.default_rng(seed + 100)
    model.flat[...] = rng.normal(0, 0.5, model.n_params)   # larger weights: every term counts
    return model


def tokens(T, B, V, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))


def state_copy(state):
    return tuple(s.copy() for s in state) if isinstance(state, tuple) else state.copy()


# ----------------------------------------------------------------------------- the command line


def run_cli(capsys, *args):
    code = charrnn.main([*SMALL, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_a_stack_with_dropout(capsys, tmp_path):
    code, out, err = run_cli(capsys, "--cell", "gru", "--layers", "2", "--dropout", "0.2", "--epochs", "2",
                             "--optimizer", "adam", "--lr", "0.01", "--save", str(tmp_path / "m.npz"),
                             "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "L=2, dropout=0.2" in out and "perplexity with dropout off" in out and "sample: the zen" in out
    config = checkpoint.read_config(tmp_path / "m.npz")
    assert (config["num_layers"], config["bidirectional"], config["dropout"]) == (2, False, 0.2)
    model = checkpoint.load(tmp_path / "m.npz").model
    assert model.num_layers == 2 and model.dropout == 0.2 and "W_hh_l1" in model.params
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result) == {"perplexity", "tokens_per_s", "epochs", "eval_perplexity"}
    assert 1 < result["eval_perplexity"] < 28


def test_cli_without_dropout_keeps_its_json_and_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "--layers", "3", "--epochs", "1", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "L=3)" in out and "dropout=" not in out and "dropout off" not in out
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"perplexity", "tokens_per_s", "epochs"}


@pytest.mark.parametrize("args, message", [
    (["--layers", "0"], "--layers must be a positive integer"),
    (["--dropout", "0.3"], "--dropout applies between stacked layers, and there is one"),
    (["--layers", "2", "--dropout", "1.01"], "--dropout must be a number in [0, 1]"),
    (["--layers", "2", "--dropout", "-0.1"], "--dropout must be a number in [0, 1]"),
    (["--layers", "2", "--dropout", "lots"], "--dropout must be a number in [0, 1]"),
])
def test_cli_refuses_bad_layers_and_dropout(capsys, args, message):
    code, out, err = run_cli(capsys, "--epochs", "1", *args)
    assert code == 2 and message in err and not out


def test_cli_resume_of_a_stack_with_dropout_is_bitwise(capsys, tmp_path):
    """3 epochs at once, or 2 then 1 more from the checkpoint: the same bits (the dropout
    generator's state is saved, and compiling the kernels draws nothing from it)."""
    common = ["--cell", "lstm", "--layers", "2", "--dropout", "0.4", "--optimizer", "adam", "--lr", "0.01",
              "--predict", "0"]
    assert run_cli(capsys, *common, "--epochs", "3", "--save", str(tmp_path / "a.npz"))[0] == 0
    assert run_cli(capsys, *common, "--epochs", "2", "--save", str(tmp_path / "b.npz"))[0] == 0
    code, _, err = run_cli(capsys, *common, "--epochs", "3", "--resume", str(tmp_path / "b.npz"),
                           "--save", str(tmp_path / "c.npz"))
    assert code == 0, err
    a, b, c = (checkpoint.load(tmp_path / f"{n}.npz") for n in "abc")
    assert not np.array_equal(a.model.flat, b.model.flat)
    np.testing.assert_array_equal(c.model.flat, a.model.flat)
    assert c.model.generator.bit_generator.state == a.model.generator.bit_generator.state
    for k, v in a.optimizer.state.items():
        np.testing.assert_array_equal(c.optimizer.state[k], v)


@pytest.mark.parametrize("flags, message", [
    (["--layers", "3", "--dropout", "0.4"], "--layers 3 differs from the 2 that checkpoint"),
    (["--layers", "2", "--dropout", "0.1"], "--dropout 0.1 differs from the 0.4 that checkpoint"),
])
def test_cli_resume_names_the_layers_and_dropout_it_needs(capsys, tmp_path, flags, message):
    assert run_cli(capsys, "--layers", "2", "--dropout", "0.4", "--epochs", "1", "--predict", "0",
                   "--save", str(tmp_path / "m.npz"))[0] == 0
    code, _, err = run_cli(capsys, *flags, "--epochs", "2", "--resume", str(tmp_path / "m.npz"))
    assert code == 2 and message in err


# ----------------------------------------------------------------------------- truncated BPTT


@pytest.mark.parametrize("cell, L, bidirectional", [("lstm", 2, False), ("gru", 2, True), ("rnn", 3, False)])
def test_train_epoch_carries_every_layers_state(cell, L, bidirectional):
    """train_epoch's carried state (a view into the workspace, (L·dirs, B, H)) gives the bits of
    a loop that copies the state between chunks; and it is carried (not reset)."""
    T, B, V = 6, 3, 5
    corpus = np.random.default_rng(1).integers(0, V, 200)
    batches = list(data.sequential_batches(corpus, T, B))[:4]
    runs = {}
    for how in ("epoch", "by hand", "reset"):
        model = make(cell, V, 4, V, L, bidirectional, dropout=0.3)
        ws = fastbptt.Workspace(model, T, B)
        opt = optim.SGD(model, lr=0.1)
        if how == "by hand":
            h = None
            for X, Y in batches:
                _, _, h = training.train_step(model, X, Y, opt, workspace=ws, h0=h, clip=1.0)
                h = state_copy(h)
                assert (h[0] if cell == "lstm" else h).shape == (L * model.num_directions, B, 4)
        else:
            training.train_epoch(model, batches, opt, workspace=ws, clip=1.0, carry_state=how == "epoch")
        runs[how] = model.flat.copy()
    np.testing.assert_array_equal(runs["epoch"], runs["by hand"])
    assert not np.array_equal(runs["epoch"], runs["reset"])


def test_steps_train_with_dropout_and_restore_the_mode():
    T, B, V = 5, 2, 5
    X, Y = tokens(T, B, V)
    model = make("gru", V, 4, V, 2, dropout=0.5).eval()
    ws = fastbptt.Workspace(model, T, B)
    opt = optim.SGD(model, lr=0.1)
    before = model.generator.bit_generator.state
    training.train_step(model, X, Y, opt, workspace=ws)
    assert not model.training                                    # put back as it was
    assert model.generator.bit_generator.state != before          # masks were drawn
    assert set(np.unique(ws.dropout_masks()[0])) == {0.0, 2.0}
    training.train_epoch(model, [(X, Y)], opt, workspace=ws)
    assert not model.training and set(np.unique(ws.dropout_masks()[0])) == {0.0, 2.0}
    model.train()
    training.train_step(model, X, Y, opt, workspace=ws)
    assert model.training


def test_train_step_with_lengths_is_loss_and_grad_with_lengths():
    T, B, V = 6, 3, 5
    X, Y = tokens(T, B, V, seed=2)
    lengths = np.array([2, 6, 4])
    X[lengths[None, :] <= np.arange(T)[:, None]] = 99               # padding: never read
    a, b = make("lstm", V, 4, V, 2, True), make("lstm", V, 4, V, 2, True)
    ws_a, ws_b = fastbptt.Workspace(a, T, B), fastbptt.Workspace(b, T, B)
    loss, norm, h = training.train_step(a, X, Y, optim.SGD(a, lr=0.1), workspace=ws_a, lengths=lengths)
    ref_loss, _, ref_h = fastbptt.loss_and_grad(b, X, Y, lengths=lengths, workspace=ws_b)
    assert loss == ref_loss and norm == optim.grad_norm(ws_b.grad_flat)
    np.testing.assert_array_equal(h[0], ref_h[0])
    optim.SGD(b, lr=0.1).step(ws_b.grad_flat)
    np.testing.assert_array_equal(a.flat, b.flat)


def test_evaluate_runs_without_dropout_and_changes_nothing():
    T, B, V = 6, 3, 5
    corpus = np.random.default_rng(3).integers(0, V, 120)
    batches = list(data.sequential_batches(corpus, T, B))
    model = make("lstm", V, 4, V, 2, dropout=0.5)
    flat, gen = model.flat.copy(), model.generator.bit_generator.state
    result = training.evaluate(model, batches)
    assert model.training and model.generator.bit_generator.state == gen
    np.testing.assert_array_equal(model.flat, flat)
    # the same by hand: dropout off, the state carried
    model.eval()
    h, total = None, 0.0
    for X, Y in batches:
        loss, _, h = fastbptt.loss_and_grad(model, X, Y, h)
        total += loss
    assert result.loss == pytest.approx(total / len(batches), rel=1e-12)
    assert result.tokens == len(batches) * T * B and result.perplexity == pytest.approx(np.exp(result.loss))
    with pytest.raises(ValueError, match="no batch"):
        training.evaluate(model, [])


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("L, bidirectional", [(1, True), (3, False), (2, True)])
def test_checkpoint_round_trips_a_stack(tmp_path, cell, L, bidirectional):
    model = make(cell, 3, 4, 5, L, bidirectional, dropout=0.25 if L > 1 else 0.0, dtype=np.float32)
    model.generator.random(7)                                     # somewhere along its stream
    checkpoint.save(tmp_path / "m.npz", model)
    draws = model.generator.random(3)                             # what it draws next
    got = checkpoint.load(tmp_path / "m.npz").model
    assert type(got) is type(model) and repr(got) == repr(model)
    assert (got.num_layers, got.bidirectional, got.dropout) == (L, bidirectional, model.dropout)
    np.testing.assert_array_equal(got.flat, model.flat)
    assert set(got.params) == set(model.params)
    np.testing.assert_array_equal(got.generator.random(3), draws)  # the same stream from there on
    target = make(cell, 3, 4, 5, L, bidirectional, dropout=model.dropout, dtype=np.float32, seed=9)
    held = target.generator
    checkpoint.load(tmp_path / "m.npz", target)                   # into a model: in place
    np.testing.assert_array_equal(target.flat, model.flat)
    assert target.generator is held
    np.testing.assert_array_equal(held.random(3), draws)


@pytest.mark.parametrize("change, message", [
    ({"num_layers": 3}, r"holds GRU\(.*num_layers=2, dropout=0\.25\), but the model is GRU\(.*num_layers=3"),
    ({"bidirectional": True}, r"but the model is GRU\(.*bidirectional=True"),
    ({"dropout": 0.5}, r"but the model is GRU\(.*dropout=0\.5\)"),
])
def test_loading_into_another_stack_is_refused_untouched(tmp_path, change, message):
    checkpoint.save(tmp_path / "m.npz", make("gru", L=2, dropout=0.25))
    kwargs = {"L": 2, "bidirectional": False, "dropout": 0.25}
    kwargs.update({{"num_layers": "L"}.get(k, k): v for k, v in change.items()})
    target = make("gru", seed=5, **kwargs)
    before, gen = target.flat.copy(), target.generator.bit_generator.state
    with pytest.raises(ValueError, match=message):
        checkpoint.load(tmp_path / "m.npz", target)
    np.testing.assert_array_equal(target.flat, before)
    assert target.generator.bit_generator.state == gen


def before_stacks(src, dst):
    """A copy of a checkpoint as the release before stacks wrote it: no num_layers, bidirectional,
    dropout in model.config, and no model.generator member."""
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files if k != "model.generator"}
    config = json.loads(str(arrays["model.config"]))
    for key in ("num_layers", "bidirectional", "dropout"):
        del config[key]
    arrays["model.config"] = np.array(json.dumps(config))
    np.savez(dst, **arrays)
    return dst


@pytest.mark.parametrize("cell", CELLS)
def test_a_checkpoint_from_before_stacks_still_loads(tmp_path, cell):
    model = make(cell, L=1)
    opt = optim.Adam(model, lr=0.01)
    opt.step(np.ones(model.n_params))
    checkpoint.save(tmp_path / "new.npz", model, opt, extra={"epoch": 1})
    old = before_stacks(tmp_path / "new.npz", tmp_path / "old.npz")
    config = checkpoint.read_config(old)
    assert (config["num_layers"], config["bidirectional"], config["dropout"]) == (1, False, 0.0)
    got = checkpoint.load(old)
    assert got.model.num_layers == 1 and not got.model.bidirectional and got.model.dropout == 0.0
    np.testing.assert_array_equal(got.model.flat, model.flat)
    assert got.optimizer.t == 1 and got.extra == {"epoch": 1}
    target = make(cell, L=1, seed=3)
    gen = target.generator.bit_generator.state
    checkpoint.load(old, target)
    np.testing.assert_array_equal(target.flat, model.flat)
    assert target.generator.bit_generator.state == gen             # nothing saved: left as it is


def rewrite(src, dst, config_change=None, drop_config=(), generator=None):
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    config = json.loads(str(arrays["model.config"]))
    config.update(config_change or {})
    for key in drop_config:
        del config[key]
    arrays["model.config"] = np.array(json.dumps(config))
    if generator is not None:
        arrays["model.generator"] = np.array(json.dumps(generator))
    np.savez(dst, **arrays)
    return dst


@pytest.mark.parametrize("kwargs, message", [
    ({"config_change": {"num_layers": 0}}, "num_layers must be a positive int, got 0"),
    ({"config_change": {"num_layers": "2"}}, "num_layers must be a positive int, got '2'"),
    ({"config_change": {"num_layers": True}}, "num_layers must be a positive int, got True"),
    ({"config_change": {"num_layers": 10 ** 9}}, r"declares 1000000000 layers, but member 'model.flat.npy' takes only"),
    ({"config_change": {"bidirectional": "yes"}}, "bidirectional must be true or false"),
    ({"config_change": {"dropout": 1.5}}, r"dropout must be a number in \[0, 1\], got 1.5"),
    ({"config_change": {"dropout": -0.5}}, r"dropout must be a number in \[0, 1\], got -0.5"),
    ({"config_change": {"dropout": None}}, r"dropout must be a number in \[0, 1\], got None"),
    ({"drop_config": ("dropout",)}, r"must hold exactly .*\(or none of these three\)"),
    ({"config_change": {"layers": 2}}, r"must hold exactly"),
    ({"generator": {"bit_generator": "Evil"}}, "model.generator must be the state of one of numpy's"),
    ({"generator": [1, 2]}, "model.generator must be the state of one of numpy's"),
    ({"generator": {"bit_generator": "PCG64", "state": {"state": "x"}}}, r"model.generator must hold exactly \["),
])
def test_a_tampered_stack_config_or_generator_is_refused(tmp_path, kwargs, message):
    model = make("gru", L=2, dropout=0.25)
    checkpoint.save(tmp_path / "m.npz", model)
    bad = rewrite(tmp_path / "m.npz", tmp_path / "bad.npz", **kwargs)
    target = make("gru", L=2, dropout=0.25, seed=4)
    before, gen = target.flat.copy(), target.generator.bit_generator.state
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(bad, target if "generator" in kwargs else None)
    np.testing.assert_array_equal(target.flat, before)
    assert target.generator.bit_generator.state == gen


def test_a_generator_of_another_kind_is_restored_too(tmp_path):
    model = make("gru", L=2, dropout=0.25)
    model.generator = np.random.Generator(np.random.MT19937(5))
    model.generator.random(3)
    checkpoint.save(tmp_path / "m.npz", model)
    got = checkpoint.load(tmp_path / "m.npz").model                 # built with a PCG64
    assert type(got.generator.bit_generator) is np.random.MT19937
    np.testing.assert_array_equal(got.generator.random(4), model.generator.random(4))


@pytest.mark.parametrize("cell", CELLS)
def test_resumed_training_with_dropout_is_bitwise(tmp_path, cell):
    """Six steps, or three, a checkpoint, and three more on the loaded model and optimizer."""
    T, B, V = 5, 3, 6
    batches = [tokens(T, B, V, seed=s) for s in range(6)]

    def steps(model, opt, part):
        ws = fastbptt.Workspace(model, T, B)
        for X, Y in part:
            training.train_step(model, X, Y, opt, workspace=ws, clip=1.0)

    model = make(cell, V, 4, V, 2, True, dropout=0.3)
    opt = optim.Adam(model, lr=0.01)
    steps(model, opt, batches)
    half = make(cell, V, 4, V, 2, True, dropout=0.3)
    half_opt = optim.Adam(half, lr=0.01)
    steps(half, half_opt, batches[:3])
    checkpoint.save(tmp_path / "half.npz", half, half_opt)
    resumed = checkpoint.load(tmp_path / "half.npz")
    steps(resumed.model, resumed.optimizer, batches[3:])
    np.testing.assert_array_equal(resumed.model.flat, model.flat)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("cell", CELLS)
def test_predict_on_a_stack_is_the_greedy_chain_of_one_forward(cell):
    vocab = data.Vocab(list("abcdefgh "))
    V = len(vocab)
    model = make(cell, V, 6, V, 2, dropout=0.5, seed=2, dtype=np.float32)
    gen = model.generator.bit_generator.state
    text = predict(model, vocab, "bad cafe", 12)
    assert model.training and model.generator.bit_generator.state == gen   # no dropout, no draws
    ids = vocab[list(text)]
    model.eval()
    O, _ = fastbptt.forward(model, np.array(ids[:-1])[:, None])           # the whole text at once
    np.testing.assert_array_equal(O[7:, 0].argmax(axis=1), ids[8:])       # every generated token


def test_predict_refuses_a_bidirectional_model():
    vocab = data.Vocab(list("abc"))
    model = make("gru", len(vocab), 4, len(vocab), 1, True)
    with pytest.raises(ValueError, match="bidirectional model's reverse direction"):
        predict(model, vocab, "ab", 3)


# ----------------------------------------------------------------------------- diagnostics per layer

torch = None
try:
    import torch
except ImportError:  # pragma: no cover - torch is in the compare extra
    pass
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch (pip install torch)")


def torch_hidden_grads(model, X, Y, lengths, masks):
    """∂L/∂h_t of every layer and direction (the total derivative: from above and from step t+1),
    each sequence unrolled alone in PyTorch float64, as dict (k, d) -> (T, B, H); zero at padding."""
    T, B = X.shape
    H, L, dirs = model.hidden_size, model.num_layers, model.num_directions
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}
    V = model.input_size
    cellf = {"rnn": torch.rnn_tanh_cell, "gru": torch.gru_cell, "lstm": torch.lstm_cell}[model.cell]
    hs = {}
    loss = 0.0
    for b in range(B):
        n = int(lengths[b])
        inp = torch.eye(V, dtype=torch.float64)[torch.tensor(X[:n, b])]
        for k in range(L):
            outs = []
            for d in range(dirs):
                names = model.layer_names(k, d)
                W_ih, W_hh = P[names["W_ih"]], P[names["W_hh"]]
                b_ih = P[names["b_ih"]] if names["b_ih"] else torch.zeros(W_hh.shape[0], dtype=torch.float64)
                b_hh = P[names["b_hh"]] if names["b_hh"] else torch.zeros(W_hh.shape[0], dtype=torch.float64)
                state = torch.zeros(1, H, dtype=torch.float64)
                c = torch.zeros(1, H, dtype=torch.float64)
                out = [None] * n
                for t in (range(n) if d == 0 else reversed(range(n))):
                    if model.cell == "lstm":
                        state, c = cellf(inp[t:t + 1], (state, c), W_ih, W_hh, b_ih, b_hh)
                    else:
                        state = cellf(inp[t:t + 1], state, W_ih, W_hh, b_ih, b_hh)
                    state.retain_grad()
                    hs[k, d, b, t] = state
                    out[t] = state
                outs.append(torch.cat(out, 0))
            inp = torch.cat(outs, 1)
            if k < L - 1:
                inp = inp * torch.tensor(masks[k][:n, b])
        logits = inp @ P["W_qh"].T + P["b_q"]
        loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(Y[:n, b]), reduction="sum")
    (loss / int(lengths.sum())).backward()
    grads = {}
    for k in range(L):
        for d in range(dirs):
            g = np.zeros((T, B, H))
            for b in range(B):
                for t in range(int(lengths[b])):
                    g[t, b] = hs[k, d, b, t].grad.numpy()[0]
            grads[k, d] = g
    return grads


@needs_torch
@pytest.mark.parametrize("cell, L, bidirectional, with_lengths", [
    ("rnn", 3, False, True), ("rnn", 2, True, True), ("gru", 2, True, True), ("lstm", 2, False, False),
    ("lstm", 1, True, True), ("rnn", 1, False, False),
])
def test_hidden_grads_of_every_layer_against_pytorch(cell, L, bidirectional, with_lengths):
    T, B, V = 6, 3, 5
    X, Y = tokens(T, B, V, seed=7)
    lengths = np.array([4, 6, 1]) if with_lengths else np.full(B, T)
    model = make(cell, V, 4, V, L, bidirectional, dropout=0.4 if L > 1 else 0.0, seed=3)
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, lengths=lengths if with_lengths else None, workspace=ws)
    want = torch_hidden_grads(model, X, Y, lengths, ws.dropout_masks())
    for (k, d), g in want.items():
        got = diagnostics.hidden_grads(model, ws, layer=k, direction=d)
        np.testing.assert_allclose(got, g, rtol=1e-9, atol=1e-12, err_msg=f"layer {k}, direction {d}")
        norms = diagnostics.hidden_grad_norms(model, ws, layer=k, direction=d, per_sequence=True)
        np.testing.assert_allclose(norms, np.linalg.norm(g, axis=2), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(diagnostics.hidden_grads(model, ws),
                                  diagnostics.hidden_grads(model, ws, layer=L - 1))   # default: the top


@pytest.mark.parametrize("cell, bidirectional", [("rnn", False), ("rnn", True), ("gru", True), ("lstm", False)])
def test_the_first_steps_gradient_leads_to_dh0(cell, bidirectional):
    """Without PyTorch: ∂L/∂h_0 of every layer (loss_and_grad's return_dh0) is what the first step's
    ∂L/∂h (hidden_grads) sends back through that step, for every sequence of its own length."""
    T, B, V, H, L = 5, 3, 5, 4, 2
    X, Y = tokens(T, B, V, seed=8)
    lengths = np.array([5, 2, 3])
    model = make(cell, V, H, V, L, bidirectional, seed=1)
    h0 = np.random.default_rng(2).normal(size=(L * model.num_directions, B, H))
    if cell == "lstm":
        h0 = (h0, h0 * 0.5)
    ws = fastbptt.Workspace(model, T, B)
    *_, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, lengths=lengths, workspace=ws, return_dh0=True)
    dh0 = dh0[0] if cell == "lstm" else dh0
    if cell == "rnn":
        for k in range(L):
            for d in range(model.num_directions):
                g = diagnostics.hidden_grads(model, ws, layer=k, direction=d)
                first = [0 if d == 0 else n - 1 for n in lengths]           # the direction's first step
                W_hh = model.params[model.layer_names(k, d)["W_hh"]]
                state = diagnostics.hidden_states(model, ws, layer=k, direction=d)
                for b, t in enumerate(first):
                    dz = g[t, b] * (1 - state[t, b] ** 2)                     # tanh' at that step
                    np.testing.assert_allclose(W_hh.T @ dz, dh0[k * model.num_directions + d, b],
                                               rtol=1e-9, atol=1e-12)
    else:
        for k in range(L):
            g = diagnostics.hidden_grads(model, ws, layer=k)
            assert g.shape == (T, B, H) and np.all(g[2:, 1] == 0)          # zero at padding
        if cell == "lstm":
            c = diagnostics.cell_grads(model, ws, layer=0, direction=0)
            assert c.shape == (T, B, H) and np.all(c[3:, 2] == 0)


def test_carry_weights_with_lengths_in_the_callers_order():
    """Carry weights are the caller's (T, B), while the workspace keeps its rows sorted by length: the
    Elman rebuild uses them in its order (∂L/∂h_0 = c_0 W_hhᵀ ∂L/∂z_0 on every layer), and a gated
    cell accepts the call's own weights back and refuses others."""
    T, B, V, H, L = 5, 3, 5, 4, 2
    X, Y = tokens(T, B, V, seed=4)
    lengths = np.array([2, 5, 3])                                    # sorted inside: rows [1, 2, 0]
    carry = np.random.default_rng(5).uniform(0.2, 2.0, (T, B))
    model = make("rnn", V, H, V, L, seed=6)
    h0 = np.random.default_rng(7).normal(size=(L, B, H))
    ws = fastbptt.Workspace(model, T, B)
    *_, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, lengths=lengths, carry=carry, workspace=ws,
                                     return_dh0=True)
    for k in range(L):
        g = diagnostics.hidden_grads(model, ws, layer=k)
        h1 = diagnostics.hidden_states(model, ws, layer=k)[0]
        W_hh = model.params[model.layer_names(k)["W_hh"]]
        for b in range(B):
            np.testing.assert_allclose(carry[0, b] * W_hh.T @ (g[0, b] * (1 - h1[b] ** 2)), dh0[k, b],
                                       rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(g, diagnostics.hidden_grads(model, ws, carry, layer=k))
    gru = make("gru", V, H, V, L, seed=6)
    ws = fastbptt.Workspace(gru, T, B)
    fastbptt.loss_and_grad(gru, X, Y, h0, lengths=lengths, carry=carry, workspace=ws)
    np.testing.assert_array_equal(diagnostics.hidden_grads(gru, ws, carry), diagnostics.hidden_grads(gru, ws))
    with pytest.raises(ValueError, match="carry differs from the carry weights the last call used"):
        diagnostics.hidden_grads(gru, ws, carry[:, ::-1])


def test_padded_sequences_train_as_each_sequence_alone():
    """pad_sequences' X and lengths in loss_and_grad: the loss of each sequence alone, weighted by its
    length, and the same gradients; the padding value does not matter."""
    V = 6
    rng = np.random.default_rng(9)
    seqs = [rng.integers(0, V, n) for n in (4, 1, 6, 3)]
    tags = [rng.integers(0, V, len(q)) for q in seqs]
    model = make("lstm", V, 4, V, 2, True)
    X, lengths = data.pad_sequences(seqs, pad=V + 7)                   # out of range: never read
    Y, _ = data.pad_sequences(tags, pad=-1)
    loss, grads, _ = fastbptt.loss_and_grad(model, X, Y, lengths=lengths)
    alone = [fastbptt.loss_and_grad(model, q[:, None], t[:, None]) for q, t in zip(seqs, tags)]
    n = lengths.sum()
    assert loss == pytest.approx(sum(a[0] * len(q) for a, q in zip(alone, seqs)) / n, rel=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(g, sum(a[1][name] * len(q) for a, q in zip(alone, seqs)) / n,
                                   rtol=1e-9, atol=1e-13)


def test_per_layer_diagnostics_refuse_bad_layers():
    T, B, V = 4, 2, 5
    X, Y = tokens(T, B, V)
    model = make("gru", V, 4, V, 2, True)
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, workspace=ws)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        diagnostics.hidden_grads(model, ws, layer=2)
    with pytest.raises(ValueError, match="direction must be 0 or 1"):
        diagnostics.hidden_grads(model, ws, direction=2)
    with pytest.raises(ValueError, match="cell_grads needs an LSTM"):
        diagnostics.cell_grads(model, ws, layer=0)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        diagnostics.hidden_states(model, ws, layer=-3)
    with pytest.raises(ValueError, match="workspace was made for a different model"):
        diagnostics.hidden_states(make("gru", V, 4, V, 3), ws)
    with pytest.raises(TypeError, match="workspace must be the fastbptt.Workspace"):
        diagnostics.hidden_states(model, None)


# ----------------------------------------------------------------------------- the example


def test_bidirectional_tagger_example_learns_what_left_to_right_cannot(capsys):
    spec = importlib.util.spec_from_file_location("bidirectional_tagger", ROOT / "examples" / "bidirectional_tagger.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert [example.TAGS[i] for i in example.tag_line("a cat is")] == list("S_BIE_BE")
    acc = example.main(["--epochs", "6"])
    out = capsys.readouterr().out
    assert "bidirectional GRU, 2 layers" in out and acc > 0.98
    # left to right, a word's last letter (E) looks like one inside it (I) until the next character
    left_to_right = example.main(["--epochs", "6", "--unidirectional"])
    assert "left to right GRU" in capsys.readouterr().out and 0.7 < left_to_right < 0.95
