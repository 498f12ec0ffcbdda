"""Hostile input against the layers of issue 9 (stacks, bidirectional layers, dropout, lengths and
loss weights), found by attacking the core.

Each test is either a regression test for a defect the red team found (all fixed: a non-PCG64
dropout generator in pickles, a layer's buffers replaced by hand, scratch buffers outside
``overlaps``/``nbytes`` or of another dtype, loss weights at extreme scales, a consistent change
of the record of lengths, float directions, tampered pickle fields) or a guard on an attack
that held: lengths of every dtype and form, states, ∂L/∂H and ∂L/∂state_T that
alias the workspace, hand-changed models between forward and backward, damaged and old pickles,
threads and fork, parallel bitwise equal to serial at realistic sizes, both methods agreeing,
the padding-skipping products of big layers, and degenerate shapes.
"""

import copy
import multiprocessing
import pickle
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import fastbptt
from helpers import same, snap
from fastbptt.core import reference_layers as R

CELLS = ["rnn", "gru", "lstm"]
per_cell = pytest.mark.parametrize("cell", CELLS)


def make(cell, D=4, H=5, O=3, L=2, bidirectional=True, dropout=0.0, dtype=np.float64, seed=0, scale=0.5):
    """A stacked model whose every parameter is drawn from N(0, scale²) (biases too: none is zero)."""
    model = fastbptt.CELLS[cell](D, H, O, dtype=dtype, seed=seed, num_layers=L,
                                 bidirectional=bidirectional, dropout=dropout)
    rng = np.random.default_rng(seed + 100)
    for p in model.params.values():
        p[...] = rng.normal(0.0, scale, p.shape)
    return model


def state_of(model, B, rng):
    """A random state of ``model`` for B sequences: (L·dirs, B, H) or (B, H), the LSTM's a pair."""
    H = model.hidden_size
    shape = (model.n_states, B, H) if model.n_states > 1 else (B, H)
    h = rng.normal(size=shape).astype(model.dtype)
    return (h, rng.normal(size=shape).astype(model.dtype)) if model.cell == "lstm" else h


def problem(cell, T=7, B=5, D=4, O=3, tokens=False, seed=0, **kw):
    model = make(cell, D=D, O=O, seed=seed, **kw)
    rng = np.random.default_rng(seed + 1)
    X = rng.integers(0, D, (T, B)) if tokens else rng.normal(size=(T, B, D)).astype(model.dtype)
    Y = rng.integers(0, O, (T, B))
    lengths = rng.integers(1, T + 1, B)
    lengths[1] = T
    return model, X, Y, lengths, rng


def maxdiff(a, b):
    """The largest absolute difference between two snapped results."""
    if a is None and b is None:
        return 0.0
    if isinstance(a, float):
        return abs(a - b)
    if isinstance(a, tuple):
        return max(maxdiff(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max(maxdiff(a[k], b[k]) for k in a)
    assert np.shape(a) == np.shape(b)
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def full(model, X, Y, h0=None, **kw):
    """Every result of loss_and_grad, snapped."""
    return snap(fastbptt.loss_and_grad(model, X, Y, h0, return_dh0=True, return_dX=True, **kw))


def reference(model, X, Y, h0=None, **kw):
    params = {k: np.array(v) for k, v in model.params.items()}
    return R.loss_and_grad(params, X, Y, h0, cell=model.cell, num_layers=model.num_layers,
                           bidirectional=model.bidirectional, activation=model.activation or "tanh", **kw)


# ============================================================================ defects found (fixed; regression tests)


@pytest.mark.parametrize("how", ["seed", "attribute"])
def test_a_model_with_any_numpy_generator_survives_pickle_and_deepcopy(how):
    if how == "seed":             # accepted by the constructor (check_seed), and deepcopy worked before issue 9
        model = fastbptt.LSTM(3, 4, 2, num_layers=2, dropout=0.3, seed=np.random.Generator(np.random.MT19937(5)))
    else:                         # the generator setter accepts any numpy Generator
        model = fastbptt.GRU(3, 4, 2, num_layers=2, dropout=0.3)
        model.generator = np.random.Generator(np.random.Philox(1))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert np.array_equal(twin.flat, model.flat)
        assert twin.generator.random() == copy.deepcopy(model.generator).random()   # the same stream


def test_a_layers_buffers_cannot_be_replaced():
    model = make("gru")
    ws = fastbptt.Workspace(model, 6, 4)
    with pytest.raises(AttributeError):
        ws.hs = np.zeros((7, 4, 5))                  # the workspace's own: refused (held)
    for k, d in ((1, 0), (0, 1), (1, 1)):
        lb = ws.layer(k, d)
        for name in ("hs", "xr" if hasattr(lb, "xr") else "gx", "W_hhT"):
            with pytest.raises(AttributeError):
                setattr(lb, name, np.zeros((7, 4, 10)))      # the size a kernel would trust


def _weights_case(case):
    """(dtype, loss_weights value): all weights equal, but at a scale the dtype cannot hold in Σ w or w ℓ."""
    return {"f32-underflow": (np.float32, 1e-300),   # > 0 in float64, 0 once cast: loss 0/0
            "f32-subnormal-cast": (np.float32, 1e-46),
            "f64-subnormal": (np.float64, 5e-324),   # w ℓ rounds to a multiple of 5e-324: a wrong loss
            "f64-sum-overflow": (np.float64, 1.7e308),   # each finite, Σ w = inf: loss nan, gradients 0
            "f32-product-overflow": (np.float32, 3e38)}[case]   # w ℓ overflows float32: loss inf


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", ["f32-underflow", "f32-subnormal-cast", "f64-subnormal", "f64-sum-overflow",
                                  "f32-product-overflow"])
def test_loss_weights_of_any_accepted_scale_give_the_unweighted_mean(case):
    dtype, value = _weights_case(case)
    model, X, Y, lengths, _ = problem("gru", dtype=dtype)
    want = full(model, X, Y, lengths=lengths)
    try:
        got = full(model, X, Y, lengths=lengths, loss_weights=np.full(Y.shape, value))
    except ValueError as e:              # refusing them is fine too, if it says which argument
        assert "loss_weights" in str(e)
        return
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert np.isfinite(got[0]) and abs(got[0] - want[0]) <= tol * max(1.0, abs(want[0]))
    assert maxdiff(got[1], want[1]) <= tol


def test_targets_viewing_a_scratch_buffer_equal_a_copy():
    model, X, Y, lengths, rng = problem("gru", D=3, O=3, tokens=True)   # ids and labels in one range: no OOB here
    ws = fastbptt.Workspace(model, *Y.shape)
    fastbptt.loss_and_grad(model, X, Y, lengths=lengths, workspace=ws)
    alias = ws.scratch("ids", Y.shape, np.intp)          # a public method handing out an internal buffer
    alias[...] = rng.integers(0, 3, Y.shape)
    want = full(model, X, alias.copy(), lengths=lengths)
    assert same(want, full(model, X, alias, lengths=lengths, workspace=ws))


def test_scratch_of_another_dtype_is_not_handed_to_the_kernels():
    model, _, Y, lengths, rng = problem("gru", D=300)
    X = rng.integers(150, 300, Y.shape)
    want = full(model, X, Y, lengths=lengths)
    ws = fastbptt.Workspace(model, *Y.shape)
    ws.scratch("ids", Y.shape, np.int8)
    assert same(want, full(model, X, Y, lengths=lengths, workspace=ws))


def test_nbytes_counts_every_buffer_the_workspace_keeps():
    model = fastbptt.GRU(256, 4, 256, num_layers=1, bidirectional=True, dtype=np.float64)
    T, B = 20, 16
    X = np.random.default_rng(0).normal(size=(T, B, 256))
    lengths = np.full(B, T)
    lengths[0] = 3
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, np.zeros((T, B), int), lengths=lengths, workspace=ws)  # compile, and make all
    ws = fastbptt.Workspace(model, T, B)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fastbptt.forward(model, X, lengths=lengths, workspace=ws)
        fastbptt.backward(model, np.zeros((T, B, 256)), workspace=ws, return_dX=True)
        kept = tracemalloc.get_traced_memory()[0] - base     # what the calls left behind
    finally:
        tracemalloc.stop()
    assert ws.nbytes >= 0.9 * kept


def test_a_consistent_change_of_the_record_of_lengths_is_refused_or_harmless():
    model, X, _, _, rng = problem("gru")
    lengths = np.array([7, 7, 3, 2, 7])                  # ties: rows 0..2 may be swapped consistently
    dO = rng.normal(size=(7, 5, 3))
    ws = fastbptt.Workspace(model, 7, 5)
    fastbptt.forward(model, X, lengths=lengths, workspace=ws)
    want = snap(fastbptt.backward(model, dO, workspace=copy.deepcopy(ws), return_dX=True))
    ws.row_order[[0, 1]] = ws.row_order[[1, 0]]
    ws.inverse[ws.row_order] = np.arange(5)
    try:
        got = snap(fastbptt.backward(model, dO, workspace=ws, return_dX=True))
    except ValueError as e:
        assert "by hand" in str(e)
        return
    assert same(want, got)


def test_a_float_direction_is_refused_clearly():
    model = make("gru")
    ws = fastbptt.Workspace(model, 3, 2)
    for f in (model.layer_names, ws.layer):
        with pytest.raises(ValueError, match="direction"):
            f(0, 1.0)


@pytest.mark.parametrize("field", ["dropout_on", "directions"])
def test_a_tampered_workspace_pickle_is_refused(field):
    model = make("gru")
    ws = fastbptt.Workspace(model, 3, 2)
    state = ws.__getstate__()
    if field == "dropout_on":
        state["dropout_on"] = "no"       # a string: would switch stale (never drawn) masks on
    else:
        state["signature"] = state["signature"][:7] + (2.0,)
    with pytest.raises(ValueError, match="pickled Workspace"):
        fastbptt.Workspace.__new__(fastbptt.Workspace).__setstate__(state)


# ============================================================================ lengths in every form (held)


@pytest.mark.parametrize("form", ["int8", "uint64", "list", "tuple", "strided", "big-endian", "read-only"])
def test_lengths_of_any_integer_form_give_the_same_result(form):
    model, X, Y, lengths, _ = problem("lstm")
    want = full(model, X, Y, lengths=lengths)
    given = {"int8": lengths.astype(np.int8), "uint64": lengths.astype(np.uint64), "list": list(lengths),
             "tuple": tuple(int(n) for n in lengths),
             "strided": np.stack([lengths, np.zeros_like(lengths)], axis=1).reshape(-1)[::2],
             "big-endian": lengths.astype(">i8"), "read-only": lengths.copy()}[form]
    if form == "read-only":
        given.flags.writeable = False
    before = copy.deepcopy(given)
    assert same(want, full(model, X, Y, lengths=given))
    assert np.array_equal(np.asarray(before), np.asarray(given))           # not changed


@pytest.mark.parametrize("bad,err", [
    (np.ones(5, bool), TypeError), (np.array([7, 3, 2, 1, 5], object), TypeError),
    (np.array(3), ValueError), (np.array([[7, 3, 2, 1, 5]]), ValueError), (7, ValueError),
    ([7.0, 3, 2, 1, 5], TypeError), (np.array([2 ** 64 - 1, 3, 2, 1, 5], np.uint64), ValueError),
    (np.array([7, -3, 2, 1, 5]), ValueError), ([2 ** 70, 3, 2, 1, 5], TypeError), ("abcde", TypeError),
    (np.array([7, 3, 2, 1, 5], "m8[s]"), TypeError), (np.ma.array([7, 3, 2, 1, 5]), TypeError),
])
@pytest.mark.parametrize("entry", ["loss_and_grad", "forward", "layer_forward"])
def test_bad_lengths_name_the_argument_and_leave_the_workspace_alone(bad, err, entry):
    model, X, Y, lengths, _ = problem("gru")
    ws = fastbptt.Workspace(model, 7, 5)
    fastbptt.forward(model, X, lengths=lengths, workspace=ws)
    before = [np.array(b) for b in ws.buffers()]
    args = (model, X, Y) if entry == "loss_and_grad" else (model, X)
    with pytest.raises(err, match="lengths"):
        getattr(fastbptt, entry)(*args, lengths=bad, workspace=ws)
    assert all(np.array_equal(a, b) for a, b in zip(before, ws.buffers()))
    fastbptt.backward(model, np.zeros((7, 5, 3)), workspace=ws)               # the forward is still there


def test_the_workspaces_own_record_passed_back_as_lengths():
    """ws.lengths / ws.row_order are in row order; passed back in they are read (copied) before the
    record is rewritten, so the call is that of a copy."""
    model, X, Y, lengths, _ = problem("gru")
    ws = fastbptt.Workspace(model, 7, 5)
    fastbptt.loss_and_grad(model, X, Y, lengths=lengths, workspace=ws)
    for given in (ws.lengths, ws.lengths[::-1]):                  # views of the record itself
        want = full(model, X, Y, lengths=np.array(given))
        assert same(want, full(model, X, Y, lengths=given, workspace=ws))


def test_all_sorts_of_lengths_match_the_reference():
    """Sorted, reversed, ties, all 1, all T, T > max(lengths), T = 1 and B = 1 shapes, both methods."""
    rng = np.random.default_rng(7)
    for cell, (T, B, D, H) in zip(CELLS, [(1, 1, 1, 1), (6, 4, 2, 1), (5, 1, 1, 3)]):
        model = make(cell, D=D, H=H, O=2, L=2, bidirectional=True)
        X = rng.normal(size=(T, B, D))
        Y = rng.integers(0, 2, (T, B))
        drawn = rng.integers(1, T + 1, B)
        for lengths in (np.ones(B, int), np.full(B, T), np.sort(drawn), np.sort(drawn)[::-1].copy(),
                        np.full(B, max(1, T - 2))):
            h0 = state_of(model, B, rng)
            want = reference(model, X, Y, h0, lengths=lengths)
            for method in ("fused", "blas"):
                got = full(model, X, Y, h0, lengths=lengths, method=method)
                assert maxdiff(got, want) < 1e-10, (cell, lengths, method)


def test_a_huge_batch_of_tiny_sequences():
    model = make("lstm", D=2, H=1, O=2)
    T, B = 2, 20001
    rng = np.random.default_rng(0)
    X, Y, lengths = rng.integers(0, 2, (T, B)), rng.integers(0, 2, (T, B)), rng.integers(1, T + 1, B)
    got = full(model, X, Y, lengths=lengths, method="fused")
    assert np.isfinite(got[0]) and got[2][0].shape == (4, B, 1)
    assert maxdiff(got, full(model, X, Y, lengths=lengths, method="blas")) < 1e-12


# ============================================================================ aliasing and the caller's arrays (held)


@per_cell
def test_states_that_view_the_workspace_equal_copies(cell):
    """h0 = the previous call's state (ws.state), a stack of rows of a layer's own hs, Fortran order."""
    model, X, Y, lengths, rng = problem(cell)
    ws = fastbptt.Workspace(model, 7, 5)
    _, _, state = fastbptt.loss_and_grad(model, X, Y, state_of(model, 5, rng), lengths=lengths, workspace=ws)
    hs = ws.layer(0, 1).hs
    views = [state, (hs[1:5], hs[2:6]) if cell == "lstm" else hs[1:5]]
    for h0 in views:
        want = full(model, X, Y, snap(h0), lengths=lengths)
        assert same(want, full(model, X, Y, h0, lengths=lengths, workspace=ws))
    h0 = state_of(model, 5, rng)
    fortran = tuple(np.asfortranarray(a) for a in h0) if cell == "lstm" else np.asfortranarray(h0)
    reversed_view = tuple(a[::-1].copy()[::-1] for a in h0) if cell == "lstm" else h0[::-1].copy()[::-1]
    want = full(model, X, Y, h0, lengths=lengths)
    assert same(want, full(model, X, Y, fortran, lengths=lengths))
    assert same(want, full(model, X, Y, reversed_view, lengths=lengths))


@per_cell
def test_layer_backward_with_dH_and_dstate_that_view_the_workspace(cell):
    """dH = the H layer_forward returned, dstate_T = the state it returned (both views of ws)."""
    model, X, _, lengths, rng = problem(cell, dropout=0.3)
    for lens in (lengths, None):
        ws = fastbptt.Workspace(model, 7, 5)
        model.generator = np.random.default_rng(3)
        H, state = fastbptt.layer_forward(model, X, lengths=lens, workspace=ws)
        keep = copy.deepcopy(ws)
        want = snap(fastbptt.layer_backward(model, snap(H), snap(state), workspace=keep))
        assert same(want, snap(fastbptt.layer_backward(model, H, state, workspace=ws)))


@per_cell
def test_no_entry_point_changes_the_callers_arrays(cell):
    model, X, Y, lengths, rng = problem(cell, dropout=0.4)
    Xf = np.asfortranarray(X)
    h0 = state_of(model, 5, rng)
    dO = rng.normal(size=(7, 5, 3))
    dO[6, 0] = np.nan                                   # padding of sequence 0 may hold NaN
    lengths[0] = 6
    dH = rng.normal(size=(7, 5, 2 * 5))
    dstate = state_of(model, 5, rng)
    w = rng.uniform(size=(7, 5))
    args = (Xf, Y, lengths, h0, dO, dH, dstate, w)
    before = copy.deepcopy(args)
    ws = fastbptt.Workspace(model, 7, 5)
    fastbptt.loss_and_grad(model, Xf, Y, h0, lengths=lengths, loss_weights=w, workspace=ws, return_dX=True)
    fastbptt.forward(model, Xf, h0, lengths=lengths, workspace=ws)
    fastbptt.backward(model, dO, workspace=ws, return_dh0=True, return_dX=True)
    fastbptt.layer_forward(model, Xf, h0, lengths=lengths, workspace=ws)
    fastbptt.layer_backward(model, dH, dstate, workspace=ws)
    for a, b in zip(snap(before), snap(args)):
        for x, y in (zip(a, b) if isinstance(a, tuple) else [(a, b)]):
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f")


# ============================================================== changed between forward and backward (held)


@pytest.mark.parametrize("change", ["dropout off", "dropout up", "eval", "generator"])
def test_what_the_model_may_change_between_forward_and_backward_does_not_reach_backward(change):
    """The masks, the dropout switch and the lengths are the forward's, kept in the workspace."""
    model, X, _, lengths, rng = problem("lstm", L=3, dropout=0.5)
    dO = rng.normal(size=(7, 5, 3))
    ws = fastbptt.Workspace(model, 7, 5)
    fastbptt.forward(model, X, lengths=lengths, workspace=ws)
    twin = copy.deepcopy(ws)
    want = snap(fastbptt.backward(model, dO, workspace=twin, return_dh0=True, return_dX=True))
    if change == "dropout off":
        model.dropout = 0.0
    elif change == "dropout up":
        model.dropout = 0.9
    elif change == "eval":
        model.eval()
    else:
        model.generator = np.random.default_rng(99)
    assert same(want, snap(fastbptt.backward(model, dO, workspace=ws, return_dh0=True, return_dX=True)))
    with pytest.raises(AttributeError):
        model.num_layers = 1
    with pytest.raises(AttributeError):
        ws.lengths = np.ones(5, np.intp)


def test_an_out_of_range_record_of_lengths_is_refused_before_backward():
    model, X, _, lengths, _ = problem("gru", tokens=True)
    ws = fastbptt.Workspace(model, 7, 5)
    for field, value in (("counts", 99), ("row_order", 5), ("inverse", -1), ("lengths", 0)):
        fastbptt.forward(model, X, lengths=lengths, workspace=ws)
        getattr(ws, field)[0] = value
        with pytest.raises(ValueError, match="by hand"):
            fastbptt.backward(model, np.zeros((7, 5, 3)), workspace=ws)
        with pytest.raises(ValueError, match="by hand"):
            fastbptt.layer_backward(model, np.zeros((7, 5, 10)), workspace=ws)
    fastbptt.forward(model, X, lengths=lengths, workspace=ws)
    ws.tokens_r[0, 0] = 10 ** 6
    with pytest.raises(ValueError, match="tokens_r"):
        fastbptt.backward(model, np.zeros((7, 5, 3)), workspace=ws)


# ============================================================================ pickles (held)


@per_cell
def test_damaged_workspace_pickles_are_refused(cell):
    model = make(cell)
    ws = fastbptt.Workspace(model, 3, 2)
    for damage in ("mask dtype", "missing tokens_r", "signature of 7", "one-layer signature"):
        state = ws.__getstate__()
        state["buffers"] = dict(state["buffers"])
        if damage == "mask dtype":
            state["buffers"]["l0.mask"] = state["buffers"]["l0.mask"].astype(np.float32)
        elif damage == "missing tokens_r":
            del state["buffers"]["tokens_r"]
        elif damage == "signature of 7":
            state["signature"] = state["signature"][:7]
        else:
            state["signature"] = state["signature"][:6]
        with pytest.raises(ValueError, match="pickled Workspace"):
            fastbptt.Workspace.__new__(fastbptt.Workspace).__setstate__(state)


@per_cell
def test_a_one_layer_workspace_pickled_by_the_previous_release_finishes_its_pass(cell):
    """The issue-8 release wrote a 6-tuple signature and none of the buffers this one added."""
    model = make(cell, L=1, bidirectional=False)
    X = np.random.default_rng(0).normal(size=(5, 3, 4))
    dO = np.random.default_rng(1).normal(size=(5, 3, 3))
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.forward(model, X, workspace=ws)
    state = ws.__getstate__()
    added = {"counts", "row_order", "inverse", "lengths", "weights", "state", "dstate", "cstate", "dcstate"}
    state["buffers"] = {k: v for k, v in state["buffers"].items() if k not in added}
    state["signature"] = state["signature"][:6]
    for key in ("has_lengths", "dropout_on"):
        del state[key]
    old = fastbptt.Workspace.__new__(fastbptt.Workspace)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    want = snap(fastbptt.backward(model, dO, workspace=ws, return_dh0=True, return_dX=True))
    assert same(want, snap(fastbptt.backward(model, dO, workspace=old, return_dh0=True, return_dX=True)))


# ============================================================================ threads, fork, parallel (held)


def _run(cell, seed, parallel, T=25, B=13):
    model = make(cell, D=5, H=8, O=4, dropout=0.2, seed=seed)
    rng = np.random.default_rng(seed)
    X, Y, lengths = rng.normal(size=(T, B, 5)), rng.integers(0, 4, (T, B)), rng.integers(1, T + 1, B)
    ws = fastbptt.Workspace(model, T, B)
    return tuple(full(model, X, Y, lengths=lengths, workspace=ws, parallel=parallel, method="fused")
                 for _ in range(4))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # BLAS threads from other threads: slower, same bits
def test_threads_with_their_own_workspaces_on_stacks_with_lengths_and_parallel():
    cells = ["gru", "lstm", "rnn", "gru"]
    want = [_run(c, i, True) for i, c in enumerate(cells)]
    got = {}
    threads = [threading.Thread(target=lambda i=i, c=c: got.__setitem__(i, _run(c, i, True)))
               for i, c in enumerate(cells)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(same(want[i], got[i]) for i in range(len(cells)))


def _child(queue):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        queue.put(_run("lstm", 1, True)[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is Linux's default start method")
def test_fork_after_a_parallel_call_on_a_stack_with_lengths():
    want = _run("lstm", 1, True)[0]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    try:
        got = queue.get(timeout=120)
    finally:
        child.join(30)
    assert child.exitcode == 0 and same(want, got)


@per_cell
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_parallel_is_bitwise_serial_on_stacks_with_lengths_and_dropout(cell, dtype, method):
    """T·B >= 400, B = 17 (odd: blocks of unequal size), both directions, 2 layers, dropout, weights,
    every entry point."""
    T, B = 25, 17
    rng = np.random.default_rng(11)
    X = rng.normal(size=(T, B, 6)).astype(dtype)
    Y = rng.integers(0, 5, (T, B))
    lengths = rng.integers(1, T + 1, B)
    w = rng.uniform(size=(T, B))
    dO = rng.normal(size=(T, B, 5)).astype(dtype)
    results = []
    for parallel in (False, True):
        model = make(cell, D=6, H=8, O=5, dropout=0.3, dtype=dtype, seed=3)
        h0 = state_of(model, B, np.random.default_rng(5))
        ws = fastbptt.Workspace(model, T, B)
        kw = dict(workspace=ws, parallel=parallel, method=method)
        r = [full(model, X, Y, h0, lengths=lengths, loss_weights=w, **kw)]
        r.append(snap(fastbptt.forward(model, X, h0, lengths=lengths, **kw)))
        r.append(snap(fastbptt.backward(model, dO, return_dh0=True, return_dX=True, **kw)))
        H, state = fastbptt.layer_forward(model, X, h0, lengths=lengths, **kw)
        r.append(snap((H, state)))
        r.append(snap(fastbptt.layer_backward(model, snap(H), snap(state), **kw)))
        results.append(tuple(r))
    assert same(results[0], results[1])


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_both_methods_agree_to_rounding(dtype, tol):
    rng = np.random.default_rng(2)
    T, B = 12, 11
    for cell in CELLS:
        model = make(cell, D=5, H=24, O=4, dropout=0.3, dtype=dtype, scale=0.2)
        X = rng.normal(size=(T, B, 5)).astype(dtype)
        Y = rng.integers(0, 4, (T, B))
        lengths = rng.integers(1, T + 1, B)
        got = {}
        for method in ("fused", "blas"):
            model.generator = np.random.default_rng(1)      # the same masks for both
            got[method] = full(model, X, Y, lengths=lengths, method=method)
        assert maxdiff(got["fused"], got["blas"]) < tol, cell


def test_big_layers_with_lengths_skip_the_padding_exactly():
    """Products big enough to skip the padding (per-step rows, packed weight gradients), with steps
    where no sequence runs (T > max(lengths)): the same as each sequence alone."""
    T, B, D, H, O = 8, 7, 200, 160, 200
    model = fastbptt.GRU(D, H, O, dtype=np.float64, num_layers=2, bidirectional=True, seed=1)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(T, B, D)), rng.integers(0, O, (T, B))
    lengths = rng.integers(1, T - 2, B)
    total = lengths.sum()
    for method in ("fused", "blas"):
        got = full(model, X, Y, lengths=lengths, method=method)
        loss, grads = 0.0, {k: np.zeros_like(v) for k, v in got[1].items()}
        for b in range(B):
            n = lengths[b]
            alone = full(model, X[:n, b:b + 1], Y[:n, b:b + 1], method=method)
            loss += alone[0] * n / total
            for k in grads:
                grads[k] += alone[1][k] * n / total
            assert maxdiff(alone[2][:, 0], got[2][:, b]) < 1e-12
            assert maxdiff(alone[4][:, 0] * n / total, got[4][:n, b]) < 1e-12
            assert not got[4][n:, b].any()
        assert abs(loss - got[0]) < 1e-12 and maxdiff(grads, got[1]) < 1e-12
