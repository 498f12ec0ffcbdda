"""Hostile input against the cells of issue 8 (RNN, GRU, LSTM on the generic sweep), found by attacking.

Each test is a regression test for a bug found by the red team (marked ``xfail(strict=True)``
until the core is fixed: flip it then) or a guard on an attack that held up: LSTM state
pairs in every wrong form, states and ∂L/∂H that alias the workspace, workspaces of one
cell with a model of another, copies and pickles of workspaces (the previous release's
too), tampered model pickles, the gated models' extra API, ids tampered between forward
and backward, parallel=True bitwise at odd shapes, saturating gates and huge inputs
against PyTorch, and threads.
"""

import copy
import pickle
import threading

import numba
import numpy as np
import pytest

import fastbptt
from helpers import same, snap
from fastbptt.core import api

try:    # an optional oracle
    import torch
except ImportError:  # pragma: no cover - torch is in the development environment
    torch = None

CLASSES = {"rnn": fastbptt.RNN, "gru": fastbptt.GRU, "lstm": fastbptt.LSTM}
per_cell = pytest.mark.parametrize("cell", list(CLASSES))
gated = pytest.mark.parametrize("cell", ["gru", "lstm"])


def build(cell, D=4, H=6, O=7, dtype=np.float64, seed=0, scale=0.6):
    """A model whose every parameter is drawn from N(0, scale²)."""
    model = CLASSES[cell](D, H, O, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p[...] = rng.normal(0.0, scale, p.shape)
    return model


def state(model, rng, B):
    """A random state: (B, H), or the LSTM's pair."""
    H, dt = model.hidden_size, model.dtype
    h = rng.normal(size=(B, H)).astype(dt)
    return (h, rng.normal(size=(B, H)).astype(dt)) if model.cell == "lstm" else h


def problem(cell, T=5, B=3, D=4, H=6, O=7, dtype=np.float64, seed=0):
    model = build(cell, D, H, O, dtype, seed)
    rng = np.random.default_rng(seed + 1)
    X = rng.normal(size=(T, B, D)).astype(dtype)
    Y = rng.integers(0, O, (T, B))
    return model, X, Y, rng


# ============================================================================ bugs the red team found (fixed)


def test_lstm_h0_whose_h_aliases_cs0_equals_a_copy():
    model, X, Y, rng = problem("lstm")
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.loss_and_grad(model, X, Y, state(model, rng, 3), workspace=ws)
    c0 = rng.normal(size=(3, 6))
    h0 = (ws.cs[0], c0)                         # h member is a view of the workspace
    want = snap(fastbptt.loss_and_grad(model, X, Y, (h0[0].copy(), c0), return_dh0=True))
    got = snap(fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws, return_dh0=True))
    assert same(want, got)


@per_cell
@pytest.mark.parametrize("entry", ["forward", "layer_forward"])
def test_h0_viewing_the_input_buffer_equals_a_copy(cell, entry):
    model, X, Y, rng = problem(cell, D=6, H=6)   # D == H: a row of the input buffer is a state
    run = getattr(fastbptt, entry)
    ws = fastbptt.Workspace(model, 5, 3)
    run(model, X, workspace=ws)
    X2 = rng.normal(size=X.shape)
    xb = ws.x_buffer()
    h0 = (xb[0], xb[1]) if cell == "lstm" else xb[0]
    want = snap(run(model, X2, snap(h0)))
    got = snap(run(model, X2, h0, workspace=ws))
    assert same(want, got)


def _old_release_state(model, ws):
    """``ws.__getstate__()`` as the Elman-only release (commit e4519fc) wrote it: a 5-tuple signature
    and its buffers (``stepT`` and ``zero_h`` where this release has ``rec``, ``recT``, ``backT`` and
    ``zero_b``)."""
    T, B, H = ws.T, ws.B, model.hidden_size
    names = ["hs", "dz", "out", "row_loss", "W_hhT", "ones", "carry_full", "carry", "dh0", "tokens",
             "targets", "grad_flat"]
    buffers = {name: getattr(ws, name).copy() for name in names}
    buffers["stepT"] = np.zeros((H, B), model.dtype)
    buffers["zero_h"] = np.zeros(H, model.dtype)
    return {"T": T, "B": B, "signature": ws.signature[1:6], "dtype": ws.dtype, "buffers": buffers,
            "x": None if ws._x is None else ws._x.copy(), "dX": None, "forward_kind": ws.forward_kind,
            "last_carry_is_full": True}


def test_previous_release_workspace_pickle_loads_and_continues():
    model, _, _, rng = problem("rnn")
    tokens = rng.integers(0, 4, (5, 3))
    dO = rng.normal(size=(5, 3, 7))
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.forward(model, tokens, workspace=ws)              # a forward pass pending in the pickle
    old = fastbptt.Workspace.__new__(fastbptt.Workspace)
    old.__setstate__(_old_release_state(model, ws))
    want = snap(fastbptt.backward(model, dO, workspace=ws, return_dh0=True))
    assert same(want, snap(fastbptt.backward(model, dO, workspace=old, return_dh0=True)))


@gated
@pytest.mark.parametrize("value", ["relu", "bogus"])
def test_gated_model_refuses_an_activation(cell, value):
    model = build(cell)
    with pytest.raises((AttributeError, TypeError, ValueError), match="activation"):
        model.activation = value


@pytest.mark.parametrize("cell,buf", [("gru", "hn"), ("gru", "drec"), ("lstm", "tc"), ("lstm", "dcs"),
                                      ("lstm", "dc0")])
def test_read_only_workspace_buffer_is_refused_not_written(cell, buf):
    model, X, Y, _ = problem(cell)
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.loss_and_grad(model, X, Y, workspace=ws, method="fused")
    a = getattr(ws, buf)
    a.flags.writeable = False
    before = a.copy()
    with pytest.raises(ValueError, match=buf):
        fastbptt.loss_and_grad(model, 2 * X, Y, workspace=ws, method="fused")
    assert np.array_equal(a, before)


@gated
def test_from_params_names_a_bad_W_hh(cell):
    model = build(cell, D=3, H=4)
    G = 3 if cell == "gru" else 4
    params = {k: v.copy() for k, v in model.params.items()}
    params["W_hh"] = np.zeros((G * 4, 5))                        # (G·H, H+1): not (G·H, H)
    with pytest.raises(ValueError, match="W_hh"):
        CLASSES[cell].from_params(params)


# ============================================================================ attacks that held


@pytest.mark.parametrize("h0, error, word", [
    (lambda h, c: (a for a in (h, c)), TypeError, "pair"),
    (lambda h, c: (h, c, c), TypeError, "pair"),
    (lambda h, c: (), TypeError, "pair"),
    (lambda h, c: h, TypeError, "pair"),
    (lambda h, c: np.stack([h, c]), TypeError, "pair"),
    (lambda h, c: {0: h, 1: c}, TypeError, "pair"),
    (lambda h, c: (h, None), TypeError, r"h0\[1\]"),
    (lambda h, c: (None, c), TypeError, r"h0\[0\]"),
    (lambda h, c: (h, c.astype(np.float32)), TypeError, r"h0\[1\].*astype"),
    (lambda h, c: ((h, c), c), ValueError, r"h0\[0\]"),
    (lambda h, c: (h, np.ma.masked_array(c)), TypeError, r"h0\[1\].*mask"),
    (lambda h, c: (h, c[:2]), ValueError, r"h0\[1\]"),
], ids=["generator", "3-tuple", "empty", "single", "stacked", "dict", "None-c", "None-h", "f32-c",
        "nested", "masked", "short-c"])
@pytest.mark.parametrize("entry", ["loss_and_grad", "forward", "layer_forward"])
def test_lstm_bad_h0_refused_naming_it(h0, error, word, entry):
    model, X, Y, rng = problem("lstm")
    h, c = state(model, rng, 3)
    args = (model, X, Y) if entry == "loss_and_grad" else (model, X)
    with pytest.raises(error, match=word):
        getattr(fastbptt, entry)(*args, h0(h, c))


def test_lstm_h0_as_list_equals_tuple():
    model, X, Y, rng = problem("lstm")
    h, c = state(model, rng, 3)
    assert same(snap(fastbptt.loss_and_grad(model, X, Y, [h, c])),
                snap(fastbptt.loss_and_grad(model, X, Y, (h, c))))


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_single_state_cells_refuse_a_pair(cell):
    model, X, Y, rng = problem(cell)
    h = state(model, rng, 3)
    with pytest.raises(ValueError, match="h0"):
        fastbptt.loss_and_grad(model, X, Y, (h, h))
    fastbptt.layer_forward(model, X, workspace=(ws := fastbptt.Workspace(model, 5, 3)))
    with pytest.raises(ValueError, match="dstate_T"):
        fastbptt.layer_backward(model, np.zeros((5, 3, 6)), (h, h), workspace=ws)


def test_lstm_layer_backward_refuses_a_single_dstate():
    model, X, _, rng = problem("lstm")
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.layer_forward(model, X, workspace=ws)
    with pytest.raises(TypeError, match="dstate_T"):
        fastbptt.layer_backward(model, np.zeros((5, 3, 6)), np.zeros((3, 6)), workspace=ws)
    fastbptt.layer_backward(model, np.zeros((5, 3, 6)), workspace=ws)    # the forward is still there


LSTM_ALIASES = {
    "state_T": lambda ws, T: (ws.hs[T], ws.cs[T]),
    "state_T swapped": lambda ws, T: (ws.cs[T], ws.hs[T]),
    "hs0, cs0": lambda ws, T: (ws.hs[0], ws.cs[0]),
    "dh0, dc0": lambda ws, T: (ws.dh0, ws.dc0),
    "dc0, dh0": lambda ws, T: (ws.dc0, ws.dh0),
    "ds, dcs0": lambda ws, T: (ws.ds, ws.dcs[0]),
    "one buffer twice": lambda ws, T: (ws.cs[T], ws.cs[T]),
    "tc rows": lambda ws, T: (ws.tc[0], ws.tc[1]),
}


@pytest.mark.parametrize("pick", list(LSTM_ALIASES))
def test_lstm_h0_aliasing_the_workspace_equals_a_copy(pick):
    model, X, Y, rng = problem("lstm")
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.loss_and_grad(model, X, Y, state(model, rng, 3), workspace=ws, return_dh0=True)
    h0 = LSTM_ALIASES[pick](ws, 5)
    want = snap(fastbptt.loss_and_grad(model, X, Y, snap(h0), return_dh0=True, return_dX=True))
    got = snap(fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws, return_dh0=True, return_dX=True))
    assert same(want, got)


def _dh_of(model, ws):
    return api._cell_views(model, ws).dh


LAYER_ALIASES = {
    "dH = ws.dh": lambda m, ws, H_all, sT: (_dh_of(m, ws), None),
    "dH = H_all": lambda m, ws, H_all, sT: (H_all, None),
    "dH = H_all, dstate = state_T": lambda m, ws, H_all, sT: (H_all, sT),
    "dH = hs[:-1], dstate = dstate_0": lambda m, ws, H_all, sT: (ws.hs[:-1], api._state_grad0(m, ws)),
}


@per_cell
@pytest.mark.parametrize("pick", list(LAYER_ALIASES))
def test_layer_backward_inputs_aliasing_the_workspace_equal_copies(cell, pick):
    model, X, _, rng = problem(cell)
    h0 = state(model, rng, 3)
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.layer_forward(model, X, h0, workspace=ws)
    fastbptt.layer_backward(model, rng.normal(size=(5, 3, 6)), state(model, rng, 3), workspace=ws)
    H_all, sT = fastbptt.layer_forward(model, X, h0, workspace=ws)
    dH, dS = LAYER_ALIASES[pick](model, ws, H_all, sT)
    fresh = fastbptt.Workspace(model, 5, 3)
    fastbptt.layer_forward(model, X, h0, workspace=fresh)
    want = snap(fastbptt.layer_backward(model, snap(dH), snap(dS), workspace=fresh))
    assert same(want, snap(fastbptt.layer_backward(model, dH, dS, workspace=ws)))


@per_cell
def test_layer_and_head_entry_points_mix(cell):
    """layer_forward then backward (head) == forward then backward; forward then layer_backward ==
    layer_forward then layer_backward; a second layer_backward is refused."""
    model, X, _, rng = problem(cell)
    h0 = state(model, rng, 3)
    dO, dH = rng.normal(size=(5, 3, 7)), rng.normal(size=(5, 3, 6))
    a, b = fastbptt.Workspace(model, 5, 3), fastbptt.Workspace(model, 5, 3)
    fastbptt.layer_forward(model, X, h0, workspace=a)
    fastbptt.forward(model, X, h0, workspace=b)
    assert same(snap(fastbptt.backward(model, dO, workspace=a, return_dh0=True, return_dX=True)),
                snap(fastbptt.backward(model, dO, workspace=b, return_dh0=True, return_dX=True)))
    fastbptt.layer_forward(model, X, h0, workspace=a)
    fastbptt.forward(model, X, h0, workspace=b)
    assert same(snap(fastbptt.layer_backward(model, dH, h0, workspace=a)),
                snap(fastbptt.layer_backward(model, dH, h0, workspace=b)))
    with pytest.raises(ValueError, match="no forward pass"):
        fastbptt.layer_backward(model, dH, workspace=a)


@pytest.mark.parametrize("mine,other", [(a, b) for a in CLASSES for b in CLASSES if a != b])
def test_workspace_of_another_cell_with_the_same_sizes_refused(mine, other):
    model, X, Y, _ = problem(mine)
    ws = fastbptt.Workspace(build(other), 5, 3)
    for call in (lambda: fastbptt.loss_and_grad(model, X, Y, workspace=ws),
                 lambda: fastbptt.layer_forward(model, X, workspace=ws)):
        with pytest.raises(ValueError, match="workspace"):
            call()


@per_cell
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copied_workspace_gives_the_results_of_a_fresh_one(cell, dtype, how):
    model, X, Y, rng = problem(cell, dtype=dtype)
    dup = (lambda w: pickle.loads(pickle.dumps(w))) if how == "pickle" else copy.deepcopy
    kw = dict(return_dh0=True, return_dX=True)
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.loss_and_grad(model, X, Y, workspace=ws, **kw)
    want = snap(fastbptt.loss_and_grad(model, X, Y, workspace=fastbptt.Workspace(model, 5, 3), **kw))
    assert same(want, snap(fastbptt.loss_and_grad(model, X, Y, workspace=dup(ws), **kw)))
    tokens = rng.integers(0, 4, (5, 3))                  # a pending forward pass survives the copy
    fastbptt.layer_forward(model, tokens, workspace=ws)
    twin = dup(ws)
    dH = rng.normal(size=(5, 3, 6)).astype(dtype)
    assert same(snap(fastbptt.layer_backward(model, dH, workspace=twin)),
                snap(fastbptt.layer_backward(model, dH, workspace=ws)))
    assert not np.shares_memory(twin.hs, ws.hs)


@gated
@pytest.mark.parametrize("entry", ["layer_backward", "backward"])
@pytest.mark.parametrize("bad", [10 ** 6, -1])
def test_token_ids_tampered_between_forward_and_backward_refused(cell, entry, bad):
    model, _, _, rng = problem(cell)
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.layer_forward(model, rng.integers(0, 4, (5, 3)), workspace=ws)
    ws.tokens[2, 1] = bad
    dY = rng.normal(size=(5, 3, 6 if entry == "layer_backward" else 7))
    with pytest.raises(ValueError, match="workspace.tokens"):
        getattr(fastbptt, entry)(model, dY, workspace=ws)
    forged = fastbptt.Workspace(model, 5, 3)              # a forward pass claimed by hand
    forged.forward_kind = "tokens"
    forged.tokens[...] = 99
    with pytest.raises(ValueError, match="workspace.tokens"):
        getattr(fastbptt, entry)(model, dY, workspace=forged)


def _tamper(model, cls, **changes):
    state_ = model.__getstate__()
    state_.update(changes)
    obj = cls.__new__(cls)
    obj.__setstate__(state_)
    return obj


@pytest.mark.parametrize("src,dst", [(a, b) for a in CLASSES for b in CLASSES if a != b])
def test_model_pickle_of_one_cell_refused_by_another(src, dst):
    model = build(src)
    with pytest.raises(ValueError):
        _tamper(model, CLASSES[dst])
    with pytest.raises(ValueError):
        _tamper(model, CLASSES[dst], cell=dst)        # the cell key changed too: the sizes disagree


def test_rnnbase_is_not_a_model():
    from fastbptt.core.model import RNNBase
    with pytest.raises(TypeError, match="RNN, GRU or LSTM"):
        RNNBase(3, 4, 5)
    with pytest.raises(TypeError, match="RNN, GRU or LSTM"):
        RNNBase.from_params(dict(build("gru").params))


@gated
@pytest.mark.parametrize("name,gate", [("W_qh", "r"), ("w_ih", "r"), ("W_ih", "x"), ("W_ih", 0),
                                       ("W_ih", None), (["W_ih"], "r"), ("W_ih", ["r"])])
def test_gate_with_bad_names_is_a_value_error(cell, name, gate):
    with pytest.raises(ValueError):
        build(cell).gate(name, gate)


@gated
def test_gate_without_bias_refuses_bias_names(cell):
    model = CLASSES[cell](3, 4, 5, bias=False)
    with pytest.raises(ValueError, match="b_ih"):
        model.gate("b_ih", model.GATES[0])


@pytest.mark.parametrize("src,dst", [("gru", "lstm"), ("lstm", "gru"), ("rnn", "gru"), ("gru", "rnn")])
def test_load_params_of_another_cell_refused(src, dst):
    model = build(dst)
    before = model.flat.copy()
    with pytest.raises(ValueError, match="params"):
        model.load_params(dict(build(src).params))
    assert np.array_equal(model.flat, before)


# ---------------------------------------------------------------------------- parallel, extremes, threads


@pytest.mark.parametrize("T,B,D,H,O", [(400, 1, 2, 3, 2), (1, 400, 2, 3, 2), (80, 5, 1, 1, 1),
                                       (40, 11, 2, 3, 1)])
def test_parallel_bitwise_serial_at_odd_shapes(T, B, D, H, O):
    saved = numba.get_num_threads()
    try:
        for cell in CLASSES:
            model, X, Y, rng = problem(cell, T, B, D, H, O, dtype=np.float32, seed=T * B)
            h0 = state(model, rng, B)
            carry = rng.choice([0.0, 1 / np.pi], size=(T, B))
            tokens = rng.integers(0, D, (T, B))
            for inputs in (X, tokens):
                runs = []
                for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
                    numba.set_num_threads(n)
                    for parallel in (False, True):
                        runs.append(snap(fastbptt.loss_and_grad(
                            model, inputs, Y, h0, carry=carry, parallel=parallel, method="fused",
                            return_dh0=True, return_dX=True)))
                assert all(same(runs[0], r) for r in runs[1:]), (cell, T, B)
    finally:
        numba.set_num_threads(saved)


def _torch_loss_and_grads(model, X, Y, h0):
    dt = torch.float64 if model.dtype == np.float64 else torch.float32
    T, B, D = X.shape
    H, O = model.hidden_size, model.output_size
    p = {k: torch.from_numpy(np.array(v)) for k, v in model.params.items()}
    if model.cell == "rnn":
        mod = torch.nn.RNN(D, H, nonlinearity=model.activation).to(dt)
        pairs = [("weight_ih_l0", "W_hx"), ("weight_hh_l0", "W_hh"), ("bias_ih_l0", "b_h")]
    else:
        mod = (torch.nn.GRU if model.cell == "gru" else torch.nn.LSTM)(D, H).to(dt)
        pairs = [("weight_ih_l0", "W_ih"), ("weight_hh_l0", "W_hh"), ("bias_ih_l0", "b_ih"),
                 ("bias_hh_l0", "b_hh")]
    with torch.no_grad():
        for a, b in pairs:
            getattr(mod, a).copy_(p[b])
        if model.cell == "rnn":
            mod.bias_hh_l0.zero_()
    hx = tuple(torch.from_numpy(a)[None] for a in h0) if model.cell == "lstm" else torch.from_numpy(h0)[None]
    W_qh = p["W_qh"].requires_grad_()
    out, _ = mod(torch.from_numpy(X), hx)
    logits = (out @ W_qh.T + p["b_q"]).reshape(T * B, O)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(Y).reshape(-1))
    loss.backward()
    return loss.item(), {"W_hh": mod.weight_hh_l0.grad.numpy(), "W_qh": W_qh.grad.numpy()}


@pytest.mark.skipif(torch is None, reason="torch not installed")
@per_cell
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weights,inputs", [(50.0, 1.0), (500.0, 1.0), (1.0, 1e30), (50.0, 1e30)],
                         ids=["w50", "w500", "x1e30", "w50-x1e30"])
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_saturation_and_huge_inputs_match_torch(cell, dtype, weights, inputs, method):
    rng = np.random.default_rng(0)
    T, B, D, H, O = 12, 3, 4, 5, 6
    model = CLASSES[cell](D, H, O, dtype=dtype)
    for name, p in model.params.items():
        p[...] = rng.normal(0, 0.6 * (1.0 if name in ("W_qh", "b_q") else weights), p.shape)
    X = (rng.normal(size=(T, B, D)) * inputs).astype(dtype)
    Y = rng.integers(0, O, (T, B))
    h0 = state(model, rng, B)
    if cell == "rnn":
        h0 = np.tanh(h0)
    out = fastbptt.loss_and_grad(model, X, Y, h0, check_finite=False, method=method,
                                 return_dh0=True, return_dX=True)
    loss, grads, dstate0, dX = out[0], out[1], out[3], out[4]
    want_loss, want = _torch_loss_and_grads(model, X, Y, h0)
    assert np.isfinite(want_loss) and all(np.isfinite(v).all() for v in want.values())
    finite = [loss, dX] + list(grads.values()) + list(dstate0 if cell == "lstm" else [dstate0])
    assert all(np.isfinite(a).all() for a in finite), "NaN or Inf where PyTorch has none"
    tol = 1e-4 if dtype == np.float32 else 1e-9
    assert abs(loss - want_loss) <= tol * max(1.0, abs(want_loss))
    for name, w in want.items():
        assert np.max(np.abs(grads[name] - w)) <= 10 * tol * max(1.0, np.max(np.abs(w))), name


def test_threads_with_their_own_workspaces_and_cells_equal_serial_runs():
    jobs = []
    for k, cell in enumerate(["rnn", "gru", "lstm", "gru"]):
        model, X, Y, _ = problem(cell, T=20, B=4, H=8, dtype=np.float32, seed=k)
        jobs.append((model, X, Y))
    serial = [snap(fastbptt.loss_and_grad(m, X, Y)) for m, X, Y in jobs]
    for parallel in (False, True):
        failures = []

        def work(i):
            m, X, Y = jobs[i]
            ws = fastbptt.Workspace(m, 20, 4)
            try:
                for _ in range(10):
                    if not same(serial[i], snap(fastbptt.loss_and_grad(m, X, Y, workspace=ws,
                                                                        parallel=parallel))):
                        failures.append((i, "differs"))
                        return
            except Exception as exc:  # reported below, with the thread's job
                failures.append((i, repr(exc)))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, (parallel, failures)


def test_elman_hidden_grads_after_layer_backward_are_refused_not_stale():
    """(found by the training engineer) after layer_backward, an Elman workspace's ws.out holds a stale
    ∂L/∂o, and hidden_grads rebuilt ∂L/∂h_t from it: now a ValueError; after backward it works again."""
    from fastbptt import diagnostics
    rng = np.random.default_rng(0)
    m = fastbptt.RNN(4, 5, 4, dtype=np.float64)
    X = rng.integers(0, 4, (6, 2))
    dO = rng.normal(size=(6, 2, 4))
    ws = fastbptt.Workspace(m, 6, 2)
    with pytest.raises(ValueError, match="no backward pass"):
        diagnostics.hidden_grads(m, ws)
    fastbptt.layer_forward(m, X, workspace=ws)
    fastbptt.layer_backward(m, dO @ m.params["W_qh"], workspace=ws)
    with pytest.raises(ValueError, match="layer_backward"):
        diagnostics.hidden_grads(m, ws)
    fastbptt.forward(m, X, workspace=ws)
    fastbptt.backward(m, dO, workspace=ws)
    assert diagnostics.hidden_grads(m, ws).shape == (6, 2, 5)
