"""Shared test helpers: random problems and a comparison that names what differs."""

import io
import os
import tracemalloc
from pathlib import Path

import numpy as np

import fastbptt
from fastbptt import reference


def make_problem(T=5, B=3, D=4, H=6, O=5, activation="tanh", bias=True, loss="cross_entropy",
                 inputs="dense", dtype=np.float64, seed=0, h0=True):
    """A model and a random batch. Returns (model, X, Y, h0)."""
    rng = np.random.default_rng(seed)
    model = fastbptt.RNN(D, H, O, activation=activation, bias=bias, dtype=dtype, seed=seed)
    # larger weights than the default make φ' vary, so the sweep is exercised properly
    for name, p in model.params.items():
        p[...] = rng.normal(0.0, 0.6, size=p.shape)
    if inputs == "dense":
        X = rng.normal(size=(T, B, D)).astype(dtype)
    else:
        X = rng.integers(0, D, size=(T, B))
    if loss == "cross_entropy":
        Y = rng.integers(0, O, size=(T, B))
    else:
        Y = rng.normal(size=(T, B, O)).astype(dtype)
    h = rng.normal(size=(B, H)).astype(dtype) if h0 else None
    return model, X, Y, h


def reference_result(model, X, Y, h0, loss):
    """The reference's (loss, grads, h_T, dh0, dX), computed in float64."""
    params = {k: v.astype(np.float64) for k, v in model.params.items()}
    X64 = X if X.dtype.kind in "iu" else X.astype(np.float64)
    Y64 = Y if Y.dtype.kind in "iu" else Y.astype(np.float64)
    h64 = None if h0 is None else h0.astype(np.float64)
    return reference.loss_and_grad(params, X64, Y64, h64, model.activation, loss)


def tolerance(dtype):
    """Relative tolerance (to the largest magnitude of the expected array) for a dtype."""
    return 1e-10 if np.dtype(dtype) == np.float64 else 256 * np.finfo(np.float32).eps


def assert_close(name, got, want, dtype):
    """Assert max|got - want| <= rtol * max(max|want|, 1e-3), naming the array and its largest error.

    The floor 1e-3 (the losses here are of order 1) keeps exact zeros, such as every
    gradient of a one-class cross-entropy, from demanding an error of exactly zero.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    rtol = tolerance(dtype)
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-3)
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= rtol * scale, (
        f"{name}: max abs error {err:.3e} exceeds {rtol:.1e} x scale {scale:.3e}")
    return err


def has_avx2():
    """Whether this is an x86 CPU with AVX2 (where OpenBLAS's Haswell kernels can be forced)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


#: d2l's timemachine.txt: $FASTBPTT_TIMEMACHINE, else ../shared/data/timemachine.txt beside the checkout
TIME_MACHINE = Path(os.environ.get("FASTBPTT_TIMEMACHINE")
                    or Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "timemachine.txt")


def snap(value):
    """A deep copy of a call's results (views into a workspace) as plain arrays."""
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(snap(v) for v in value)
    if hasattr(value, "keys"):
        return {k: np.array(v) for k, v in value.items()}
    return np.array(value)


def same(a, b):
    """Bitwise equality of two snapped results."""
    if a is None or b is None:
        return a is b
    if isinstance(a, float):
        return a == b
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    return np.array_equal(a, b)


def no_growth(call, smallest):
    """Bytes allocated over three calls after a warm-up: must stay under ``smallest``."""
    call()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(3):
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < smallest, f"{peak - base} bytes allocated per call"


def members(path):
    """A checkpoint's (an .npz's) arrays, by key, read plainly."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def npy(array):
    """``array`` as the bytes of an .npy file."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
