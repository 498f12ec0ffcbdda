"""Carry weights on the reverse sweep: truncation and randomized truncation."""

import numpy as np
import pytest

import fastbptt
from fastbptt import reference
from helpers import assert_close, make_problem


@pytest.mark.parametrize("shape", ["T", "TB"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("parallel", [False, True])
def test_carry_against_reference(shape, dtype, parallel):
    model, X, Y, h0 = make_problem(T=8, B=3, dtype=dtype, inputs="tokens")
    rng = np.random.default_rng(4)
    carry = rng.choice([0.0, 2.5], size=(8,) if shape == "T" else (8, 3))
    L, grads, _, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, carry=carry, parallel=parallel,
                                              return_dh0=True)
    params = {k: v.astype(np.float64) for k, v in model.params.items()}
    _, g_ref, _, dh0_ref, _ = reference.loss_and_grad(params, X, Y, h0.astype(np.float64),
                                                      model.activation, carry=carry)
    for name in g_ref:
        assert_close(name, grads[name], g_ref[name], dtype)
    assert_close("dh0", dh0, dh0_ref, dtype)


def test_ones_is_full_bptt():
    model, X, Y, h0 = make_problem(T=6)
    a = fastbptt.loss_and_grad(model, X, Y, h0)
    a = {k: v.copy() for k, v in a[1].items()}
    b = fastbptt.loss_and_grad(model, X, Y, h0, carry=np.ones(6))[1]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_zero_cuts_the_sequence_into_chunks():
    """carry[k] = 0 equals running steps :k and k: as two chunks (state carried, gradient not),
    each chunk's mean loss weighted by its share of the steps."""
    T, k = 9, 4
    model, X, Y, h0 = make_problem(T=T, B=2)
    carry = np.ones(T)
    carry[k] = 0
    _, full, _, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, carry=carry, return_dh0=True)
    _, g1, h_k, dh0_1 = fastbptt.loss_and_grad(model, X[:k], Y[:k], h0, return_dh0=True)
    g1 = {n: v.copy() for n, v in g1.items()}
    dh0_1 = dh0_1.copy()
    _, g2, _ = fastbptt.loss_and_grad(model, X[k:], Y[k:], h_k.copy())
    for name in full:
        assert_close(name, full[name], (k * g1[name] + (T - k) * g2[name]) / T, np.float64)
    assert_close("dh0", dh0, k * dh0_1 / T, np.float64)


@pytest.mark.parametrize("carry,exc,match", [
    (np.ones(5), ValueError, r"carry must have shape \(6,\) or \(6, 3\)"),
    (np.ones(6, np.int64), TypeError, "carry must hold floats"),
    (np.full(6, np.nan), ValueError, "carry contains NaN or Inf"),
])
def test_bad_carry(carry, exc, match):
    model, X, Y, h0 = make_problem(T=6, B=3)
    with pytest.raises(exc, match=match):
        fastbptt.loss_and_grad(model, X, Y, h0, carry=carry)
