"""Stacks, directions and lengths: the promises the numerical oracles (test_layers*.py) do not
cover — bad input, allocation, pickling mid-pass, hand-changed records, names and layouts."""

import copy
import pickle

import numpy as np
import pytest

import fastbptt
from helpers import no_growth, same, snap

CELLS = ["rnn", "gru", "lstm"]


def make(cell, L=2, bidirectional=True, dropout=0.0, D=5, H=6, O=4, dtype=np.float64, seed=0):
    return fastbptt.CELLS[cell](D, H, O, dtype=dtype, seed=seed, num_layers=L,
                                bidirectional=bidirectional, dropout=dropout)


def data(T=9, B=7, D=5, O=4, seed=0, tokens=False):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, D, (T, B)) if tokens else rng.normal(size=(T, B, D))
    Y = rng.integers(0, O, (T, B))
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    return X, Y, lengths


def state_of(model, B, rng):
    shape = (model.n_states, B, model.hidden_size) if model.n_states > 1 else (B, model.hidden_size)
    h = rng.normal(size=shape).astype(model.dtype)
    return (h, rng.normal(size=shape).astype(model.dtype)) if model.cell == "lstm" else h


# ----------------------------------------------------------------------------- names and layout


@pytest.mark.parametrize("cell", CELLS)
def test_names_follow_pytorch(cell):
    model = make(cell, L=3)
    names = [n for n, _ in model.layout]
    w = "W_hx" if cell == "rnn" else "W_ih"
    assert names[0] == f"{w}_l0" and "W_hh_l2_reverse" in names and names[-2:] == ["W_qh", "b_q"]
    assert model.params["W_qh"].shape == (4, 12)
    G = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
    assert model.params[f"{w}_l1"].shape == (G * 6, 12)          # layer 1 reads both directions
    assert model.layer_names(2, 1)["W_hh"] == "W_hh_l2_reverse"
    assert model.layer_names(-1, 0)["W_hh"] == "W_hh_l2"
    one = fastbptt.CELLS[cell](5, 6, 4)
    assert one.layer_names(0, 0)["W_hh"] == "W_hh" and "W_hh" in one.params


def test_one_layer_model_is_bitwise_the_old_one():
    """num_layers=1, one direction: the same names, layout, initial weights and results."""
    a = fastbptt.LSTM(5, 6, 4, seed=3)
    b = fastbptt.LSTM(5, 6, 4, seed=3, num_layers=1, bidirectional=False)
    assert a.layout == b.layout and np.array_equal(a.flat, b.flat)


@pytest.mark.parametrize("cell", CELLS)
def test_from_params_rebuilds_a_stack(cell):
    model = make(cell, L=2, bidirectional=True)
    again = type(model).from_params(model.params)
    assert (again.num_layers, again.bidirectional) == (2, True)
    assert np.array_equal(again.flat, model.flat)


@pytest.mark.parametrize("cell", CELLS)
def test_pickle_keeps_stack_dropout_and_generator(cell):
    model = make(cell, L=3, bidirectional=False, dropout=0.25)
    model.eval()
    model.generator.random(5)
    again = pickle.loads(pickle.dumps(model))
    assert (again.num_layers, again.num_directions, again.dropout, again.training) == (3, 1, 0.25, False)
    assert np.array_equal(again.generator.random(4), model.generator.random(4))
    assert again.generator is not model.generator


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad,err,match", [
    (np.array([3, 0, 2, 1, 1, 1, 1]), ValueError, r"lengths\[1\] = 0"),
    (np.array([3, 10, 2, 1, 1, 1, 1]), ValueError, r"\[1, T=9\]"),
    (np.array([3.0, 2, 2, 1, 1, 1, 1]), TypeError, "integers"),
    (np.array([3, 2]), ValueError, r"shape \(B,\)"),
    (np.ma.masked_array([3, 2, 1, 1, 1, 1, 1]), TypeError, "masked"),
])
def test_bad_lengths_are_refused_before_any_work(bad, err, match):
    model = make("gru")
    X, Y, _ = data()
    ws = fastbptt.Workspace(model, 9, 7)
    before = ws.grad_flat.copy()
    with pytest.raises(err, match=match):
        fastbptt.loss_and_grad(model, X, Y, lengths=bad, workspace=ws)
    assert np.array_equal(ws.grad_flat, before)


@pytest.mark.parametrize("cell", CELLS)
def test_a_state_of_the_wrong_layer_count_is_refused(cell):
    model = make(cell, L=2, bidirectional=True)
    X, Y, _ = data()
    wrong = np.zeros((2, 7, 6))                       # L·dirs = 4
    h0 = (wrong, wrong) if cell == "lstm" else wrong
    with pytest.raises(ValueError, match=r"\(4, 7, 6\)"):
        fastbptt.loss_and_grad(model, X, Y, h0)
    flat = np.zeros((7, 6))
    with pytest.raises(ValueError, match=r"\(4, 7, 6\)"):
        fastbptt.loss_and_grad(model, X, Y, (flat, flat) if cell == "lstm" else flat)


def test_carry_is_refused_for_bidirectional_models():
    model = make("lstm", bidirectional=True)
    X, Y, _ = data()
    with pytest.raises(ValueError, match="bidirectional"):
        fastbptt.loss_and_grad(model, X, Y, carry=np.ones(9))


@pytest.mark.parametrize("weights,err,match", [
    (np.zeros((9, 7)), ValueError, "all zero"),
    (-np.ones((9, 7)), ValueError, ">= 0"),
    (np.full((9, 7), np.nan), ValueError, "NaN"),
    (np.ones((9, 6)), ValueError, "shape"),
    (np.ones((9, 7), dtype=int), TypeError, "floats"),
])
def test_bad_loss_weights(weights, err, match):
    model = make("rnn")
    X, Y, _ = data()
    with pytest.raises(err, match=match):
        fastbptt.loss_and_grad(model, X, Y, loss_weights=weights)


def test_loss_weights_zero_on_every_valid_position_is_refused_even_if_padding_has_weight():
    model = make("gru", L=1, bidirectional=False)
    X, Y, lengths = data()
    w = np.zeros((9, 7))
    w[np.arange(9)[:, None] >= lengths[None]] = 1.0      # weight only on padding
    with pytest.raises(ValueError, match="all zero"):
        fastbptt.loss_and_grad(model, X, Y, lengths=lengths, loss_weights=w)


@pytest.mark.parametrize("value,err", [(1.0000001, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                       ("0.5", TypeError), (True, TypeError)])
def test_bad_dropout(value, err):
    with pytest.raises(err, match="dropout"):
        fastbptt.GRU(3, 4, 2, num_layers=2, dropout=value)


def test_dropout_on_one_layer_warns_as_pytorch_does():
    with pytest.warns(UserWarning, match="num_layers=1"):
        fastbptt.GRU(3, 4, 2, dropout=0.5)


@pytest.mark.parametrize("kw,err", [({"num_layers": 0}, ValueError), ({"num_layers": 1.5}, TypeError),
                                    ({"bidirectional": 1}, TypeError)])
def test_bad_stack_arguments(kw, err):
    with pytest.raises(err):
        fastbptt.LSTM(3, 4, 2, **kw)


def test_padding_may_hold_anything_and_is_never_read():
    """Out-of-range ids and labels, NaN inputs and targets past each end: accepted, and the result
    is that of clean padding."""
    model = make("lstm")
    X, Y, lengths = data(tokens=True)
    pad = np.arange(9)[:, None] >= lengths[None]
    clean = snap(fastbptt.loss_and_grad(model, X, Y, lengths=lengths, return_dX=True))
    Xd, Yd = X.copy(), Y.copy()
    Xd[pad], Yd[pad] = 10 ** 9, -7
    dirty = snap(fastbptt.loss_and_grad(model, Xd, Yd, lengths=lengths, return_dX=True))
    assert same(clean, dirty)
    Xf = np.random.default_rng(1).normal(size=(9, 7, 5))
    Yf = np.random.default_rng(2).normal(size=(9, 7, 4))
    clean = snap(fastbptt.loss_and_grad(model, Xf, Yf, loss="mse", lengths=lengths))
    Xf[pad], Yf[pad] = np.nan, np.inf
    dirty = snap(fastbptt.loss_and_grad(model, Xf, Yf, loss="mse", lengths=lengths))
    assert same(clean, dirty)


def test_nan_inside_a_sequence_is_still_refused():
    model = make("gru")
    X, Y, lengths = data()
    X[0, 0, 0] = np.nan                                  # step 0 is always valid
    with pytest.raises(ValueError, match="NaN"):
        fastbptt.loss_and_grad(model, X, Y, lengths=lengths)
    X, Y, lengths = data(tokens=True)
    Y[0, 3] = 99
    with pytest.raises(ValueError, match=r"class labels in \[0, 4\), got 99 at index \(0, 3\)"):
        fastbptt.loss_and_grad(model, X, Y, lengths=lengths)


def test_callers_arrays_are_not_changed():
    model = make("lstm", dropout=0.3)
    X, Y, lengths = data()
    rng = np.random.default_rng(4)
    h0 = state_of(model, 7, rng)
    w = rng.uniform(size=(9, 7))
    copies = snap((X, Y, lengths, h0, w))
    fastbptt.loss_and_grad(model, X, Y, h0, lengths=lengths, loss_weights=w, return_dX=True,
                           return_dh0=True)
    assert same(copies, (X, Y, lengths, h0, w))


# ----------------------------------------------------------------------------- workspaces


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_stacks_with_lengths_allocate_nothing_in_steady_state(cell, method):
    T, B, H = 30, 32, 128
    model = fastbptt.CELLS[cell](20, H, 20, dtype=np.float32, num_layers=2, bidirectional=True,
                                 dropout=0.2)
    rng = np.random.default_rng(0)
    X = rng.integers(0, 20, (T, B))
    Y = rng.integers(0, 20, (T, B))
    lengths = rng.integers(1, T + 1, B)
    ws = fastbptt.Workspace(model, T, B)
    h0 = None

    no_growth(lambda: fastbptt.loss_and_grad(model, X, Y, h0, lengths=lengths, workspace=ws,
                                             method=method, return_dh0=True), B * H * 4)


@pytest.mark.parametrize("cell", CELLS)
def test_state_fed_back_through_one_workspace(cell):
    """A stack's returned state (a view into the workspace) as the next call's h0 equals a copy."""
    model = make(cell, L=2, bidirectional=False)
    X, Y, lengths = data()
    ws = fastbptt.Workspace(model, 9, 7)
    _, _, state = fastbptt.loss_and_grad(model, X, Y, lengths=lengths, workspace=ws)
    kept = snap(state)
    got = snap(fastbptt.loss_and_grad(model, X, Y, state, lengths=lengths, workspace=ws))
    want = snap(fastbptt.loss_and_grad(model, X, Y, kept, lengths=lengths))
    assert same(got, want)


@pytest.mark.parametrize("cell", CELLS)
def test_workspace_pickled_between_forward_and_backward(cell):
    model = make(cell)
    X, Y, lengths = data()
    dO = np.random.default_rng(3).normal(size=(9, 7, 4))
    ws = fastbptt.Workspace(model, 9, 7)
    fastbptt.forward(model, X, lengths=lengths, workspace=ws)
    other = pickle.loads(pickle.dumps(ws))
    deep = copy.deepcopy(ws)
    want = snap(fastbptt.backward(model, dO, workspace=ws, return_dh0=True, return_dX=True))
    for w in (other, deep):
        assert same(want, snap(fastbptt.backward(model, dO, workspace=w, return_dh0=True,
                                                        return_dX=True)))


def test_a_record_of_lengths_changed_by_hand_is_refused():
    model = make("gru")
    X, Y, lengths = data()
    ws = fastbptt.Workspace(model, 9, 7)
    fastbptt.forward(model, X, lengths=lengths, workspace=ws)
    ws.lengths[0] = 10 ** 6                            # would index far past hs
    with pytest.raises(ValueError, match="by hand"):
        fastbptt.backward(model, np.zeros((9, 7, 4)), workspace=ws)
    state = ws.__getstate__()
    with pytest.raises(ValueError, match="damaged"):
        fastbptt.Workspace.__new__(fastbptt.Workspace).__setstate__(state)
    with pytest.raises(AttributeError):
        ws.has_lengths = False


def test_workspace_of_another_stack_is_refused():
    X, Y, _ = data()
    ws = fastbptt.Workspace(make("gru", L=2), 9, 7)
    with pytest.raises(ValueError, match="workspace was made for"):
        fastbptt.loss_and_grad(make("gru", L=3), X, Y, workspace=ws)


def test_layer_buffers_and_order():
    model = make("lstm", L=2, bidirectional=True)
    X, Y, lengths = data()
    ws = fastbptt.Workspace(model, 9, 7)
    assert ws.layer(0, 0) is ws and ws.order is None
    fastbptt.loss_and_grad(model, X, Y, lengths=lengths, workspace=ws)
    assert np.array_equal(ws.order, np.argsort(-lengths, kind="stable"))
    assert ws.layer(1, 1).hs.shape == (10, 7, 6)
    with pytest.raises(ValueError, match="layer"):
        ws.layer(2, 0)
    with pytest.raises(ValueError, match="direction"):
        ws.layer(0, 2)


# ----------------------------------------------------------------------------- dropout


def test_dropout_masks_are_reproducible_and_off_in_eval():
    X, Y, _ = data()
    a, b = make("gru", L=3, bidirectional=False, dropout=0.5, seed=7), \
        make("gru", L=3, bidirectional=False, dropout=0.5, seed=7)
    ra = snap(fastbptt.loss_and_grad(a, X, Y))
    rb = snap(fastbptt.loss_and_grad(b, X, Y))
    assert same(ra, rb)                                        # same seed, same masks
    ws = fastbptt.Workspace(a, 9, 7)
    fastbptt.loss_and_grad(a, X, Y, workspace=ws)
    masks = ws.dropout_masks()
    assert len(masks) == 2 and set(np.unique(masks[0])) <= {0.0, 2.0}
    assert 0.3 < np.mean(masks[0] == 0) < 0.7
    a.eval()
    fastbptt.loss_and_grad(a, X, Y, workspace=ws)
    assert all(np.all(m == 1) for m in ws.dropout_masks())
    off = snap(fastbptt.loss_and_grad(a, X, Y))
    a.dropout = 0.0
    a.train()
    assert same(off, snap(fastbptt.loss_and_grad(a, X, Y)))


def test_layer_forward_returns_the_top_output_in_the_callers_order():
    model = make("rnn", L=2, bidirectional=True)
    X, _, lengths = data()
    H, _ = fastbptt.layer_forward(model, X, lengths=lengths)
    assert H.shape == (9, 7, 12)
    pad = np.arange(9)[:, None] >= lengths[None]
    assert np.all(H[pad] == 0) and np.all(np.abs(H[~pad]).sum(axis=-1) > 0)
    for b in range(7):                                          # each sequence alone
        alone, _ = fastbptt.layer_forward(model, X[:lengths[b], b:b + 1])
        np.testing.assert_allclose(H[:lengths[b], b], alone[:, 0], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- padding skipped


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("method", ["fused", "blas"])
@pytest.mark.parametrize("tokens", [False, True], ids=["dense", "tokens"])
def test_products_that_skip_padding_give_the_products_over_every_position(cell, method, tokens,
                                                                          monkeypatch):
    """Big products with lengths run per step over the active rows (or over the packed rows);
    forced on at a small size, they agree with one product over all T·B positions."""
    from fastbptt.core import api
    model = make(cell, L=2, bidirectional=True)
    X, Y, lengths = data(T=11, B=6, tokens=tokens)
    Yf = np.random.default_rng(5).normal(size=(11, 6, 4))
    results = []
    for threshold in (10 ** 18, 0):
        monkeypatch.setattr(api, "PACKED_MIN_FLOPS", threshold)
        results.append([snap(fastbptt.loss_and_grad(model, X, Y_, loss=loss, lengths=lengths,
                                                           method=method, return_dX=True,
                                                           return_dh0=True))
                        for Y_, loss in ((Y, "cross_entropy"), (Yf, "mse"))])
    for want, got in zip(*results):
        assert abs(want[0] - got[0]) < 1e-12
        for k in want[1]:
            np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-10, atol=1e-13, err_msg=k)
        for w, g in zip(want[2:], got[2:]):
            for a, b in zip(w if isinstance(w, tuple) else (w,), g if isinstance(g, tuple) else (g,)):
                np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-13)


def test_auto_chooses_by_the_mean_number_of_running_sequences():
    """With lengths, method="auto" picks as for a batch of Σ lengths / T sequences."""
    from fastbptt.core import api
    model = fastbptt.GRU(3, 64, 2)
    lengths = np.array([100] + [1] * 15)              # mean 16·... / 100 ≈ 1 sequence per step
    assert api.choose_method(16, 64) == "blas"
    assert api._check_method("auto", 16, model, lengths, 100) == "fused"
    assert api._check_method("auto", 16, model, np.full(16, 100), 100) == "blas"
    assert api._check_method("blas", 16, model, lengths, 100) == "blas"


def test_newcomers_errors_say_what_a_stack_expects():
    """A one-layer name on a stack and a (B, H) state for a stack: the errors say what to use."""
    model = make("gru", L=2, bidirectional=True)
    with pytest.raises(KeyError, match="W_ih_l0"):
        model.params["W_ih"]
    X, Y, _ = data()
    with pytest.raises(ValueError, match=r"num_layers·num_directions"):
        fastbptt.loss_and_grad(model, X, Y, np.zeros((7, 6)))
    lstm = make("lstm", L=2, bidirectional=False)
    with pytest.raises(ValueError, match=r"h0\[0\] must have shape \(2, 7, 6\).*num_layers·num_directions"):
        fastbptt.loss_and_grad(lstm, X, Y, (np.zeros((7, 6)), np.zeros((7, 6))))
    h0 = np.zeros((4, 7, 6))
    h0[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN") as info:
        fastbptt.loss_and_grad(model, X, Y, h0)
    assert "num_layers" not in str(info.value)
