"""A workspace knows which model filled it: backward, layer_backward and the diagnostics refuse
another model object of the same shapes (its gradients would match neither model), a model
whose parameters changed since the forward pass, and a pass that did not complete."""

import copy
import pickle

import numpy as np
import pytest

import fastbptt
from fastbptt import diagnostics
from fastbptt.core import api
from helpers import same, snap

CELLS = ["rnn", "gru", "lstm"]
T, B, D, H, O = 20, 8, 7, 32, 5


def make(cell, seed, L=2, bidirectional=True):
    return fastbptt.CELLS[cell](D, H, O, dtype=np.float64, seed=seed, num_layers=L,
                                bidirectional=bidirectional)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(T, B, D)), rng.normal(size=(T, B, O)), rng.integers(0, O, (T, B))


def top(model):
    return model.num_directions * model.hidden_size


@pytest.mark.parametrize("cell", CELLS)
def test_backward_refuses_another_model_of_the_same_shapes(cell):
    a, b = make(cell, 1), make(cell, 2)
    X, dO, _ = batch()
    ws = fastbptt.Workspace(a, T, B)
    fastbptt.forward(a, X, workspace=ws)
    with pytest.raises(ValueError, match=r"another .* of the same shapes, not of this model.*model="):
        fastbptt.backward(b, dO, workspace=ws)
    with pytest.raises(ValueError, match="another"):
        fastbptt.layer_backward(b, np.zeros((T, B, top(b))), workspace=ws)
    # refused before any work: the workspace still serves the model that ran the forward pass
    got = snap(fastbptt.backward(a, dO, workspace=ws, return_dh0=True, return_dX=True))
    fresh = fastbptt.Workspace(a, T, B)
    fastbptt.forward(a, X, workspace=fresh)
    assert same(got, snap(fastbptt.backward(a, dO, workspace=fresh, return_dh0=True, return_dX=True)))


@pytest.mark.parametrize("cell", CELLS)
def test_forward_by_a_then_b_then_backward_with_a_is_refused(cell):
    a, b = make(cell, 1), make(cell, 2)
    X, dO, _ = batch()
    ws = fastbptt.Workspace(a, T, B)
    fastbptt.layer_forward(a, X, workspace=ws)
    fastbptt.layer_forward(b, X, workspace=ws)
    with pytest.raises(ValueError, match="another"):
        fastbptt.layer_backward(a, np.zeros((T, B, top(a))), workspace=ws)
    # b's own backward is the one that agrees with a fresh workspace
    dH = np.random.default_rng(5).normal(size=(T, B, top(b)))
    got = snap(fastbptt.layer_backward(b, dH, workspace=ws))
    fresh = fastbptt.Workspace(b, T, B)
    fastbptt.layer_forward(b, X, workspace=fresh)
    assert same(got, snap(fastbptt.layer_backward(b, dH, workspace=fresh)))


def test_a_deep_copy_of_the_model_is_another_model():
    a = make("gru", 1)
    X, dO, _ = batch()
    ws = fastbptt.Workspace(a, T, B)
    fastbptt.forward(a, X, workspace=ws)
    with pytest.raises(ValueError, match="another GRU object"):
        fastbptt.backward(copy.deepcopy(a), dO, workspace=ws)


def test_a_model_that_no_longer_exists_is_named():
    X, dO, _ = batch()
    ws = fastbptt.Workspace(make("lstm", 1), T, B)
    fastbptt.forward(make("lstm", 1), X, workspace=ws)          # that model is gone
    with pytest.raises(ValueError, match="a model that no longer exists"):
        fastbptt.backward(make("lstm", 1), dO, workspace=ws)


@pytest.mark.parametrize("cell", CELLS)
def test_parameters_changed_between_forward_and_backward_are_refused(cell):
    model = make(cell, 1)
    X, dO, _ = batch()
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.forward(model, X, workspace=ws)
    kept = model.flat.copy()
    model.flat[17] += 1e-9                                         # an optimizer step in between
    with pytest.raises(ValueError, match="parameters differ from those the workspace's forward pass ran with"):
        fastbptt.backward(model, dO, workspace=ws)
    with pytest.raises(ValueError, match="parameters differ"):
        fastbptt.layer_backward(model, np.zeros((T, B, top(model))), workspace=ws)
    model.flat[...] = kept                                         # back to what the forward pass ran
    got = snap(fastbptt.backward(model, dO, workspace=ws))
    fresh = fastbptt.Workspace(model, T, B)
    fastbptt.forward(model, X, workspace=fresh)
    assert same(got, snap(fastbptt.backward(model, dO, workspace=fresh)))


def test_nan_parameters_unchanged_are_not_a_change():
    model = make("rnn", 1, L=1, bidirectional=False)
    model.flat[3] = np.nan
    X, dO, _ = batch()
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.forward(model, X, workspace=ws, check_finite=False)
    with np.errstate(all="ignore"):
        fastbptt.backward(model, dO, workspace=ws, check_finite=False)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copied_workspace_takes_its_models_parameters_only(how):
    """A copy does not know its model object (not pickled): any model of its signature whose
    parameters are those the forward pass kept gets the right gradients; another is refused."""
    a, b = make("gru", 1), make("gru", 2)
    X, dO, _ = batch()
    ws = fastbptt.Workspace(a, T, B)
    fastbptt.forward(a, X, workspace=ws)
    twin = pickle.loads(pickle.dumps(ws)) if how == "pickle" else copy.deepcopy(ws)
    twin2 = pickle.loads(pickle.dumps(ws)) if how == "pickle" else copy.deepcopy(ws)
    want = snap(fastbptt.backward(a, dO, workspace=ws))
    a2 = pickle.loads(pickle.dumps(a))
    assert same(want, snap(fastbptt.backward(a2, dO, workspace=twin)))
    with pytest.raises(ValueError, match="parameters differ"):
        fastbptt.backward(b, dO, workspace=twin2)


def test_a_forward_pass_that_did_not_complete_leaves_no_pass(monkeypatch):
    a, b = make("lstm", 1), make("lstm", 2)
    X, dO, _ = batch()
    ws = fastbptt.Workspace(a, T, B)
    fastbptt.forward(a, X, workspace=ws)

    def interrupted(model, ws, *args):
        ws.hs[...] = 0                                             # half of b's pass written
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fastbptt.forward(b, X, workspace=ws)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="holds no forward pass"):
        fastbptt.backward(a, dO, workspace=ws)


@pytest.mark.parametrize("cell", CELLS)
def test_diagnostics_refuse_another_model(cell):
    a, b = make(cell, 1), make(cell, 2)
    X, _, Y = batch()
    ws = fastbptt.Workspace(a, T, B)
    fastbptt.loss_and_grad(a, X, Y, workspace=ws)
    with pytest.raises(ValueError, match="another"):
        diagnostics.hidden_grads(b, ws)
    with pytest.raises(ValueError, match="another"):
        diagnostics.hidden_states(b, ws)
    assert diagnostics.hidden_grads(a, ws).shape == (T, B, H)
    fastbptt.loss_and_grad(b, X, Y, workspace=ws)                  # now b's
    with pytest.raises(ValueError, match="another"):
        diagnostics.hidden_grad_norms(a, ws)
    assert diagnostics.hidden_grad_norms(b, ws).shape == (T,)


def test_a_pass_over_a_few_positions_checks_the_model_but_keeps_no_copy():
    """Below api.KEEP_PARAMS_MIN_POSITIONS positions (a step of generation) forward copies nothing:
    the model object is still checked; a change of its parameters is not (documented)."""
    a, b = make("gru", 1, L=1, bidirectional=False), make("gru", 2, L=1, bidirectional=False)
    T1, B1 = 1, api.KEEP_PARAMS_MIN_POSITIONS - 1
    X = np.random.default_rng(0).normal(size=(T1, B1, D))
    dO = np.zeros((T1, B1, O))
    ws = fastbptt.Workspace(a, T1, B1)
    fastbptt.forward(a, X, workspace=ws)
    assert ws.nbytes == fastbptt.Workspace(a, T1, B1).nbytes + X.nbytes      # the kept inputs only
    with pytest.raises(ValueError, match="another"):
        fastbptt.backward(b, dO, workspace=ws)
    a.flat[0] += 1.0
    fastbptt.backward(a, dO, workspace=ws)
