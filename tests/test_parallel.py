"""parallel=True gives bitwise the same results as parallel=False, whatever the thread count."""

import numba
import numpy as np
import pytest

import fastbptt
from helpers import make_problem


def run(model, X, Y, h0, loss, parallel, method="auto"):
    L, grads, hT, dh0, dX = fastbptt.loss_and_grad(model, X, Y, h0, loss=loss, parallel=parallel,
                                                   return_dh0=True, return_dX=True, method=method)
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
