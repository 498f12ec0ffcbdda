"""Truncated BPTT with carried state, randomized truncation, epochs, and generation."""

import itertools

import numpy as np
import pytest

import fastbptt
from fastbptt import data, optim, reference, training
from fastbptt.generate import predict
from helpers import assert_close, make_problem


def ref_params(model):
    return {k: v.astype(np.float64).copy() for k, v in model.params.items()}


def ref_grads(params, X, Y, h0, carry=None, activation="tanh"):
    L, g, hT, _, _ = reference.loss_and_grad(params, X, Y, h0, activation, carry=carry)
    return L, g, hT


# ----------------------------------------------------------------------------- truncated BPTT


def test_train_step_carries_state_but_not_gradient_across_chunks():
    """Two steps over consecutive chunks = the reference on chunk 1, an update, then the
    reference on chunk 2 alone from chunk 1's final state, and an update."""
    model, X, Y, h0 = make_problem(T=10, B=3, inputs="tokens")
    ws = fastbptt.Workspace(model, 5, 3)
    opt = optim.SGD(model, lr=0.5)
    p = ref_params(model)
    L1, g1, h1 = ref_grads(p, X[:5], Y[:5], h0)
    for k in p:
        p[k] = p[k] - 0.5 * g1[k]
    L2, g2, h2 = ref_grads(p, X[5:], Y[5:], h1)
    for k in p:
        p[k] = p[k] - 0.5 * g2[k]

    r1 = training.train_step(model, X[:5], Y[:5], opt, workspace=ws, h0=h0)
    assert_close("loss 1", r1.loss, L1, np.float64)
    assert_close("h_T 1", r1.h_T, h1, np.float64)
    r2 = training.train_step(model, X[5:], Y[5:], opt, workspace=ws, h0=r1.h_T)
    assert_close("loss 2", r2.loss, L2, np.float64)
    assert_close("h_T 2", r2.h_T, h2, np.float64)
    for k in p:
        assert_close(k, model.params[k], p[k], np.float64)


def test_train_step_clips_and_reports_the_norm():
    model, X, Y, h0 = make_problem(T=5, B=3, inputs="tokens")
    ws = fastbptt.Workspace(model, 5, 3)
    _, g, _ = ref_grads(ref_params(model), X, Y, h0)
    norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    before = model.flat.copy()
    r = training.train_step(model, X, Y, optim.SGD(model, lr=1.0), workspace=ws, h0=h0, clip=norm / 2)
    assert_close("norm", r.grad_norm, norm, np.float64)
    flat_g = np.concatenate([g[k].ravel() for k, _ in model.layout])
    assert_close("update", model.flat - before, -flat_g / 2, np.float64)
    r = training.train_step(model, X, Y, optim.SGD(model, lr=1.0), workspace=ws, clip_value=1e-3)
    assert r.grad_norm > 1e-3


def test_train_step_bad_input():
    model, X, Y, h0 = make_problem(T=5, B=3, inputs="tokens")
    ws = fastbptt.Workspace(model, 5, 3)
    with pytest.raises(TypeError, match="optimizer must be"):
        training.train_step(model, X, Y, "sgd", workspace=ws)
    with pytest.raises(ValueError, match="different model"):
        training.train_step(model, X, Y, optim.SGD(fastbptt.RNN(4, 6, 5), 0.1), workspace=ws)


def test_train_step_without_a_workspace_is_refused_before_any_work(monkeypatch):
    model, X, Y, h0 = make_problem(T=5, B=3, inputs="tokens")
    opt = optim.SGD(model, lr=0.5)
    before = model.flat.copy()

    def must_not_run(*args, **kwargs):
        raise AssertionError("loss_and_grad ran before the arguments were checked")
    monkeypatch.setattr(training.api, "loss_and_grad", must_not_run)
    for call in (lambda: training.train_step(model, X, Y, opt, workspace=None),
                 lambda: training.train_epoch(model, [(X, Y)], opt, workspace=None)):
        with pytest.raises(TypeError, match=r"needs workspace=fastbptt.Workspace\(model, T, B\)"):
            call()
    np.testing.assert_array_equal(model.flat, before)
    assert opt.t == 0


# ----------------------------------------------------------------------------- randomized truncation


def test_random_truncation_draws_zero_or_one_over_pi():
    rng = np.random.default_rng(0)
    xi = training.random_truncation(20000, 0.3, rng)
    assert set(np.unique(xi)) == {0.0, 1 / 0.3}
    frac = np.mean(xi > 0)
    assert abs(frac - 0.3) < 5 * np.sqrt(0.3 * 0.7 / xi.size)
    assert xi.shape == (20000,) and xi.dtype == np.float64
    out = np.empty((7, 3), np.float32)
    assert training.random_truncation(7, 0.5, rng, out=out) is out
    assert set(np.unique(out)) <= {0.0, 2.0}
    np.testing.assert_array_equal(training.random_truncation(9, 1.0, rng, B=2), np.ones((9, 2)))
    with pytest.raises(ValueError, match="pi must be > 0"):
        training.random_truncation(5, 0.0, rng)
    with pytest.raises(ValueError, match="pi must be <= 1"):
        training.random_truncation(5, 1.5, rng)
    with pytest.raises(TypeError, match="rng must be"):
        training.random_truncation(5, 0.5, "0")
    with pytest.raises(TypeError, match="random_truncation needs rng"):
        training.random_truncation(5, 0.5, None)


def test_random_truncation_takes_an_int_seed():
    np.testing.assert_array_equal(training.random_truncation(50, 0.5, 0, B=3),
                                  training.random_truncation(50, 0.5, np.random.default_rng(0), B=3))
    with pytest.raises(ValueError, match="rng must be a seed >= 0"):
        training.random_truncation(5, 0.5, -1)


@pytest.mark.parametrize("dtype,pi", [(np.float32, 1e-40), (np.float32, 2e-39), (np.float64, 1e-320)])
def test_random_truncation_refuses_a_pi_whose_weight_overflows(dtype, pi):
    """1/π = Inf in the dtype would give carries 0·Inf = NaN: refused, naming π and the fix."""
    with pytest.raises(ValueError, match=r"pi = .* is too small for .* carry weights: 1/pi overflows"):
        training.random_truncation(100, pi, 0, dtype=dtype)
    with pytest.raises(ValueError, match="too small"):
        training.random_truncation(100, pi, 0, out=np.empty(100, dtype))


def test_random_truncation_with_a_small_pi_that_fits():
    xi = training.random_truncation(1000, 1e-30, 0, dtype=np.float32)
    assert np.all(np.isfinite(xi)) and set(np.unique(xi)) <= {0.0, np.float32(1e30)}


def expected_gradient(model, X, Y, h0, pi, shape, weights=None):
    """Σ over every ξ ∈ {0, w}^shape of P(ξ) · gradient(ξ), with w = 1/π unless given."""
    w = 1 / pi if weights is None else weights
    ws = fastbptt.Workspace(model, X.shape[0], X.shape[1])
    total = np.zeros(model.n_params)
    for bits in itertools.product((0, 1), repeat=int(np.prod(shape))):
        bits = np.array(bits, dtype=np.float64).reshape(shape)
        prob = np.prod(np.where(bits == 1, pi, 1 - pi))
        fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws, carry=bits * w)
        total += prob * ws.grad_flat
    return total


@pytest.mark.parametrize("shape", ["T", "TB"])
def test_randomized_truncation_is_unbiased_exactly(shape):
    """Enumerating every ξ: E[gradient] is the full-BPTT gradient (Tallec & Ollivier)."""
    T, B = (5, 2) if shape == "T" else (3, 2)
    model, X, Y, h0 = make_problem(T=T, B=B, inputs="tokens")
    full = fastbptt.loss_and_grad(model, X, Y, h0)[1]
    full = np.concatenate([full[k].ravel() for k, _ in model.layout])
    xi_shape = (T,) if shape == "T" else (T, B)
    expect = expected_gradient(model, X, Y, h0, 0.3, xi_shape)
    assert_close("E[grad]", expect, full, np.float64)
    # without the 1/π weight, truncation is biased: the check above can fail
    biased = expected_gradient(model, X, Y, h0, 0.3, xi_shape, weights=1.0)
    assert np.max(np.abs(biased - full)) > 1e-3 * np.max(np.abs(full))


def test_randomized_truncation_average_of_draws_approaches_the_full_gradient():
    model, X, Y, h0 = make_problem(T=12, B=2, inputs="tokens")
    ws = fastbptt.Workspace(model, 12, 2)
    full = fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws)[1]["W_hh"].copy()
    rng = np.random.default_rng(1)
    carry = np.empty((12, 2))
    draws = []
    for _ in range(3000):
        training.random_truncation(12, 0.5, rng, out=carry)
        draws.append(fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws, carry=carry)[1]["W_hh"].copy())
    draws = np.array(draws)
    err = np.abs(draws.mean(axis=0) - full)
    sem = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(err <= 5 * sem + 1e-12)
    assert np.max(np.abs(draws[0] - full)) > 10 * np.max(sem)     # one draw alone is not the full gradient


# ----------------------------------------------------------------------------- epochs


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_train_epoch_matches_a_manual_loop(sampling):
    corpus, vocab = data.load_corpus(text=data.default_text(), max_tokens=2000)
    T, B = 10, 4
    models = [fastbptt.RNN(len(vocab), 16, len(vocab), init="normal", seed=0) for _ in range(2)]
    opts = [optim.SGD(m, lr=1.0) for m in models]
    loaders = [data.SeqDataLoader(corpus, T, B, sampling, rng=5) for _ in range(2)]
    ws = fastbptt.Workspace(models[0], T, B)
    result = training.train_epoch(models[0], loaders[0], opts[0], workspace=ws, clip=1.0)
    losses, h = [], None
    for X, Y in loaders[1]:
        loss, _, hT = fastbptt.loss_and_grad(models[1], X, Y, h, workspace=ws)
        h = hT if sampling == "sequential" else None
        optim.clip_grad_norm(ws.grad_flat, 1.0)
        opts[1].step(ws.grad_flat)
        losses.append(loss)
    np.testing.assert_array_equal(models[0].flat, models[1].flat)
    assert result.tokens == len(losses) * T * B
    np.testing.assert_allclose(result.loss, np.mean(losses), rtol=1e-12)
    np.testing.assert_allclose(result.perplexity, np.exp(np.mean(losses)), rtol=1e-12)
    assert result.tokens_per_s > 0 and result.max_grad_norm > 0


def test_training_lowers_perplexity_and_random_truncation_runs():
    corpus, vocab = data.load_corpus(max_tokens=3000)
    model = fastbptt.RNN(len(vocab), 32, len(vocab), init="normal", seed=0)
    ws = fastbptt.Workspace(model, 20, 8)
    opt = optim.Adam(model, lr=0.01)
    loader = data.SeqDataLoader(corpus, 20, 8, rng=0)
    rng = np.random.default_rng(0)
    first = training.train_epoch(model, loader, opt, workspace=ws, clip=1.0).perplexity
    for _ in range(8):
        last = training.train_epoch(model, loader, opt, workspace=ws, clip=1.0, truncation_pi=0.5, rng=rng)
    assert first > 20 and last.perplexity < 0.75 * first
    with pytest.raises(TypeError, match="truncation_pi needs rng"):
        training.train_epoch(model, loader, opt, workspace=ws, truncation_pi=0.5)
    training.train_epoch(model, loader, opt, workspace=ws, truncation_pi=0.5, rng=0)     # an int seed
    with pytest.raises(ValueError, match="too small for float32"):
        training.train_epoch(model, loader, opt, workspace=ws, truncation_pi=1e-40, rng=0)
    with pytest.raises(ValueError, match="no batch"):
        training.train_epoch(model, [], opt, workspace=ws)


def test_train_epoch_reports_inf_perplexity_when_exp_overflows():
    """A mean loss above ~709.78 overflows exp: perplexity Inf, not an OverflowError."""
    corpus, vocab = data.load_corpus(max_tokens=3000)
    model = fastbptt.RNN(len(vocab), 8, len(vocab), seed=0, dtype=np.float64)
    model.params["W_qh"][...] = np.random.default_rng(0).normal(0, 1e4, size=model.params["W_qh"].shape)
    ws = fastbptt.Workspace(model, 10, 4)
    result = training.train_epoch(model, data.SeqDataLoader(corpus, 10, 4, rng=0), optim.SGD(model, lr=1e-12),
                                  workspace=ws)
    assert result.loss > 710 and np.isfinite(result.loss)
    assert result.perplexity == np.inf
    assert training.perplexity(2.0) == np.exp(2.0) and training.perplexity(1e6) == np.inf


# ----------------------------------------------------------------------------- generation


def numpy_greedy(model, vocab, prefix, n):
    """predict_ch8 with the reference forward, one token at a time."""
    p = ref_params(model)
    h = np.zeros((1, model.hidden_size))
    out = [vocab[prefix[0]]]
    for ch in prefix[1:]:
        _, hs, _ = reference.forward(p, np.array([[out[-1]]]), h, model.activation)
        h = hs[-1]
        out.append(vocab[ch])
    for _ in range(n):
        _, hs, O = reference.forward(p, np.array([[out[-1]]]), h, model.activation)
        h = hs[-1]
        out.append(int(np.argmax(O[0, 0])))
    return "".join(vocab.to_tokens(out))


@pytest.fixture(scope="module")
def trained():
    corpus, vocab = data.load_corpus(max_tokens=3000)
    model = fastbptt.RNN(len(vocab), 24, len(vocab), init="normal", seed=0, dtype=np.float64)
    ws = fastbptt.Workspace(model, 16, 8)
    opt = optim.Adam(model, lr=0.02)
    loader = data.SeqDataLoader(corpus, 16, 8, rng=0)
    for _ in range(5):
        training.train_epoch(model, loader, opt, workspace=ws, clip=1.0)
    return model, vocab


def test_greedy_prediction_matches_numpy(trained):
    model, vocab = trained
    got = predict(model, vocab, "time traveller", 30)
    assert got.startswith("time traveller") and len(got) == 14 + 30
    assert got == numpy_greedy(model, vocab, "time traveller", 30)
    assert predict(model, vocab, "t", 0) == "t"


def test_sampling_follows_softmax_over_temperature(trained):
    model, vocab = trained
    prefix = "the "
    p = ref_params(model)
    _, _, O = reference.forward(p, np.array([[vocab[c]] for c in prefix]), np.zeros((1, 24)))
    tau = 2.0
    z = O[-1, 0] / tau
    want = np.exp(z - z.max())
    want /= want.sum()
    rng = np.random.default_rng(0)
    n = 3000
    counts = np.zeros(len(vocab))
    for _ in range(n):
        counts[vocab[predict(model, vocab, prefix, 1, temperature=tau, rng=rng)[-1]]] += 1
    assert np.max(np.abs(counts / n - want)) < 5 * np.sqrt(0.25 / n)
    # a tiny temperature is greedy; the same seed gives the same text
    assert predict(model, vocab, prefix, 20, temperature=1e-4, rng=1) == predict(model, vocab, prefix, 20)
    assert predict(model, vocab, prefix, 20, temperature=1.0, rng=3) == \
        predict(model, vocab, prefix, 20, temperature=1.0, rng=3)


def test_predict_bad_input(trained):
    model, vocab = trained
    with pytest.raises(ValueError, match="at least one token"):
        predict(model, vocab, "", 5)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        predict(model, vocab, "a", -1)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        predict(model, vocab, "a", 3, temperature=-1)
    with pytest.raises(ValueError, match="vocabulary has 3 tokens"):
        predict(model, data.Vocab(["a", "b"]), "a", 3)
    with pytest.raises(TypeError, match="prefix must be"):
        predict(model, vocab, 42, 3)
    with pytest.raises(ValueError, match="rng must be a seed >= 0"):
        predict(model, vocab, "a", 3, temperature=1.0, rng=-1)


@pytest.mark.parametrize("tau", [1e-300, 1e-320, 5e-324])
def test_a_temperature_that_underflows_samples_greedily(trained, tau):
    """logits / τ overflows for a tiny τ: the shift comes first, so the draw is the argmax, not NaN."""
    model, vocab = trained
    assert predict(model, vocab, "the ", 20, temperature=tau, rng=0) == predict(model, vocab, "the ", 20)
