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


def _every_kth_float32(lo, hi, k=1024):
    """Every k-th float32 of [lo, hi] (lo <= 0 <= hi) in bit order: dense at every magnitude."""
    def upto(v):
        return np.arange(0, np.array([v], np.float32).view(np.int32)[0], k,
                         dtype=np.int32).view(np.float32)
    return np.concatenate([-upto(-lo), upto(hi)])


# The worst inputs an exhaustive search over every float32 found (see _float32_sweep).
_WORST = {"exp": [4.505625247955322, -59.954246520996094], "tanh": [5.827876091003418]}


def _float32_sweep(name):
    """The grid, every 1024th float32 over the whole range, and the worst inputs known.

    Errors over every float32 (measured once, exhaustively): exp 0.860 on [-104, 88.73],
    tanh 3.441 on [1e-35, 8] (odd, so the same on the negative side). tanh loses relative
    accuracy below |x| ~ 2e-36, where y * p(y²) is subnormal, so the sweep starts at 1e-35.
    """
    if name == "exp":
        x = _every_kth_float32(-104.0, 89.0)
    else:
        x = _every_kth_float32(-9.0, 9.0)
        x = x[np.abs(x) >= 1e-35]
    return np.concatenate([_grid(np.float32), x, np.float32(_WORST[name])]).astype(np.float32)


def _ulps(got, want, dtype):
    """Largest error in units of dtype's epsilon, relative to |want|, where want is a normal, finite dtype value."""
    info = np.finfo(dtype)
    ok = np.isfinite(want) & (np.abs(want) >= info.tiny) & (np.abs(want) <= info.max)
    err = np.abs(got[ok].astype(want.dtype) - want[ok]) / np.abs(want[ok])
    return float(np.max(err)) / info.eps


def _truth(f, x):
    """f(x) computed more precisely than x's dtype: float64 for float32, long double
    (where it is wider than double) for float64."""
    wide = np.float64 if x.dtype == np.float32 else np.longdouble
    with np.errstate(over="ignore"):
        return f(x.astype(wide))


def _slack(dtype):
    """1 ulp more where float64's truth is itself rounded (long double no wider than double)."""
    return int(dtype == np.float64 and np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps)


# Bounds: float32 at what the code achieves over every float32 (0.860 and 3.441 ulp, see
# _float32_sweep), so that a coefficient off by a little fails (exp's 1/24 off by 1e-4
# gives 1.36 ulp; tanh's q coefficients off by 1e-6 give 4.2 to 11 ulp); float64 at libm's.
@pytest.mark.parametrize("dtype,max_ulps", [(np.float32, 3.5), (np.float64, 2)])
def test_tanh_accuracy(dtype, max_ulps):
    x = _float32_sweep("tanh") if dtype == np.float32 else _grid(dtype)
    out = np.empty_like(x)
    _apply_tanh(x, out)
    want = _truth(np.tanh, x)
    assert out.dtype == dtype
    err = _ulps(out, want, dtype)
    print(f"tanh {np.dtype(dtype).name}: max error {err:.3f} ulp")
    assert err <= max_ulps + _slack(dtype)
    assert np.all(np.abs(out) <= 1) and np.array_equal(np.sign(out), np.sign(x))


@pytest.mark.parametrize("dtype,max_ulps", [(np.float32, 0.9), (np.float64, 1)])
def test_exp_accuracy(dtype, max_ulps):
    x = _float32_sweep("exp") if dtype == np.float32 else _grid(dtype)
    out = np.empty_like(x)
    _apply_exp(x, out)
    want = _truth(np.exp, x)
    err = _ulps(out, want, dtype)
    print(f"exp {np.dtype(dtype).name}: max error {err:.3f} ulp")
    assert err <= max_ulps + _slack(dtype)
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
