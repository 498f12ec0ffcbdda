"""Workspaces: results land in them, and repeated calls allocate no arrays."""

import tracemalloc

import numpy as np
import pytest

import fastbptt
from helpers import make_problem


@pytest.mark.parametrize("inputs", ["dense", "tokens"])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_steady_state_allocates_no_arrays(inputs, parallel, method):
    """NumPy reports every array it allocates to tracemalloc: after a warm-up call, a call
    with a workspace must not allocate anything array-sized."""
    model, X, Y, h0 = make_problem(T=50, B=32, D=20, H=64, O=20, inputs=inputs, dtype=np.float32)
    ws = fastbptt.Workspace(model, 50, 32)
    kwargs = dict(workspace=ws, parallel=parallel, return_dh0=True, return_dX=True, method=method)
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
    smallest_array = 32 * 64 * 4        # one (B, H) float32 array; Python objects take up to 3 kB
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


NRT_SCRIPT = r'''
import types
import numpy as np
from numba import njit
from numba.core.runtime import rtsys
from fastbptt.core.cells import CELLS
from fastbptt.kernels import losses, sweep

@njit
def step(n, cell, rec, ones, ws_out, row_loss, targets, carry, tokens, W_ih, b_ih, dW_ih, counts,
         order, lengths, y, packed, weights):
    for _ in range(n):   # every compiled kernel of a training step, called as the API calls them
        sweep.pack_ids(tokens, tokens, order, counts)
        sweep.gather_input(cell.gx, tokens, W_ih, b_ih)
        sweep.recurrence(cell, rec, ones, counts)
        sweep.forward_step(cell, 0, rec, rec[0])
        sweep.zero_padding(cell.hs[1:], counts)
        sweep.concat_directions(y, cell.hs[1:], cell.hs[1:], lengths)
        sweep.reverse_in_time(cell.dh, cell.hs[1:], lengths)
        losses.cross_entropy(ws_out, row_loss, targets)
        losses.cross_entropy_weighted(ws_out, row_loss, targets, weights, 3.0)
        sweep.reverse_sweep(cell, carry, counts)
        sweep.backward_step(cell, 0, cell.dh[0], ones, 3, 3)
        sweep.backward_state0(cell, ones)
        sweep.split_directions(y, cell.dh, cell.dh, lengths)
        sweep.add_at_last(cell.dh, cell.dh0, order, lengths)
        sweep.gather_last(cell.dh0, cell.hs, order, lengths)
        sweep.pack_active(packed, cell.dgx, counts)
        sweep.add_reversed_in_time(cell.dh, cell.hs[1:], lengths)
        sweep.scatter_input_grad(dW_ih, cell.dgx, tokens)

T, B, D, H, O = 20, 3, 7, 16, 7
rng = np.random.default_rng(0)
result = []
for name, spec in CELLS.items():
    GH = spec.GATES * H
    ws = types.SimpleNamespace(**{k: np.zeros(shape, dt) for k, shape, dt, _ in spec.declare(T, B, H, np.float32)})
    W_hh = rng.normal(size=(GH, H)).astype(np.float32)
    cell = spec.kernel_views(ws, W_hh, np.ascontiguousarray(W_hh.T), np.zeros(GH, np.float32), 1)
    args = (cell, np.zeros((B, GH), np.float32), np.ones(B, np.float32),
            rng.normal(size=(T * B, O)).astype(np.float32), np.zeros(T * B, np.float32),
            rng.integers(0, O, T * B), np.ones((T, B), np.float32), rng.integers(0, D, (T, B)),
            rng.normal(size=(GH, D)).astype(np.float32), np.zeros(GH, np.float32),
            np.zeros((GH, D), np.float32), np.array([3] * (T - 5) + [2] * 5), np.array([2, 0, 1]),
            np.array([T, T - 5, T - 5]), np.zeros((T, B, 2 * H), np.float32),
            np.zeros((T * B, GH), np.float32), np.ones(T * B, np.float32))
    step(1, *args)
    counts = []
    for n in (1, 10):
        before = rtsys.get_allocation_stats().alloc
        step(n, *args)
        counts.append(rtsys.get_allocation_stats().alloc - before)
    result.append(counts)
print(result)
'''


def test_kernels_allocate_nothing_per_step():
    """With numba's runtime allocation statistics: running the kernels 10 times allocates
    exactly as much as running them once (only the driver's arguments are wrapped)."""
    import ast
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_NRT_STATS="1")
    out = subprocess.run([sys.executable, "-c", NRT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    counts = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert len(counts) == 3                                      # every cell
    for once, ten in counts:
        assert once == ten, f"allocations: {once} for one step, {ten} for ten (per cell: {counts})"
