"""Carry weights on the reverse sweep: truncation and randomized truncation.

Every test runs with both sweeps: the fused kernel and the per-step BLAS loop, which
index the carry weights differently (the BLAS loop reads them one step ahead and
scales ∂L/∂h_0 separately), so an off-by-one in either is seen.
"""

import numpy as np
import pytest

import fastbptt
from fastbptt import reference, training
from helpers import assert_close, make_problem

METHODS = ["fused", "blas"]


def check_carry(model, X, Y, h0, carry, method, parallel=False, loss="cross_entropy"):
    """loss_and_grad with ``carry`` against the reference: every gradient, ∂L/∂h_0, ∂L/∂X."""
    dtype = model.dtype
    L, grads, _, dh0, dX = fastbptt.loss_and_grad(model, X, Y, h0, loss=loss, carry=carry,
                                                  parallel=parallel, method=method,
                                                  return_dh0=True, return_dX=True)
    params = {k: v.astype(np.float64) for k, v in model.params.items()}
    h64 = None if h0 is None else h0.astype(np.float64)
    Y64 = Y if Y.dtype.kind in "iu" else Y.astype(np.float64)
    X64 = X if X.dtype.kind in "iu" else X.astype(np.float64)
    _, g_ref, _, dh0_ref, dX_ref = reference.loss_and_grad(params, X64, Y64, h64, model.activation,
                                                           loss, carry=carry)
    for name in g_ref:
        assert_close(f"{method} {name}", grads[name], g_ref[name], dtype)
    assert_close(f"{method} dh0", dh0, dh0_ref, dtype)
    assert_close(f"{method} dX", dX, dX_ref, dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", ["T", "TB"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("parallel", [False, True])
def test_carry_against_reference(shape, dtype, parallel, method):
    model, X, Y, h0 = make_problem(T=8, B=3, dtype=dtype, inputs="tokens")
    rng = np.random.default_rng(4)
    carry = rng.choice([0.0, 2.5], size=(8,) if shape == "T" else (8, 3))
    check_carry(model, X, Y, h0, carry, method, parallel)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", ["T", "TB"])
@pytest.mark.parametrize("loss,inputs", [("cross_entropy", "tokens"), ("mse", "dense")])
def test_distinct_weights_at_every_step(method, shape, loss, inputs):
    """A different weight at every (t, b): reading the weight of a neighbouring step or
    sequence, or skipping the one on ∂L/∂h_0, changes the result."""
    T, B = 7, 4
    model, X, Y, h0 = make_problem(T=T, B=B, H=10, loss=loss, inputs=inputs, seed=3)
    rng = np.random.default_rng(11)
    carry = rng.uniform(0.3, 1.7, size=(T,) if shape == "T" else (T, B))
    check_carry(model, X, Y, h0, carry, method, loss=loss)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", ["T", "TB"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_random_truncation_weights(method, shape, dtype):
    """The weights ``training.random_truncation`` draws (0 or 1/π), as train --random-truncation uses them."""
    T, B = 9, 5
    model, X, Y, h0 = make_problem(T=T, B=B, H=12, dtype=dtype, inputs="tokens", seed=2)
    rng = np.random.default_rng(7)
    xi = training.random_truncation(T, 0.6, rng, B=None if shape == "T" else B, dtype=dtype)
    assert 0 < np.count_nonzero(xi) < xi.size           # both a cut and a carry occur
    check_carry(model, X, Y, h0, xi, method)


def test_random_truncation_at_the_shape_train_runs_by_default():
    """train's defaults (B = 32, a large H) pick the per-step BLAS method: carry weights there."""
    T, B, H = 6, 32, 256
    assert fastbptt.api.choose_method(B, H) == "blas"
    model, X, Y, h0 = make_problem(T=T, B=B, D=11, H=H, O=9, inputs="tokens", seed=5)
    model.flat[...] *= 0.15                              # keep tanh away from saturation
    xi = training.random_truncation(T, 0.5, np.random.default_rng(3), B=B)
    check_carry(model, X, Y, h0, xi, "auto")


@pytest.mark.parametrize("method", METHODS)
def test_ones_is_full_bptt(method):
    model, X, Y, h0 = make_problem(T=6)
    a = fastbptt.loss_and_grad(model, X, Y, h0, method=method)
    a = {k: v.copy() for k, v in a[1].items()}
    b = fastbptt.loss_and_grad(model, X, Y, h0, carry=np.ones(6), method=method)[1]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("method", METHODS)
def test_a_zero_cuts_the_sequence_into_chunks(method):
    """carry[k] = 0 equals running steps :k and k: as two chunks (state carried, gradient not),
    each chunk's mean loss weighted by its share of the steps."""
    T, k = 9, 4
    model, X, Y, h0 = make_problem(T=T, B=2)
    carry = np.ones(T)
    carry[k] = 0
    _, full, _, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, carry=carry, return_dh0=True,
                                             method=method)
    full = {n: v.copy() for n, v in full.items()}
    dh0 = dh0.copy()
    _, g1, h_k, dh0_1 = fastbptt.loss_and_grad(model, X[:k], Y[:k], h0, return_dh0=True,
                                               method=method)
    g1 = {n: v.copy() for n, v in g1.items()}
    dh0_1 = dh0_1.copy()
    _, g2, _ = fastbptt.loss_and_grad(model, X[k:], Y[k:], h_k.copy(), method=method)
    for name in full:
        assert_close(name, full[name], (k * g1[name] + (T - k) * g2[name]) / T, np.float64)
    assert_close("dh0", dh0, k * dh0_1 / T, np.float64)


@pytest.mark.parametrize("method", METHODS)
def test_a_zero_first_weight_zeroes_dh0_only(method):
    """carry[0] weighs only ∂L/∂h_0: 0 there leaves every parameter gradient as full BPTT."""
    model, X, Y, h0 = make_problem(T=5, B=3)
    _, full, _, _ = fastbptt.loss_and_grad(model, X, Y, h0, return_dh0=True, method=method)
    full = {n: v.copy() for n, v in full.items()}
    carry = np.ones(5)
    carry[0] = 0
    _, cut, _, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, carry=carry, return_dh0=True,
                                            method=method)
    for name in full:
        np.testing.assert_array_equal(cut[name], full[name])
    assert not dh0.any()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", ["T", "TB"])
def test_carry_through_forward_then_backward(method, shape):
    """backward() with carry weights, after forward(): as loss_and_grad with the same weights."""
    T, B = 6, 3
    model, X, Y, h0 = make_problem(T=T, B=B, loss="mse", seed=8)
    carry = np.random.default_rng(2).uniform(0.0, 2.0, size=(T,) if shape == "T" else (T, B))
    ws = fastbptt.Workspace(model, T, B)
    O, _ = fastbptt.forward(model, X, h0, workspace=ws, method=method)
    _, dO = reference.loss_and_output_grad(O.copy(), Y, "mse")
    grads, dh0 = fastbptt.backward(model, dO, workspace=ws, carry=carry, return_dh0=True,
                                   method=method)
    _, g_ref, _, dh0_ref, _ = reference.loss_and_grad(dict(model.params), X, Y, h0,
                                                      model.activation, "mse", carry=carry)
    for name in g_ref:
        assert_close(name, grads[name], g_ref[name], np.float64)
    assert_close("dh0", dh0, dh0_ref, np.float64)


@pytest.mark.parametrize("carry,exc,match", [
    (np.ones(5), ValueError, r"carry must have shape \(6,\) or \(6, 3\)"),
    (np.ones(6, np.int64), TypeError, "carry must hold floats"),
    (np.full(6, np.nan), ValueError, "carry contains NaN or Inf"),
])
def test_bad_carry(carry, exc, match):
    model, X, Y, h0 = make_problem(T=6, B=3)
    with pytest.raises(exc, match=match):
        fastbptt.loss_and_grad(model, X, Y, h0, carry=carry)
