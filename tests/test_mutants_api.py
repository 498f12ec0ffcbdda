"""Tests for mutants of fastbptt/threads.py and fastbptt/api.py that the rest of the suite let
survive (docs/mutation-testing.md): each was checked to fail with its mutant put in by hand."""

import os
import subprocess
import sys
import textwrap
import threading
import time
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


_FORK_CHILD = """
    import multiprocessing, sys, warnings
    import numpy as np, threadpoolctl, fastbptt
    from fastbptt.kernels import sweep as forward
    from helpers import make_problem
    small = make_problem(T=30, B=8, D=6, H=16, O=5, dtype=np.float32)
    big = make_problem(T=50, B=9, D=28, H=64, O=28)       # products that change BLAS's setting
    launched, real = [], forward.recurrence_parallel

    def spy(*args):
        launched.append(1)
        return real(*args)

    def child(_):
        forward.recurrence_parallel = spy
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                loss = fastbptt.loss_and_grad(*small, parallel=True, method="fused")[0]
            with threadpoolctl.threadpool_limits(2, user_api="blas"):
                fastbptt.loss_and_grad(*big)
        return loss, len(launched), sum("forked after" in str(w.message) for w in caught)

    fastbptt.loss_and_grad(*small, parallel=PARENT_PARALLEL, method="fused")
    import numba
    if PARENT_PARALLEL and numba.threading_layer() != "omp":
        print("skip"); sys.exit()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        (loss, launches, warned), = pool.map(child, [0])
    assert loss == fastbptt.loss_and_grad(*small)[0]
    print(launches, warned)
"""


@pytest.mark.parametrize("parent_parallel,want", [(False, "2 0"), (True, "0 1")])
def test_a_forked_child_runs_parallel_only_if_the_parent_had_not(parent_parallel, want):
    """A child forked before any parallel call runs the parallel kernels, unwarned; one forked after
    the parent started GNU OpenMP's pool runs the serial ones and warns once. Either way its
    products change BLAS's setting without waiting on the parent's other threads (mutants: the
    pool taken as started, the child's reader count not reset, the warning never or always given)."""
    pytest.importorskip("threadpoolctl")
    if sys.platform != "linux":
        pytest.skip("fork is Linux's default start method")
    done = _run(_FORK_CHILD.replace("PARENT_PARALLEL", str(parent_parallel)))
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.strip() == "skip":
        pytest.skip("the parent's Numba layer survives fork")
    assert done.stdout.strip() == want


def _record_setters(monkeypatch):
    """Every change of BLAS's thread count from now on, as (thread id, count), still made."""
    pytest.importorskip("threadpoolctl")
    if not threads.available():
        pytest.skip("threadpoolctl found no BLAS")
    calls = []
    monkeypatch.setattr(threads, "_setters", [
        lambda k, real=real: (calls.append((threading.get_ident(), k)), real(k)) for real in threads._setters])
    return calls


def test_with_blas_limited_to_one_thread_a_call_changes_no_setting(monkeypatch):
    """The README's recipe for threads: one BLAS thread is what every small product wants already
    (mutant: a change whenever the wanted tuple is another object of the same value)."""
    calls = _record_setters(monkeypatch)
    import threadpoolctl
    model, X, Y, _ = make_problem(T=35, B=32, D=28, H=64, O=28, inputs="tokens", dtype=np.float32)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        fastbptt.loss_and_grad(model, X, Y)
    assert calls == []


def test_another_threads_call_never_changes_blas_setting(monkeypatch):
    """Only the main thread changes the count, even while its own call has it at one thread
    (mutant: any thread puts the caller's count back as it leaves)."""
    calls = _record_setters(monkeypatch)
    import threadpoolctl
    model, X, Y, _ = make_problem(T=100, B=1, D=1, H=32, O=1, inputs="tokens", dtype=np.float32)
    a = np.ones((64, 64))
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        threads.enter()
        try:
            threads.dot(a, a, np.empty((64, 64)))           # the main thread's call: one thread now
            worker = threading.Thread(target=fastbptt.loss_and_grad, args=(model, X, Y))
            worker.start()
            worker.join()
        finally:
            threads.leave()
    assert calls and {ident for ident, _ in calls} == {threading.get_ident()}


@pytest.mark.filterwarnings("ignore:fastbptt called from a thread other than the main one")
def test_a_waiting_thread_gets_the_callers_count_back_after_the_main_threads_next_product(monkeypatch):
    """Another thread's product waits for the caller's count while the main thread's call holds one
    thread, and gets it back after the main thread's next product, not at the end of its call;
    afterwards a main call changes the count once each way again (mutants: no hand-back, or a
    waiting count that does not return to zero)."""
    calls = _record_setters(monkeypatch)
    import threadpoolctl
    a = np.ones((64, 64))                                    # threaded by OpenBLAS, < 2^25 flops
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        threads.enter()
        try:
            threads.dot(a, a, np.empty((64, 64)))           # one thread now
            done = threading.Event()
            worker = threading.Thread(target=lambda: (threads.dot(a, a, np.empty((64, 64))), done.set()))
            worker.start()
            while not threads._waiting and worker.is_alive():   # until it waits for the count
                time.sleep(0.001)
            threads.dot(a, a, np.empty((64, 64)))           # ... which comes back after this one
            worker.join(timeout=60)                          # a hang guard, not a timing
            handed_back = done.is_set()
        finally:
            threads.leave()
        worker.join()
        assert handed_back
        del calls[:]
        threads.enter()
        try:
            for _ in range(3):
                threads.dot(a, a, np.empty((64, 64)))
        finally:
            threads.leave()
    assert [k for _, k in calls] == [1, 2]


def test_a_call_from_another_thread_with_blas_on_one_thread_does_not_warn(monkeypatch):
    """The README's recipe for threads gives no warning (mutant: warning from one BLAS thread up)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(threads, "_warned_other_thread", False)
    model, X, Y, h0 = make_problem(T=50, B=9, D=28, H=64, O=28)    # products BLAS may thread
    with threadpoolctl.threadpool_limits(1, user_api="blas"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worker = threading.Thread(target=fastbptt.loss_and_grad, args=(model, X, Y, h0))
        worker.start()
        worker.join()
    assert not [w for w in caught if "thread other than the main one" in str(w.message)]


@pytest.mark.filterwarnings("ignore:fastbptt called from a thread other than the main one")
def test_the_main_thread_waits_for_every_other_threads_product_before_changing_the_count(monkeypatch):
    """Two other threads' products run at once with the caller's count; the main thread may change
    it only after both end (mutant: a reader count that is set, not counted, so the first one to
    end lets the main thread change the count under the second)."""
    calls = _record_setters(monkeypatch)
    import threadpoolctl
    a = np.ones((64, 64))                                    # threaded by OpenBLAS, < 2^25 flops
    both_in, changed, seen, real = threading.Barrier(2), threading.Event(), [], np.dot
    main = threading.get_ident()

    def spy(x, y, out=None):
        if threading.get_ident() != main:
            both_in.wait(timeout=60)
            if threading.current_thread().name == "second":  # still running when the first ends
                changed.wait(timeout=2)          # set if the main thread changes the count meanwhile
                seen.append(threads._libs[0].get_num_threads())
        return real(x, y, out=out)

    monkeypatch.setattr(threads.np, "dot", spy)
    setters = threads._setters
    monkeypatch.setattr(threads, "_setters", [lambda k, s=s: (s(k), changed.set()) for s in setters])
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        threads.enter()
        try:
            pool = [threading.Thread(target=threads.dot, args=(a, a, np.empty((64, 64))), name=name)
                    for name in ("first", "second")]
            for t in pool:
                t.start()
            pool[0].join()
            threads.dot(a, a, np.empty((64, 64)))           # the main thread wants one thread
            pool[1].join()
        finally:
            threads.leave()
    assert seen == [2] and calls
