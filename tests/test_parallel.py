"""parallel=True gives bitwise the same results as parallel=False, whatever the thread count."""

import numba
import numpy as np
import pytest

import fastbptt
from helpers import has_avx2, make_problem


def run(model, X, Y, h0, loss, parallel, method="auto", carry=None):
    L, grads, hT, dh0, dX = fastbptt.loss_and_grad(model, X, Y, h0, loss=loss, parallel=parallel,
                                                   return_dh0=True, return_dX=True, method=method,
                                                   carry=carry)
    return {"loss": np.array(L), "h_T": hT, "dh0": dh0, "dX": dX, **grads}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_parallel_equals_serial(threads, inputs, loss, dtype, method):
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    model, X, Y, h0 = make_problem(T=9, B=8, D=5, H=21, O=7, loss=loss, inputs=inputs, dtype=dtype)
    serial = run(model, X, Y, h0, loss, parallel=False, method=method)
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        parallel = run(model, X, Y, h0, loss, parallel=True, method=method)
    finally:
        numba.set_num_threads(before)
    for name, value in serial.items():
        assert np.array_equal(parallel[name], value), (
            f"{name} differs with {threads} threads: max {np.abs(parallel[name] - value).max():.3e}")


def test_parallel_step_leaves_blas_threads_to_the_size_policy(monkeypatch):
    """Every product runs with the BLAS threads its size asks for, whatever ``parallel`` is
    (a parallel step used to hold BLAS to one thread, which changed the bits)."""
    pytest.importorskip("threadpoolctl")
    from fastbptt import threads
    if not threads.available():
        pytest.skip("threadpoolctl found no BLAS")
    seen = {False: [], True: []}
    real, mode = threads.np.dot, [False]

    def spy(a, b, out=None):
        seen[mode[0]].append((a.shape, b.shape, tuple(lib.get_num_threads() for lib in threads._libs)))
        return real(a, b, out=out)

    monkeypatch.setattr(threads.np, "dot", spy)
    monkeypatch.setattr(threads, "PARALLEL_BLAS_MIN_FLOPS", 2 * 5 * 4 * 8)   # some products above it
    monkeypatch.setattr(threads, "_GEMM_ONE", 0)       # no product left to BLAS's own small-size rule
    monkeypatch.setattr(threads, "_GEMV_ONE", 0)
    model, X, Y, h0 = make_problem(T=5, B=4, H=8)
    for parallel in (False, True):
        mode[0] = parallel
        fastbptt.loss_and_grad(model, X, Y, h0, parallel=parallel, method="fused")
    assert seen[True] == seen[False]
    assert {s[2] for s in seen[True]} == {(1,) * len(threads._libs), threads._saved}


def test_without_threadpoolctl_products_keep_blas_settings(monkeypatch):
    from fastbptt import threads
    model, X, Y, h0 = make_problem(T=5, B=4, H=8)
    want = fastbptt.loss_and_grad(model, X, Y, h0)[1]["W_hh"].copy()
    monkeypatch.setattr(threads, "_libs", [])          # as when threadpoolctl is missing
    monkeypatch.setattr(threads, "_warned_uncontrolled", False)
    assert not threads.available()
    with pytest.warns(RuntimeWarning, match="without threadpoolctl"):
        got = fastbptt.loss_and_grad(model, X, Y, h0, parallel=True, method="fused")[1]["W_hh"]
    assert np.array_equal(got, want)


def bits(results):
    """Each result's raw bytes and dtype: equal means bitwise equal, NaNs and signed zeros included."""
    return {name: (np.asarray(v).dtype, np.asarray(v).tobytes()) for name, v in results.items()}


@pytest.mark.parametrize("T,B,H", [(100, 32, 64), (50, 48, 128)])
@pytest.mark.parametrize("inputs,loss", [("tokens", "cross_entropy"), ("dense", "mse")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_equals_serial_at_realistic_sizes(T, B, H, inputs, loss, dtype):
    """The promise at the sizes people train at (T·B in the thousands, H >= 64), with carry
    weights, for every method: bit for bit, loss, every gradient, h_T, ∂L/∂h_0 and ∂L/∂X."""
    model, X, Y, h0 = make_problem(T=T, B=B, D=27, H=H, O=30, loss=loss, inputs=inputs,
                                   dtype=dtype, seed=T + B)
    model.flat[...] *= 0.3                               # a trained model's scale: tanh not saturated
    carry = fastbptt.training.random_truncation(T, 0.8, np.random.default_rng(B), B=B)
    differ = []
    for method in ("fused", "blas", "auto"):
        serial, parallel = (
            {k: np.array(v, copy=True) for k, v in run(model, X, Y, h0, loss, p, method, carry).items()}
            for p in (False, True))
        for name, same in zip(serial, (a == b for a, b in zip(bits(serial).values(),
                                                               bits(parallel).values()))):
            if not same:
                gap = np.abs(parallel[name].astype(np.float64) - serial[name]).max()
                differ.append(f"{method} {name}: max |parallel - serial| = {gap:.3e}")
    assert not differ, "parallel=True is not bitwise serial:\n" + "\n".join(differ)


def test_parallel_equals_serial_at_realistic_sizes_with_another_blas_kernel():
    """The same promise with OpenBLAS's Haswell kernels, whose one- and two-thread products
    round differently (the kernels this machine picks may happen not to): one subprocess."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    if not (blas and all(i["internal_api"] == "openblas" for i in blas) and has_avx2()):
        pytest.skip("needs OpenBLAS on an x86-64 CPU with AVX2")
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbptt.__file__)))
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell")
    env["PYTHONPATH"] = os.pathsep.join([root, here] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", root,
         os.path.join(here, "test_parallel.py"), "-k", "test_parallel_equals_serial_at_realistic_sizes["],
        env=env, cwd=root, capture_output=True, text=True, timeout=600)
    summary = [line for line in proc.stdout.splitlines() if "FAILED" in line or "serial = " in line]
    status = proc.returncode
    assert status == 0, "with OPENBLAS_CORETYPE=Haswell:\n" + "\n".join(summary[-60:]) \
        + proc.stderr[-2000:]
