"""Workspaces: results land in them, and repeated calls allocate no arrays."""

import tracemalloc

import numpy as np
import pytest

import fastbptt
from helpers import make_problem


@pytest.mark.parametrize("inputs", ["dense", "tokens"])
@pytest.mark.parametrize("parallel", [False, True])
def test_steady_state_allocates_no_arrays(inputs, parallel):
    """NumPy reports every array it allocates to tracemalloc: after a warm-up call, a call
    with a workspace must not allocate anything array-sized."""
    model, X, Y, h0 = make_problem(T=50, B=16, D=20, H=64, O=20, inputs=inputs, dtype=np.float32)
    ws = fastbptt.Workspace(model, 50, 16)
    kwargs = dict(workspace=ws, parallel=parallel, return_dh0=True, return_dX=True)
    fastbptt.loss_and_grad(model, X, Y, h0, **kwargs)          # compile and make lazy buffers
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(3):
            fastbptt.loss_and_grad(model, X, Y, h0, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    smallest_array = 16 * 64 * 4        # one (B, H) float32 array; Python objects take about 1.3 kB
    assert peak - base < smallest_array, f"{peak - base} bytes allocated per call"


def test_results_are_views_into_the_workspace():
    model, X, Y, h0 = make_problem(T=3, B=2)
    ws = fastbptt.Workspace(model, 3, 2)
    _, grads, hT, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws, return_dh0=True)
    assert np.shares_memory(grads["W_hh"], ws.grad_flat)
    assert np.shares_memory(hT, ws.hs) and np.shares_memory(dh0, ws.dh0)
    assert ws.grad_flat.shape == model.flat.shape


def test_h_T_can_be_fed_back_as_h0():
    """Carrying state across chunks through the same workspace equals one pass over both chunks' forward."""
    model, X, Y, h0 = make_problem(T=6, B=2)
    ws = fastbptt.Workspace(model, 3, 2)
    _, _, hT = fastbptt.loss_and_grad(model, X[:3], Y[:3], h0, workspace=ws)
    _, _, hT = fastbptt.loss_and_grad(model, X[3:], Y[3:], hT, workspace=ws)
    _, hs, _ = fastbptt.reference.forward(dict(model.params), X, h0, model.activation)
    np.testing.assert_allclose(hT, hs[-1], rtol=1e-12, atol=1e-12)


def test_initialization_schemes():
    m = fastbptt.RNN(10, 100, 5, seed=3)
    assert np.abs(m.params["W_hh"]).max() <= 0.1 and m.params["W_hh"].std() > 0.05
    assert not m.params["b_h"].any() and not m.params["b_q"].any()
    n = fastbptt.RNN(10, 100, 5, seed=3, init="normal")
    assert abs(n.params["W_hh"].std() - 0.01) < 1e-3
    same = fastbptt.RNN(10, 100, 5, seed=3)
    np.testing.assert_array_equal(m.flat, same.flat)
    assert set(fastbptt.RNN(2, 3, 4, bias=False).params) == {"W_hx", "W_hh", "W_qh"}


def test_params_are_views_into_flat():
    m = fastbptt.RNN(3, 4, 2)
    m.params["W_hh"][0, 0] = 42.0
    assert 42.0 in m.flat
    with pytest.raises(TypeError):
        m.params["W_hh"] = np.zeros((4, 4))         # names cannot be rebound


def test_from_params_round_trip():
    m = fastbptt.RNN(3, 4, 2, activation="relu", dtype=np.float64, seed=1)
    copy = fastbptt.RNN.from_params(m.params, activation="relu")
    assert copy.dtype == np.float64 and copy.bias
    np.testing.assert_array_equal(copy.flat, m.flat)
    assert not np.shares_memory(copy.flat, m.flat)
