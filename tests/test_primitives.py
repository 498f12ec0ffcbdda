"""The inlined building blocks: fast tanh and exp against NumPy, matmat_acc against a product."""

import numpy as np
import pytest
from numba import njit

from fastbptt.kernels.primitives import exp, matmat_acc, tanh


@njit(error_model="numpy")
def _apply_tanh(x, out):
    for i in range(x.size):
        out[i] = tanh(x[i])


@njit(error_model="numpy")
def _apply_exp(x, out):
    for i in range(x.size):
        out[i] = exp(x[i])


@njit(error_model="numpy")
def _matmat(out, M, V, c, b0, b1):
    matmat_acc(out, M, V, c, b0, b1)


def _grid(dtype):
    x = np.concatenate([np.linspace(-120, 100, 400001), np.linspace(-2, 2, 100001),
                        [0.0, -0.0, 1e-30, -1e-30, 88.7, -103.9, 7.9, -7.9, 20, -20]])
    return x.astype(dtype)


def _ulps(got, want, dtype):
    """Largest error in units of dtype's epsilon, relative to |want|, where want is a normal, finite dtype value."""
    info = np.finfo(dtype)
    ok = np.isfinite(want) & (np.abs(want) >= info.tiny) & (np.abs(want) <= info.max)
    return np.max(np.abs(got[ok] - want[ok]) / np.abs(want[ok])) / info.eps


@pytest.mark.parametrize("dtype,max_ulps", [(np.float32, 4), (np.float64, 2)])
def test_tanh_accuracy(dtype, max_ulps):
    x = _grid(dtype)
    out = np.empty_like(x)
    _apply_tanh(x, out)
    want = np.tanh(x.astype(np.float64))
    assert out.dtype == dtype
    err = _ulps(out, want, dtype)
    print(f"tanh {np.dtype(dtype).name}: max error {err:.2f} ulp")
    assert err <= max_ulps
    assert np.all(np.abs(out) <= 1) and np.array_equal(np.sign(out), np.sign(x))


@pytest.mark.parametrize("dtype,max_ulps", [(np.float32, 2), (np.float64, 2)])
def test_exp_accuracy(dtype, max_ulps):
    x = _grid(dtype)
    out = np.empty_like(x)
    _apply_exp(x, out)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64))
    err = _ulps(out, want, dtype)
    print(f"exp {np.dtype(dtype).name}: max error {err:.2f} ulp")
    assert err <= max_ulps
    big = want > np.finfo(dtype).max
    assert np.all(np.isinf(out[big]))
    assert np.all(out[want < np.finfo(dtype).smallest_subnormal / 2] == 0)
    assert np.all(out >= 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf], dtype)
    t, e = np.empty_like(x), np.empty_like(x)
    _apply_tanh(x, t)
    _apply_exp(x, e)
    assert np.isnan(t[0]) and t[1] == 1 and t[2] == -1
    assert np.isnan(e[0]) and e[1] == np.inf and e[2] == 0


@pytest.mark.parametrize("K,N", [(1, 1), (7, 3), (8, 5), (17, 33), (64, 64)])
def test_matmat_acc(K, N):
    rng = np.random.default_rng(K * 100 + N)
    B = 5
    M, V, out = rng.normal(size=(K, N)), rng.normal(size=(B, K)), rng.normal(size=(B, N))
    c = rng.normal(size=B)
    want = out.copy()
    want[1:4] += c[1:4, None] * (V[1:4] @ M)
    _matmat(out, M, V, c, 1, 4)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    together = out.copy()
    _matmat(together, M, V, c, 0, B)          # rows 0..4 in one block
    apart = out.copy()
    for b in range(B):                        # the same rows one at a time: the same bits
        _matmat(apart, M, V, c, b, b + 1)
    assert np.array_equal(together, apart)
