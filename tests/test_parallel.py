"""parallel=True gives bitwise the same results as parallel=False, whatever the thread count."""

import numba
import numpy as np
import pytest

import fastbptt
from helpers import make_problem


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


def test_blas_is_held_to_one_thread_during_a_parallel_step(monkeypatch):
    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_info

    from fastbptt import threads
    seen = []
    real = threads.blas_single_threaded

    def spy():
        context = real()

        class Spy:
            def __enter__(self):
                context.__enter__()
                seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])

            def __exit__(self, *exc):
                return context.__exit__(*exc)
        return Spy()

    monkeypatch.setattr(fastbptt.api, "blas_single_threaded", spy)
    model, X, Y, h0 = make_problem(T=5, B=4, H=8)
    fastbptt.loss_and_grad(model, X, Y, h0, parallel=True, method="fused")
    assert seen and all(n == 1 for n in seen[0])
    seen.clear()
    fastbptt.loss_and_grad(model, X, Y, h0, parallel=False)
    assert not seen                                  # the serial path leaves BLAS alone


def test_parallel_without_threadpoolctl_warns(monkeypatch):
    import sys

    from fastbptt import threads
    monkeypatch.setattr(threads, "_controller", None)
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)   # makes the import fail
    with pytest.warns(RuntimeWarning, match="without threadpoolctl"):
        context = threads.blas_single_threaded()
    with context:
        pass


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


def _has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


def test_parallel_equals_serial_at_realistic_sizes_with_another_blas_kernel():
    """The same promise with OpenBLAS's Haswell kernels, whose one- and two-thread products
    round differently (the kernels this machine picks may happen not to): one subprocess."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    if not (blas and all(i["internal_api"] == "openblas" for i in blas) and _has_avx2()):
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
