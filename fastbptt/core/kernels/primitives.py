"""Building blocks the kernels inline, written so that LLVM can vectorize the loops around them.

``tanh(x)``, ``exp(x)``, ``sigmoid(x)``: for float32, computed in float64 and rounded to
float32 once, so each result is within 0.501 float32 ulp of the exact value (the nearest
float32, but for inputs whose value lies within 0.001 ulp of halfway between two): 0.5003
ulp for tanh and 0.5001 for exp measured over every float32, where they saturate too. Float32
tanh is ±1 only from |x| = 9.0109 on (so 1 − tanh² is 0 only where the float32 tanh is 1),
e^x is +inf from 88.7228 on and 0 below −103.9721, with its subnormal results in between
correctly rounded; σ is 1 from 17.33 on, 0 below −103.9721. All three share one range
reduction, y = n ln2 + r with |r| <= ln2/2, e^r − 1 by Taylor's series to r⁹/9! (2e-11
relative) and 2^n from n's bits; tanh|x| = u / (u + 2) with u = e^(2|x|) − 1, whose two
terms 2^n (e^r − 1) and 2^n − 1 are exact and of one sign, so nothing cancels near 0.
In a loop over 1e6 float32 on an AVX-512 CPU (Zen 4), tanh runs at 1.3e9 elements/s, exp
at 1.9e9, sigmoid at 1.45e9; libm's tanhf, which LLVM cannot vectorize, at 0.06e9.
For float64, libm's tanh and exp (sigmoid 1 / (1 + e^-x)).

``matmat_acc(out, M, V, c, b0, b1)``: out[b] += c[b] Σ_j V[b, j] M[j] for a range of
rows b, eight rows of M at a time, each block of eight reused for every b while in L1.

NaN stays NaN, without a branch (a clamp keeps it, and 2^n is read from bits, which are
defined for a NaN where a float-to-int conversion is not). Products and sums the polynomial
makes are llvm.fmuladd: fused where the CPU has FMA. Callers compile with
``error_model="numpy"`` so that a division carries no ZeroDivisionError branch, which would
stop vectorization.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload


def tanh(x):
    """tanh(x) for one float32 or float64 scalar; only callable from compiled code."""
    raise NotImplementedError("fastbptt.kernels.primitives.tanh is only callable from @njit code")


def exp(x):
    """e**x for one float32 or float64 scalar; only callable from compiled code."""
    raise NotImplementedError("fastbptt.kernels.primitives.exp is only callable from @njit code")


def sigmoid(x):
    """1 / (1 + e**-x) for one float32 or float64 scalar; only callable from compiled code."""
    raise NotImplementedError("fastbptt.kernels.primitives.sigmoid is only callable from @njit code")


@intrinsic
def _fmuladd(typingctx, a, b, c):
    """a * b + c for float64s, fused into one rounding where the CPU has FMA (llvm.fmuladd)."""
    if not all(v == types.float64 for v in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        d = ir.DoubleType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(d, [d, d, d]), "llvm.fmuladd.f64")
        return builder.call(fn, args)

    return types.float64(types.float64, types.float64, types.float64), codegen


@intrinsic
def _bits_to_float64(typingctx, bits):
    """The float64 whose bits are the int64 ``bits``."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def _float64_to_bits(typingctx, x):
    """The bits of the float64 ``x``, as an int64 (defined for every x, NaN included)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_SHIFT = 6755399441055744.0              # 1.5 * 2^52: v + _SHIFT rounds v to an integer n, in its low bits
# 1/k! for k = 9 .. 2: Taylor's coefficients of e^r - 1 = r + r²/2 + ... + r⁹/9!
_X9, _X8, _X7, _X6, _X5, _X4, _X3, _X2 = (1.0 / f for f in (362880, 40320, 5040, 720, 120, 24, 6, 2))


@njit(inline="always", error_model="numpy")
def _reduce(y):
    """(2^n, e^r - 1) with y = n ln2 + r, n an integer, |r| <= ln2/2 (+1e-14), for a float64 |y| <= 700.

    e^r - 1 is within 2e-11 of it, relative; 2^n comes from n's bits (the low bits of
    y / ln2 + _SHIFT), which are defined whatever y is, so a NaN gives NaN and no poison.
    """
    k = _fmuladd(y, _LOG2E, _SHIFT)
    n = k - _SHIFT
    r = _fmuladd(n, -_LN2, y)
    q = _fmuladd(r, _X9, _X8)
    q = _fmuladd(r, q, _X7)
    q = _fmuladd(r, q, _X6)
    q = _fmuladd(r, q, _X5)
    q = _fmuladd(r, q, _X4)
    q = _fmuladd(r, q, _X3)
    q = _fmuladd(r, q, _X2)
    q = _fmuladd(r, q, 1.0)
    return _bits_to_float64((_float64_to_bits(k) + 1023) << 52), r * q


_TANH_BIG = 9.5      # float32 tanh(x) rounds to ±1 from |x| = 9.0109 on: the clamp changes no result
_EXP_BIG = 100.0     # float32 e^x is +inf from x = 88.7228 on
_EXP_SMALL = -110.0  # and 0 below x = -103.9721; float32 σ(x) rounds to 0 there too, and to 1 from 17.33 on


@overload(tanh, inline="always")
def _tanh_overload(x):
    if x == types.float32:
        def tanh_float32(x):
            # in float64: tanh|x| = u / (u + 2), u = e^(2|x|) - 1 = 2^n (e^r - 1) + (2^n - 1),
            # two exact terms of one sign: nothing cancels, and the float32 is rounded once
            a = min(np.float64(abs(x)), _TANH_BIG)          # NaN stays NaN
            s, q = _reduce(a + a)
            u = _fmuladd(s, q, s - 1.0)
            return math.copysign(np.float32(u / (u + 2.0)), x)
        return tanh_float32
    if isinstance(x, types.Float):
        def tanh_libm(x):
            return np.tanh(x)
        return tanh_libm
    return None


@overload(exp, inline="always")
def _exp_overload(x):
    if x == types.float32:
        def exp_float32(x):
            # in float64, where e^x is normal for every x that matters, rounded once to float32:
            # overflow to inf, subnormal results and underflow to 0 come out of that rounding
            y = min(max(np.float64(x), _EXP_SMALL), _EXP_BIG)   # NaN stays NaN
            s, q = _reduce(y)
            return np.float32(_fmuladd(s, q, s))
        return exp_float32
    if isinstance(x, types.Float):
        def exp_libm(x):
            return np.exp(x)
        return exp_libm
    return None


@overload(sigmoid, inline="always")
def _sigmoid_overload(x):
    if x == types.float32:
        def sigmoid_float32(x):
            y = min(max(np.float64(-x), _EXP_SMALL), -_EXP_SMALL)   # NaN stays NaN
            s, q = _reduce(y)
            return np.float32(1.0 / (1.0 + _fmuladd(s, q, s)))     # in float64, rounded once
        return sigmoid_float32
    if isinstance(x, types.Float):
        def sigmoid_libm(x):
            return 1.0 / (1.0 + np.exp(-x))
        return sigmoid_libm
    return None


@njit(inline="always", error_model="numpy")
def matvec_acc(out, M, v, c):
    """out += c * Σ_j v[j] M[j]: ``matmat_acc`` for a single row, operation for operation.

    out (N,) in/out;  M (K, N);  v (K,);  c scalar
    """
    K, N = M.shape
    j = 0
    while j + 8 <= K:
        v0, v1, v2, v3 = c * v[j], c * v[j + 1], c * v[j + 2], c * v[j + 3]
        v4, v5, v6, v7 = c * v[j + 4], c * v[j + 5], c * v[j + 6], c * v[j + 7]
        m0, m1, m2, m3 = M[j], M[j + 1], M[j + 2], M[j + 3]
        m4, m5, m6, m7 = M[j + 4], M[j + 5], M[j + 6], M[j + 7]
        for i in range(N):
            out[i] += (((m0[i] * v0 + m1[i] * v1) + (m2[i] * v2 + m3[i] * v3))
                       + ((m4[i] * v4 + m5[i] * v5) + (m6[i] * v6 + m7[i] * v7)))
        j += 8
    while j < K:
        vj = c * v[j]
        row = M[j]
        for i in range(N):
            out[i] += row[i] * vj
        j += 1


@njit(inline="always", error_model="numpy")
def matmat_acc(out, M, V, c, b0, b1):
    """out[b] += c[b] * Σ_j V[b, j] M[j] for b in [b0, b1): row-vectors times a matrix, accumulated.

    out (B, N) in/out
    M   (K, N)
    V   (B, K)
    c   (B,)
    Eight rows of M go into each pass over ``out[b]``, so it is loaded and stored K/8
    times rather than K times, and two rows b share each pass, so each element of M
    loaded serves both. Each row b gets the same operations in the same order whatever
    [b0, b1) is, and whether it is paired or alone, so the result does not depend on how
    rows are grouped (the parallel kernels' blocks give the serial kernel's bits).
    """
    if b1 - b0 == 1:                  # one row: the same operations, with less bookkeeping
        matvec_acc(out[b0], M, V[b0], c[b0])
        return
    K, N = M.shape
    j = 0
    while j + 8 <= K:
        m0, m1, m2, m3 = M[j], M[j + 1], M[j + 2], M[j + 3]
        m4, m5, m6, m7 = M[j + 4], M[j + 5], M[j + 6], M[j + 7]
        b = b0
        while b + 2 <= b1:
            v = V[b]
            cb = c[b]
            v0, v1, v2, v3 = cb * v[j], cb * v[j + 1], cb * v[j + 2], cb * v[j + 3]
            v4, v5, v6, v7 = cb * v[j + 4], cb * v[j + 5], cb * v[j + 6], cb * v[j + 7]
            w = V[b + 1]
            cw = c[b + 1]
            w0, w1, w2, w3 = cw * w[j], cw * w[j + 1], cw * w[j + 2], cw * w[j + 3]
            w4, w5, w6, w7 = cw * w[j + 4], cw * w[j + 5], cw * w[j + 6], cw * w[j + 7]
            o = out[b]
            p = out[b + 1]
            for i in range(N):
                a0, a1, a2, a3 = m0[i], m1[i], m2[i], m3[i]
                a4, a5, a6, a7 = m4[i], m5[i], m6[i], m7[i]
                o[i] += (((a0 * v0 + a1 * v1) + (a2 * v2 + a3 * v3))
                         + ((a4 * v4 + a5 * v5) + (a6 * v6 + a7 * v7)))
                p[i] += (((a0 * w0 + a1 * w1) + (a2 * w2 + a3 * w3))
                         + ((a4 * w4 + a5 * w5) + (a6 * w6 + a7 * w7)))
            b += 2
        if b < b1:                    # an odd row left: the same operations alone
            v = V[b]
            cb = c[b]
            v0, v1, v2, v3 = cb * v[j], cb * v[j + 1], cb * v[j + 2], cb * v[j + 3]
            v4, v5, v6, v7 = cb * v[j + 4], cb * v[j + 5], cb * v[j + 6], cb * v[j + 7]
            o = out[b]
            for i in range(N):
                o[i] += (((m0[i] * v0 + m1[i] * v1) + (m2[i] * v2 + m3[i] * v3))
                         + ((m4[i] * v4 + m5[i] * v5) + (m6[i] * v6 + m7[i] * v7)))
        j += 8
    while j < K:
        row = M[j]
        for b in range(b0, b1):
            vj = c[b] * V[b, j]
            o = out[b]
            for i in range(N):
                o[i] += row[i] * vj
        j += 1
