"""Tests written against the mutants that survived mutation testing of the issue-9 core
(stacks, directions, lengths and loss weights: ``fastbptt/core/api.py``'s layer and lengths
passes, ``fastbptt/core/kernels/sweep.py``'s packing kernels, the weighted losses, the
checks); see docs/mutation-testing.md. Each test names the bug it catches.

Small float64 problems compared with plain NumPy or with a second fastbptt call, so that the
mutation run, which recompiles the kernels of the mutated file, stays quick.
"""

import numpy as np
import pytest

import fastbptt
from fastbptt.core import api


def _rng_params(model, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p[...] = rng.normal(0.0, scale, size=p.shape)
    return rng


# ----------------------------------------------------------------------------- no work on padding

# big enough that every product with W_ih crosses api.PACKED_MIN_FLOPS: 2·B·D·H = 2·4·1024·256 = 2^21
_BIG = dict(D=1024, H=256, B=4, T=3)


def _product_positions(monkeypatch, run):
    """Run ``run()`` with api.dot spied on; return the positions (the smallest dimension) of every
    product that has an operand of width D = 1024: the input projection, ∂L/∂W_ih and ∂L/∂X."""
    seen = []
    real = api.dot

    def spy(a, b, out, *args, **kwargs):
        shapes = [np.shape(a), np.shape(b), np.shape(out)]
        if any(_BIG["D"] in s for s in shapes):
            seen.append(min(min(s) for s in shapes if len(s)))
        return real(a, b, out, *args, **kwargs)

    monkeypatch.setattr(api, "dot", spy)
    run()
    return seen


def test_big_products_with_lengths_cover_only_the_valid_positions(monkeypatch):
    """The issue's "no work on padding": with lengths, a product of W_ih big enough runs over the
    Σ lengths valid positions only (per-step over the active rows, or packed), for the input
    projection, ∂L/∂W_ih and ∂L/∂X, each Σ lengths rows. Mutants that always take the product
    over every T·B position (``_rows_dot`` or ``_sum_dot`` ignoring the lengths) give the same
    numbers and are only seen by what they multiply."""
    T, B, D, H = _BIG["T"], _BIG["B"], _BIG["D"], _BIG["H"]
    model = fastbptt.RNN(D, H, 3, dtype=np.float64, seed=0)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(T, B, D))
    Y = rng.integers(0, 3, (T, B))
    lengths = np.array([3, 1, 2, 1])
    ws = fastbptt.Workspace(model, T, B)
    seen = _product_positions(monkeypatch, lambda: fastbptt.loss_and_grad(
        model, X, Y, lengths=lengths, workspace=ws, return_dX=True, method="fused"))
    assert sum(seen) == 3 * int(lengths.sum()), seen      # input projection, ∂L/∂W_ih, ∂L/∂X
    assert max(seen) <= int(lengths.sum()), seen
    full = _product_positions(monkeypatch, lambda: fastbptt.loss_and_grad(
        model, X, Y, workspace=ws, return_dX=True, method="fused"))
    assert sum(full) == 3 * T * B, full                   # without lengths: one product each


def test_dX_is_zero_past_each_end_after_a_call_with_longer_sequences():
    """∂L/∂X is zero past each sequence's end (documented) even when the product skips the
    padding and the same workspace last ran longer sequences: the per-step products write only
    the active rows, so the rest must be zeroed (a mutant without ``zero_padding`` in
    ``_rows_dot`` leaves the previous call's ∂L/∂X there)."""
    T, B, D, H = _BIG["T"], _BIG["B"], _BIG["D"], _BIG["H"]
    model = fastbptt.RNN(D, H, 3, dtype=np.float64, seed=0)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(T, B, D))
    Y = rng.integers(0, 3, (T, B))
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, lengths=np.full(B, T), workspace=ws, return_dX=True)
    lengths = np.array([3, 1, 2, 1])
    dX = fastbptt.loss_and_grad(model, X, Y, lengths=lengths, workspace=ws, return_dX=True)[-1]
    fresh = fastbptt.loss_and_grad(model, X, Y, lengths=lengths, return_dX=True)[-1]
    pad = np.arange(T)[:, None] >= lengths[None, :]
    assert np.all(dX[pad] == 0)
    np.testing.assert_array_equal(dX, fresh)


# ----------------------------------------------------------------------------- states in, states out


def _problem(cell="gru", L=2, bidirectional=False, T=5, B=4, D=3, H=4, O=3, seed=0, dtype=np.float64):
    model = fastbptt.CELLS[cell](D, H, O, dtype=dtype, seed=seed, num_layers=L, bidirectional=bidirectional)
    rng = _rng_params(model, seed)
    X = rng.normal(size=(T, B, D)).astype(dtype)
    Y = rng.integers(0, O, (T, B))
    return model, X, Y, rng


def _state(model, B, rng):
    shape = (model.n_states, B, model.hidden_size) if model.n_states > 1 else (B, model.hidden_size)
    h = rng.normal(size=shape).astype(model.dtype)
    return (h, rng.normal(size=shape).astype(model.dtype)) if model.cell == "lstm" else h


def _copy(r):
    if isinstance(r, tuple):
        return tuple(_copy(x) for x in r)
    if hasattr(r, "keys"):
        return {k: np.array(v) for k, v in r.items()}
    return np.array(r)


def _assert_same(got, want, what=""):
    if isinstance(want, tuple):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{what}[{i}]")
    elif hasattr(want, "keys"):
        assert set(got.keys()) == set(want.keys())
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what} {k}")
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=what)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
@pytest.mark.parametrize("lengths", [None, np.array([2, 5, 1, 3])], ids=["full", "lengths"])
def test_h0_none_after_a_call_with_h0_starts_from_zeros(cell, lengths):
    """h0=None is the zero state whatever the workspace's previous call started from: a stack's
    first states are written as zeros, not left as the last call's h0 (a mutant that skips the
    write of a missing state part gives the previous h0)."""
    model, X, Y, rng = _problem(cell)
    ws = fastbptt.Workspace(model, *X.shape[:2])
    fastbptt.loss_and_grad(model, X, Y, _state(model, X.shape[1], rng), lengths=lengths, workspace=ws)
    got = _copy(fastbptt.loss_and_grad(model, X, Y, None, lengths=lengths, workspace=ws, return_dh0=True))
    want = fastbptt.loss_and_grad(model, X, Y, None, lengths=lengths, return_dh0=True)
    assert got[0] == want[0]
    _assert_same(got[1:], want[1:])


@pytest.mark.parametrize("L,lengths", [(1, np.array([2, 5, 1, 3])), (2, None), (2, np.array([2, 5, 1, 3]))],
                         ids=["1-lengths", "2-full", "2-lengths"])
def test_h0_whose_parts_view_each_others_destinations(L, lengths):
    """An LSTM's h0 may be a view of the workspace (the docs promise the result of a copy): here its
    c_0 is a view of layer 0's h_0 buffer (and, for two layers, of layer 0's h_0 and h_1), which the
    start overwrites with h_0 before reading c_0. A mutant that copies no part overlapping another
    part's destination reads the overwritten buffer."""
    model, X, Y, rng = _problem("lstm", L=L)
    T, B = X.shape[:2]
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, _state(model, B, rng), lengths=lengths, workspace=ws)
    hs = ws.layer(0, 0).hs
    h0 = (_state(model, B, rng)[0], hs[0] if L == 1 else hs[0:2])
    assert h0[1].flags.c_contiguous and np.shares_memory(h0[1], hs[0])
    want = fastbptt.loss_and_grad(model, X, Y, (h0[0], h0[1].copy()), lengths=lengths, return_dh0=True)
    got = fastbptt.loss_and_grad(model, X, Y, h0, lengths=lengths, workspace=ws, return_dh0=True)
    assert got[0] == want[0]
    _assert_same(got[1:], want[1:])


# ----------------------------------------------------------------------------- padding holds zeros


@pytest.mark.parametrize("method", ["fused", "blas"])
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_a_workspace_once_full_of_nan_gives_the_fresh_result_with_lengths(cell, method):
    """Past each sequence's end the buffers hold zeros, not what a previous call left: here a call
    with check_finite=False filled every buffer with NaN, and the next call's padding must not
    reach a result through 0·NaN in the weight gradients (mutants that leave hs, ∂L/∂(input
    projection) or ∂L/∂rec unzeroed past the ends give NaN gradients)."""
    model, X, Y, rng = _problem(cell)
    T, B = X.shape[:2]
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, np.full_like(X, np.nan), Y, workspace=ws, check_finite=False,
                           method=method, return_dX=True, return_dh0=True)
    lengths = np.array([2, 5, 1, 3])
    got = _copy(fastbptt.loss_and_grad(model, X, Y, lengths=lengths, workspace=ws, method=method,
                                       return_dX=True, return_dh0=True))
    want = fastbptt.loss_and_grad(model, X, Y, lengths=lengths, method=method, return_dX=True,
                                  return_dh0=True)
    assert got[0] == want[0]
    _assert_same(got[1:], want[1:])


# ----------------------------------------------------------------------------- checks


def test_an_id_out_of_range_is_named_where_it_is_read_not_in_the_padding():
    """With lengths, the error for a token id out of range names a position that is read: the same
    bad value earlier in the padding (which may hold anything) is not the one reported."""
    model = fastbptt.GRU(4, 3, 2, dtype=np.float64, num_layers=2)
    X = np.zeros((5, 2), np.int64)
    X[1, 0] = 99                                   # padding of sequence 0 (length 1): never read
    X[2, 1] = 99                                   # read
    with pytest.raises(ValueError, match=r"got 99 at index \(2, 1\)"):
        fastbptt.loss_and_grad(model, X, np.zeros((5, 2), np.int64), lengths=[1, 5])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_dH_that_is_the_buffer_it_is_packed_into(bidirectional):
    """With lengths, layer_backward packs the caller's dH into the top layer's gradient buffer in
    the workspace's row order; a dH that is that very buffer (the previous call's ∂L/∂H left there)
    must give the result of a copy, not a permutation done in place over itself."""
    model, X, _, rng = _problem("gru", L=1, bidirectional=bidirectional)
    T, B = X.shape[:2]
    lengths = np.array([2, 5, 1, 3])
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.layer_forward(model, X, lengths=lengths, workspace=ws)
    width = model.num_directions * model.hidden_size
    fastbptt.layer_backward(model, rng.normal(size=(T, B, width)), workspace=ws)
    fastbptt.layer_forward(model, X, lengths=lengths, workspace=ws)   # a forward per backward
    dH = ws._outputs[0][1] if bidirectional else ws.layer(0, 0).dh
    assert dH.shape == (T, B, width)
    other = fastbptt.Workspace(model, T, B)
    fastbptt.layer_forward(model, X, lengths=lengths, workspace=other)
    want = _copy(fastbptt.layer_backward(model, dH.copy(), workspace=other))
    got = fastbptt.layer_backward(model, dH, workspace=ws)
    _assert_same(got, want)
