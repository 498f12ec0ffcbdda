"""Building blocks the kernels inline, written so that LLVM can vectorize the loops around them.

``tanh(x)``: for float32, a rational approximation (odd degree-13 numerator over an
even degree-6 denominator on [-7.9, 7.9], where float32 tanh saturates), accurate to
about 3 float32 ulp and about 30 times faster in a loop than libm's tanhf, which LLVM
cannot vectorize without a vector math library. For float64, libm's tanh.

``exp(x)``: for float32, Cody-Waite range reduction x = n ln 2 + r, a degree-7
polynomial for e^r and 2^n built from its bits (as two factors, so that both stay
normal); within about 2 float32 ulp where the result is normal, 0 below -104 and
+inf above 88.72. For float64, libm's exp.

``matmat_acc(out, M, V, c, b0, b1)``: out[b] += c[b] Σ_j V[b, j] M[j] for a range of
rows b, eight rows of M at a time, each block of eight reused for every b while in L1.

NaN stays NaN. Callers compile with ``error_model="numpy"`` so that a division
carries no ZeroDivisionError branch, which would stop vectorization.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_F = np.float32
_CLAMP = _F(7.90531110763549805)          # tanh(±7.9053) rounds to ±1 in float32
# numerator p(x²) and denominator q(x²) coefficients, highest degree first
_P0, _P1, _P2, _P3, _P4, _P5, _P6 = (_F(c) for c in (
    -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
    1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03))
_Q0, _Q1, _Q2, _Q3 = (_F(c) for c in (
    1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))


def tanh(x):
    """tanh(x) for one float32 or float64 scalar; only callable from compiled code."""
    raise NotImplementedError("fastbptt.kernels.primitives.tanh is only callable from @njit code")


@overload(tanh, inline="always")
def _tanh_overload(x):
    if x == types.float32:
        def tanh_float32(x):
            y = np.minimum(np.maximum(x, -_CLAMP), _CLAMP)   # NaN stays NaN
            y2 = y * y
            p = y2 * _P0 + _P1
            p = y2 * p + _P2
            p = y2 * p + _P3
            p = y2 * p + _P4
            p = y2 * p + _P5
            p = y2 * p + _P6
            q = y2 * _Q0 + _Q1
            q = y2 * q + _Q2
            q = y2 * q + _Q3
            return y * p / q
        return tanh_float32
    if isinstance(x, types.Float):
        def tanh_libm(x):
            return np.tanh(x)
        return tanh_libm
    return None


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bits are the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = args[0]
        if bits.bitwidth > 32:
            low = builder.trunc(low, ir.IntType(32))
        elif bits.bitwidth < 32:
            low = builder.zext(low, ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


_LOG2E = _F(1.44269504088896341)
_LN2_HI = _F(0.693359375)               # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI exact in 9 bits
_LN2_LO = _F(-2.12194440e-4)
_EXP_HI = _F(88.72283935546875)        # above: e^x overflows float32
_EXP_LO = _F(-103.97208404541016)      # below: e^x rounds to 0 in float32
_HALF = _F(0.5)
_ONE = _F(1.0)
_ZERO = _F(0.0)
_INF = _F(np.inf)
_E2, _E3, _E4, _E5, _E6, _E7 = (_F(1.0 / f) for f in (2, 6, 24, 120, 720, 5040))


def exp(x):
    """e**x for one float32 or float64 scalar; only callable from compiled code."""
    raise NotImplementedError("fastbptt.kernels.primitives.exp is only callable from @njit code")


@overload(exp, inline="always")
def _exp_overload(x):
    if x == types.float32:
        def exp_float32(x):
            y = min(max(x, _EXP_LO), _EXP_HI)
            n = np.floor(y * _LOG2E + _HALF)
            r = (y - n * _LN2_HI) - n * _LN2_LO
            p = r * _E7 + _E6
            p = r * p + _E5
            p = r * p + _E4
            p = r * p + _E3
            p = r * p + _E2
            p = r * p + _ONE
            p = r * p + _ONE
            k = np.int32(n)                    # in [-150, 128]: 2^k in two normal halves
            half = k >> 1
            e = (p * _float32_from_bits((half + 127) << 23)) * _float32_from_bits((k - half + 127) << 23)
            e = _INF if x > _EXP_HI else e
            e = _ZERO if x < _EXP_LO else e
            return e if x == x else x          # NaN goes on
        return exp_float32
    if isinstance(x, types.Float):
        def exp_libm(x):
            return np.exp(x)
        return exp_libm
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
