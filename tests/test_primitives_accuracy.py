"""float32 tanh, exp and sigmoid against float64, in float32 ulps, over the whole range.

Each is computed in float64 and rounded once, so its float32 result lies within 0.501 ulp of
the exact value: the float32 nearest to it, except for the rare inputs whose exact value lies
within 0.001 ulp of halfway between two float32. That holds where results saturate too: float32
tanh is ±1 only from |x| = 9.0109 on (below, 1 − h² > 0 keeps the gradient), e^x is +inf from
x = 88.7228 on and 0 below −103.9721, with subnormal results in between rounded like the rest.
Checked over every float32 of the bands where the formulas change or saturate, a dense sample
of all float32 bit patterns, and the special values (NaN, ±inf, ±0, subnormals).
"""

import numpy as np
import pytest
from numba import njit

from fastbptt.kernels.primitives import exp, sigmoid, tanh

BOUND = 0.501                      # ulp
FLT_MAX = float(np.finfo(np.float32).max)


@njit(error_model="numpy")
def _tanh(x, out):
    for i in range(x.size):
        out[i] = tanh(x[i])


@njit(error_model="numpy")
def _exp(x, out):
    for i in range(x.size):
        out[i] = exp(x[i])


@njit(error_model="numpy")
def _sigmoid(x, out):
    for i in range(x.size):
        out[i] = sigmoid(x[i])


def _sigmoid64(v):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-v))


FUNCTIONS = {"tanh": (_tanh, np.tanh), "exp": (_exp, np.exp), "sigmoid": (_sigmoid, _sigmoid64)}


def _run(kernel, x):
    out = np.full_like(x, 7.0)
    kernel(x, out)
    return out


def _every_float32(lo, hi):
    """Every float32 in [lo, hi], 0 <= lo <= hi, in increasing order (by their bits)."""
    b = np.array([lo, hi], np.float32).view(np.int32)
    return np.arange(b[0], b[1] + 1, dtype=np.int32).view(np.float32)


def _ulps(got, want):
    """|got − want| in ulps of the float32 binade of the float64 ``want`` (2^-149 below the normals)."""
    e = np.frexp(want)[1].astype(np.int64)                      # want = m 2^e, 0.5 <= |m| < 1
    ulp = np.ldexp(1.0, np.maximum(e - 24, -149))
    return np.abs(got.astype(np.float64) - want) / ulp


def _check(name, x, chunk=1 << 22):
    """The float32 results for x against float64's, in chunks; returns them and the largest error in ulps.

    Where a result equals float64's rounded to float32 it is the nearest float32 (an error
    of at most 0.5 ulp, to float64's own 1e-9 ulp); only the others are measured."""
    kernel, truth = FUNCTIONS[name]
    got = _run(kernel, x)
    assert got.dtype == np.float32
    assert np.array_equal(np.isnan(got), np.isnan(x)), f"{name}: NaN in, NaN out, and only then"
    worst = 0.0
    for i in range(0, x.size, chunk):
        xs, gs = x[i:i + chunk], got[i:i + chunk]
        with np.errstate(over="ignore", invalid="ignore"):
            want = truth(xs.astype(np.float64))
            rounded = want.astype(np.float32)                   # float64 rounded to float32
        # where that is ±inf, 0 or ±1, the result is exactly it: saturation at the right x, no sooner
        for edge in (np.inf, -np.inf, 0.0, 1.0, -1.0):
            at = rounded == edge
            assert np.array_equal(gs[at], rounded[at]), f"{name}: {edge} where float64 rounds to it"
        off = (gs != rounded) & ~np.isnan(xs)
        if np.any(off):
            err = _ulps(gs[off], want[off])
            j = int(np.argmax(err))
            assert err[j] <= BOUND, f"{name}({xs[off][j]!r}) = {gs[off][j]!r}: {err[j]:.4f} ulp from {want[off][j]!r}"
            worst = max(worst, float(err[j]))
    return got, worst


# Bands of every float32 (the negative side of tanh is checked bit for bit against the
# positive): where float32 tanh saturates ([7, 10]), where its range reduction switches
# (ln2/4 = 0.1733), near 0 (where tanh x = x − x³/3 drops below x's ulp), the subnormals;
# e^x's overflow edge, its subnormal results and underflow edge, and where it crosses 1;
# σ's middle and both its tails.
BANDS = {
    "tanh": [(7.0, 10.0), (0.125, 0.25), (2.0**-12, 2.0**-11), (0.0, 2.0**-126)],
    "exp": [(88.0, 89.0), (-104.0, -87.0), (-1.0, -0.5), (0.5, 1.0)],
    "sigmoid": [(-1.0, -0.5), (0.5, 1.0), (15.0, 18.0), (-105.0, -86.0)],
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_float32_in_bands(name):
    for lo, hi in BANDS[name]:
        _check(name, _every_float32(lo, hi) if lo >= 0 else -_every_float32(-hi, -lo)[::-1])


def test_tanh_is_odd_bit_for_bit():
    x = np.concatenate([_every_float32(lo, hi) for lo, hi in BANDS["tanh"]] + [np.float32([np.inf, 3.0e38])])
    pos, neg = _run(_tanh, x), _run(_tanh, -x)
    assert np.array_equal((-pos).view(np.int32), neg.view(np.int32))        # -0.0 included


def test_tanh_saturates_where_float32_does():
    """1 exactly from the first float32 whose tanh rounds to 1 (9.0109), and below it the float32 just
    under 1, so that 1 − tanh² keeps the gradient alive (the old approximation was 1 from 7.9053)."""
    x = _every_float32(7.0, 10.0)
    want = np.tanh(x.astype(np.float64)).astype(np.float32)
    edge = x[np.argmax(want == 1)]
    assert 9.0 < edge < 9.02
    got = _run(_tanh, x)
    below = x < edge
    assert np.all(got[~below] == 1) and np.all(got[below] < 1)
    assert np.all(1 - got[below].astype(np.float64) ** 2 > 0)
    assert got[x == 8.5][0] == np.nextafter(np.float32(1), np.float32(0))


def test_exp_overflow_and_underflow_edges():
    top = _every_float32(88.0, 89.0)
    got = _run(_exp, top)
    with np.errstate(over="ignore"):
        want = np.exp(top.astype(np.float64)).astype(np.float32)
    first_inf = top[np.argmax(np.isinf(want))]
    assert 88.72 < first_inf < 88.73
    assert np.all(np.isinf(got[top >= first_inf])) and np.all(np.isfinite(got[top < first_inf]))
    bottom = -_every_float32(100.0, 110.0)
    got = _run(_exp, bottom)
    want = np.exp(bottom.astype(np.float64)).astype(np.float32)
    assert np.array_equal(got, want)                                     # subnormals, then 0
    assert np.any(want == 0) and np.any((want > 0) & (want < np.finfo(np.float32).tiny))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_a_dense_sample_of_every_float32(name):
    """Ten million float32 drawn uniformly over their 2^32 bit patterns (NaNs and infinities among
    them), so every binade is sampled alike, and ten million uniform on the range that matters."""
    rng = np.random.default_rng(20240816)
    bits = rng.integers(0, 2**32, size=10_000_000, dtype=np.uint64).astype(np.uint32)
    _check(name, bits.view(np.float32))
    lo, hi = {"tanh": (-10, 10), "exp": (-105, 89), "sigmoid": (-105, 20)}[name]
    _check(name, rng.uniform(lo, hi, size=10_000_000).astype(np.float32))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_special_values(name):
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.float32([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, 1e-30, -1e-30, FLT_MAX, -FLT_MAX])
    got, _ = _check(name, x)
    kernel, truth = FUNCTIONS[name]
    with np.errstate(over="ignore"):
        want = truth(x.astype(np.float64)).astype(np.float32)
    assert np.array_equal(got.view(np.int32)[2:], want.view(np.int32)[2:])   # the sign of 0 too
    nan_bits = np.array([0x7FC00001, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32)
    assert np.all(np.isnan(_run(kernel, nan_bits)))                           # any NaN, quiet or not


def test_the_gated_cells_use_this_sigmoid():
    """The GRU's and the LSTM's gates are the σ tested here (not a less accurate one of their own)."""
    from fastbptt.core.cells import gru, lstm
    from fastbptt.core.kernels import primitives
    assert gru.sigmoid is primitives.sigmoid and lstm.sigmoid is primitives.sigmoid
