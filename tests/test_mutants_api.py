"""Tests for mutants of fastbptt/threads.py and fastbptt/api.py that the rest of the suite let
survive (docs/mutation-testing.md): each was checked to fail with its mutant put in by hand."""

import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt import threads
from helpers import make_problem


def _run(code, timeout=120):
    """``code`` in a fresh interpreter that finds tests/helpers.py; a hang fails the test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _blas_threads_of(monkeypatch, shapes, blas_threads=2):
    """The BLAS thread counts each ``threads.dot`` of ``shapes`` ((M, K), (K, N)) ran with, each
    in its own call on the main thread with BLAS set to ``blas_threads``; and the setting after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not threads.available():
        pytest.skip("threadpoolctl found no BLAS")
    seen, real = [], np.dot

    def spy(a, b, out=None):
        seen.append({lib.get_num_threads() for lib in threads._libs})
        return real(a, b, out=out)

    monkeypatch.setattr(threads.np, "dot", spy)
    with threadpoolctl.threadpool_limits(blas_threads, user_api="blas"):
        for (M, K), (_, N) in shapes:
            threads.enter()
            try:
                threads.dot(np.ones((M, K)), np.ones((K, N)), np.empty((M, N)))
            finally:
                threads.leave()
        after = {lib.get_num_threads() for lib in threads._libs}
    return seen, after


def test_products_from_2_to_the_25_flops_get_the_callers_blas_threads(monkeypatch):
    """The README's threshold, exactly: 2·256³ = 2^25 flops run on the caller's threads, one
    row less on one thread (mutants: the constant 2^26 or 3^25, ``>=`` made ``>``)."""
    seen, after = _blas_threads_of(monkeypatch, [((256, 256), (256, 256)), ((255, 256), (256, 256)),
                                                 ((256, 256), (256, 256))])
    assert seen == [{2}, {1}, {2}]
    assert after == {2}


def test_a_process_whose_first_call_comes_from_another_thread_does_not_hang():
    """Before the main thread's first call, other threads run their products with the caller's
    setting at once (mutant: ``_current`` starting as None, never equal to the saved ``()``)."""
    pytest.importorskip("threadpoolctl")
    done = _run("""
        import threading, warnings
        import threadpoolctl, fastbptt
        from helpers import make_problem
        warnings.simplefilter("ignore")
        model, X, Y, h0 = make_problem(T=50, B=9, D=28, H=64, O=28)   # products BLAS may thread
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            results = []
            worker = threading.Thread(target=lambda: results.append(fastbptt.loss_and_grad(model, X, Y, h0)))
            worker.start()
            worker.join()
        assert results and results[0][0] > 0
        print("ok")
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_another_blas_than_openblas_gets_the_size_policy_for_every_product():
    """MKL or BLIS through threadpoolctl: no OpenBLAS one-thread sizes to skip, so every product
    goes through the policy, and products below 2^25 flops give the bits of BLAS limited to one
    thread (mutant: the sizes' starting value None, which no longer compares)."""
    pytest.importorskip("threadpoolctl")
    done = _run("""
        import threadpoolctl
        real_select = threadpoolctl.ThreadpoolController.select

        def select(self, **kwargs):                  # the same BLAS, reported as another one
            chosen = real_select(self, **kwargs)
            for lib in chosen.lib_controllers:
                lib.internal_api = "another"
            return chosen

        threadpoolctl.ThreadpoolController.select = select
        import numpy as np, fastbptt
        from fastbptt import threads
        from helpers import make_problem
        model, X, Y, h0 = make_problem(T=50, B=9, D=28, H=64, O=28, dtype=np.float64, inputs="dense")
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            loss, grads, hT = fastbptt.loss_and_grad(model, X, Y, h0)
            grads = {k: v.copy() for k, v in grads.items()}
        assert threads.available()
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            want = fastbptt.loss_and_grad(model, X, Y, h0)
        assert loss == want[0] and all(np.array_equal(grads[k], want[1][k]) for k in grads)
        print("ok")
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_openblas_one_thread_sizes_are_left_alone_and_the_next_size_gets_the_policy(monkeypatch):
    """NumPy's OpenBLAS runs a GEMM of M·N·K < 65536·4 and a GEMV of M·N < 2304·4 on one thread
    whatever its setting: those keep the caller's setting untouched, one size up gets one thread
    (mutants: the OpenBLAS test inverted, another multiplier). Read from threadpoolctl's own
    report, not from what threads.py found."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    if not blas or not all(i["internal_api"] == "openblas" and i["prefix"].startswith("libscipy_openblas")
                           for i in blas):
        pytest.skip("needs NumPy's own OpenBLAS build (GEMM_MULTITHREAD_THRESHOLD = 4)")
    gemm_below, gemm_at = ((63, 64), (64, 64)), ((64, 64), (64, 64))      # 258048, 262144 = 65536·4
    gemv_below, gemv_at = ((95, 97), (97, 1)), ((96, 96), (96, 1))        # 9215, 9216 = 2304·4
    seen, after = _blas_threads_of(monkeypatch, [gemm_below, gemm_at, gemv_below, gemv_at])
    assert seen == [{2}, {1}, {2}, {1}]
    assert after == {2}


def test_another_openblas_build_is_assumed_to_thread_from_65536_flops():
    """An OpenBLAS that is not NumPy's own may be built with a lower GEMM_MULTITHREAD_THRESHOLD:
    assume 1, so a GEMM from M·N·K = 65536 and a GEMV from M·N = 2304 get the size policy
    (mutant: another multiplier for other builds)."""
    pytest.importorskip("threadpoolctl")
    done = _run("""
        import threadpoolctl
        real_select = threadpoolctl.ThreadpoolController.select

        def select(self, **kwargs):                  # the same OpenBLAS, under another name
            chosen = real_select(self, **kwargs)
            for lib in chosen.lib_controllers:
                lib.prefix = "libopenblas"
            return chosen

        threadpoolctl.ThreadpoolController.select = select
        import numpy as np
        from fastbptt import threads
        if not threads.available() or threads._libs[0].internal_api != "openblas":
            print("skip")
            raise SystemExit
        seen, real = [], np.dot
        threads.np.dot = lambda a, b, out=None: (seen.append(threads._libs[0].get_num_threads()),
                                                 real(a, b, out=out))
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            for M, K, N in [(63, 32, 32), (64, 32, 32), (47, 49, 1), (48, 48, 1)]:
                threads.enter()
                threads.dot(np.ones((M, K)), np.ones((K, N)), np.empty((M, N)))
                threads.leave()
        print(seen)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.strip() == "skip":
        pytest.skip("needs OpenBLAS through threadpoolctl")
    assert done.stdout.strip() == "[2, 1, 2, 1]"


def test_parallel_without_threadpoolctl_warns_once_in_a_new_process():
    """The warning's flag starts down (mutant: starting up, so no process ever warns)."""
    done = _run("""
        import sys, warnings
        sys.modules["threadpoolctl"] = None          # import threadpoolctl fails
        import fastbptt
        from helpers import make_problem
        model, X, Y, h0 = make_problem(T=5, B=4, H=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                fastbptt.loss_and_grad(model, X, Y, h0, parallel=True, method="fused")
        print(sum("without threadpoolctl" in str(w.message) for w in caught))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "1"


def test_parallel_with_threadpoolctl_does_not_warn_about_it(monkeypatch):
    """The no-threadpoolctl warning needs both: no BLAS controllers and not warned yet (mutant:
    either one)."""
    pytest.importorskip("threadpoolctl")
    if not threads.available():
        pytest.skip("threadpoolctl found no BLAS")
    monkeypatch.setattr(threads, "_warned_uncontrolled", False)
    model, X, Y, h0 = make_problem(T=5, B=4, H=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastbptt.loss_and_grad(model, X, Y, h0, parallel=True, method="fused")
    assert not [w for w in caught if "without threadpoolctl" in str(w.message)]


def test_the_no_threadpoolctl_warning_points_at_the_callers_line(monkeypatch):
    """(mutant: another stacklevel)"""
    monkeypatch.setattr(threads, "_libs", [])          # as when threadpoolctl is missing
    monkeypatch.setattr(threads, "_warned_uncontrolled", False)
    model, X, Y, h0 = make_problem(T=5, B=4, H=8)
    with pytest.warns(RuntimeWarning, match="without threadpoolctl") as caught:
        fastbptt.loss_and_grad(model, X, Y, h0, parallel=True, method="fused")
    assert [w.filename for w in caught] == [__file__]


def test_the_other_thread_warning_points_at_the_callers_line(monkeypatch):
    """(mutant: another stacklevel)"""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not threads.available():
        pytest.skip("threadpoolctl found no BLAS")
    monkeypatch.setattr(threads, "_warned_other_thread", False)
    model, X, Y, h0 = make_problem(T=50, B=9, D=28, H=64, O=28)    # products BLAS may thread

    def work():
        fastbptt.loss_and_grad(model, X, Y, h0)

    with threadpoolctl.threadpool_limits(2, user_api="blas"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    assert [w.filename for w in caught if "thread other than the main one" in str(w.message)] == [__file__]
