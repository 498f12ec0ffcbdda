"""Threads: how many BLAS threads each product gets, and when Numba's threads may run.

**BLAS threads by size.** A threaded GEMM splits its work between the calling thread
and BLAS's worker threads and then waits for them. On a busy machine a worker may
wait several milliseconds for a core, so a product that takes 0.1 ms on one thread can
take 8 ms on two. Every product of a step is therefore run through ``dot``, which gives
it BLAS's threads only when it is big enough to pay for them (at least
``PARALLEL_BLAS_MIN_FLOPS`` floating-point operations) and one thread otherwise.

The choice depends on the product's shape alone, never on ``parallel=`` nor on what
other threads do, so the bits of a result do not either (some BLAS kernels, such as
OpenBLAS's Haswell GEMM, split long reductions between threads and round differently
with one thread than with two).

The thread count is process-wide state in BLAS, and OpenBLAS ignores changes made
from any thread but the main one once its pool runs. So only the main thread changes
it: a call reads the caller's setting, runs each product under one lock with the count
its size asks for, and puts the setting back as it leaves. Calls from other Python
threads (the compiled kernels release the GIL, so they run at once on separate
workspaces) run their products, under the same lock, with the caller's setting: never
with a count the main thread chose for one of its own products, but not with the
size-based one either. Limit BLAS to one thread (``threadpoolctl.threadpool_limits(1)``
or ``OPENBLAS_NUM_THREADS=1``) when you train in several threads: every product then
runs on one thread wherever it is called, and the bits agree everywhere.

threadpoolctl is a dependency of fastbptt. Without it (an install that lacks it) BLAS keeps its own
setting for every product: results are still deterministic, but small products may
use several threads and slow down on a busy machine.

**Numba's threads.** ``parallel=True`` runs the fused kernels on Numba's thread pool.
Launches go through ``parallel_launch`` (one at a time, since Numba's ``workqueue``
layer aborts when two threads launch at once), and a process forked after the pool
started (``multiprocessing``'s ``fork`` start method) runs the serial kernels instead:
GNU OpenMP's pool does not survive a fork and the child would hang. The serial
kernels give bitwise the same results, so this changes speed only.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

import numpy as np

#: Products with fewer floating-point operations than this run on one BLAS thread.
#: About 3.4e7, a third of a millisecond on one core: the smallest products whose second
#: thread still paid for itself with the other core busy, in side-by-side timings of
#: 2^24, 2^25 and 2^28 on a 2-core machine (2^24 would thread the 70 per-step products of
#: a T = 35, B = 32, H = 512 step, 2^28 its weight gradients' neighbours too). Part of
#: what decides the bits of a result: change it before the first call, not between calls
#: you compare.
PARALLEL_BLAS_MIN_FLOPS = 2 ** 25

_mutex = threading.Lock()            # guards everything below and every product run under it
_lock = threading.Condition(_mutex)  # ... and signals when the caller's count is back
_libs = None                         # threadpoolctl's BLAS controllers; [] without threadpoolctl
_saved = ()                          # the caller's thread count of each library, read as a call starts
_current = ()                        # the count each library has now
_one = ()                            # one thread for every library
_getters = _setters = ()             # each library's get/set of its thread count
_GEMM_ONE = _GEMV_ONE = 0            # below these sizes BLAS runs a product on one thread anyway
_waiting = 0                         # other threads' products waiting for the caller's count back
_readers = 0                         # other threads' products running now (with the caller's count)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _internal_dirs():
    """The folders whose frames a warning walks out of: fastbptt's, and PyTorch's once it is imported
    (``fastbptt.torch`` runs the core from ``torch.autograd.Function`` and ``nn.Module.__call__``)."""
    dirs = [_PACKAGE_DIR]
    torch = sys.modules.get("torch")
    path = getattr(torch, "__file__", None)
    if path:
        dirs.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(dirs)


def caller_stacklevel():
    """The ``stacklevel`` for ``warnings.warn`` that points at the first caller outside fastbptt
    (and outside PyTorch, whose frames lie between a ``fastbptt.torch`` module and its caller).

    Counted, not fixed, so the warning points at the user's line however deep the call
    (``loss_and_grad`` or ``layer_forward``, through the training tools, a ``fastbptt.torch``
    module's forward or its backward run by ``loss.backward()``). ``warnings.warn``'s
    ``skip_file_prefixes`` would do this from Python 3.12 on; fastbptt supports 3.10.
    """
    internal = _internal_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


_main = threading.main_thread().ident
_get_ident = threading.get_ident


def _is_main():
    return _get_ident() == _main


def _blas_libs():
    """threadpoolctl's BLAS controllers (found once), with what ``dot`` needs of them."""
    global _libs, _one, _getters, _setters, _GEMM_ONE, _GEMV_ONE
    if _libs is not None:
        return _libs
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        _libs = []
        return _libs
    libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    _one = (1,) * len(libs)
    _getters = [_direct(lib, "openblas_get_num_threads", lib.get_num_threads) for lib in libs]
    _setters = [_direct(lib, "openblas_set_num_threads", lib.set_num_threads) for lib in libs]
    if libs and all(lib.internal_api == "openblas" for lib in libs):
        # OpenBLAS runs a GEMM of M·N·K < 65536·t and a GEMV of M·N < 2304·t on one thread,
        # whatever its setting (interface/gemm.c, gemv.c; t = GEMM_MULTITHREAD_THRESHOLD, 4 by
        # default and in NumPy's own build, possibly lower elsewhere): such products need no
        # change of the setting, which costs microseconds each way
        t = 4 if all(lib.prefix.startswith("libscipy_openblas") for lib in libs) else 1
        _GEMM_ONE, _GEMV_ONE = 65536 * t, 2304 * t
    _libs = libs
    return _libs


def _direct(lib, name, public):
    """OpenBLAS's own C function behind threadpoolctl's ``public`` method (which looks its symbol
    up on every call: 1.9 µs against 0.3), or ``public`` itself for other libraries."""
    try:
        if lib.internal_api == "openblas":
            return getattr(lib.dynlib, lib._get_symbol(name))
    except Exception:   # another threadpoolctl: its private helper moved
        pass
    return public


def available():
    """Whether BLAS's threads can be set per product (threadpoolctl is installed and found BLAS)."""
    return bool(_blas_libs())


_warned_uncontrolled = False


def warn_if_uncontrolled():
    """Warn once that BLAS's threads cannot be set per product (no threadpoolctl)."""
    global _warned_uncontrolled
    if not _blas_libs() and not _warned_uncontrolled:
        _warned_uncontrolled = True
        warnings.warn("parallel=True without threadpoolctl: BLAS chooses its own threads for every "
                      "product and may fight Numba's for the cores; pip install threadpoolctl "
                      "(or set OPENBLAS_NUM_THREADS=1)", RuntimeWarning, stacklevel=caller_stacklevel())


def enter():
    """Start a call that runs products through ``dot``; pair with ``leave()`` (try/finally).

    Only the main thread changes BLAS's thread count: OpenBLAS ignores changes made from
    other threads once its thread pool runs.
    """
    global _saved, _current
    if _blas_libs() and _is_main():
        with _lock:
            _saved = _current = tuple(get() for get in _getters)


def _set(want):
    global _current
    for set_threads, k in zip(_setters, want):
        set_threads(k)
    _current = want


def leave():
    """End a call begun with ``enter()``: the main thread puts back the caller's BLAS threads."""
    if _libs and _is_main():
        with _lock:
            if _current != _saved:
                _set(_saved)
                _lock.notify_all()


def dot(a, b, out):
    """``np.dot(a, b, out=out)`` on as many BLAS threads as its size pays for (see the module).

    Must be called between ``enter()`` and ``leave()``. a (M, K) or (K,), b (K, N), out (M, N) or (N,).
    On the main thread the product runs with the count its size asks for; on any other thread
    (which cannot change it) with the caller's setting, never with a count the main thread set
    for one of its own products. Other threads' products run at once; the main thread changes
    the count only while none of them runs.
    """
    global _waiting, _readers
    if not _libs or _one_thread_anyway(a, b):
        np.dot(a, b, out=out)
        return
    if _get_ident() == _main:
        want = _saved if 2 * a.size * b.shape[-1] >= PARALLEL_BLAS_MIN_FLOPS else _one
        with _mutex:
            if want is not _current and want != _current:
                _lock.wait_for(lambda: _readers == 0)
                _set(want)
            np.dot(a, b, out=out)
            if _waiting and _current != _saved:      # another thread waits for the caller's count
                _set(_saved)
                _lock.notify_all()
        return
    _warn_other_thread()
    with _lock:
        _waiting += 1
        try:
            _lock.wait_for(lambda: _current == _saved)
        finally:
            _waiting -= 1
        _readers += 1
    try:
        np.dot(a, b, out=out)
    finally:
        with _lock:
            _readers -= 1
            if _readers == 0:
                _lock.notify_all()


def _one_thread_anyway(a, b):
    """Whether BLAS runs ``np.dot(a, b)`` on one thread whatever its setting. NumPy calls GEMV
    when an operand is a vector or has a dimension of 1, GEMM otherwise."""
    if a.ndim == 1 or b.ndim == 1 or 1 in a.shape or 1 in b.shape:
        return max(a.size, b.size) < _GEMV_ONE
    return a.size * b.shape[1] < _GEMM_ONE


_warned_other_thread = False


def _warn_other_thread():
    global _warned_other_thread
    if _warned_other_thread:
        return
    n = max(get() for get in _getters)
    if n > 1:
        _warned_other_thread = True
        warnings.warn(f"fastbptt called from a thread other than the main one while BLAS uses "
                      f"{n} threads: OpenBLAS ignores thread-count changes from other "
                      f"threads, so every product runs on all of them and threads that compute at "
                      f"once can be many times slower. Limit BLAS to one thread on the main thread "
                      f"before starting the threads (threadpoolctl.threadpool_limits(1), or "
                      f"OPENBLAS_NUM_THREADS=1).", RuntimeWarning, stacklevel=caller_stacklevel())


# ------------------------------------------------------------------------ Numba's threads

# GNU OpenMP (Numba's "omp" layer) keeps its workers spinning after every parallel region, up
# to GOMP_SPINCOUNT pauses: 300,000 by default, about 17 ms on a Skylake-X. A BLAS product
# right after a parallel sweep then waits for the core a spinning worker holds (a T = 200,
# B = 8, H = 128 step took 16 ms with parallel=True against 7.5 without). 10,000 keeps the
# workers warm for microseconds, then lets them sleep. Read when libgomp starts its pool, so
# it only applies if no parallel region ran before fastbptt was imported; yours is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

_launch_lock = threading.Lock()
_forked_child = False                # a child forked after a fork-unsafe Numba pool started


def _after_fork_in_child():
    global _forked_child, _launch_lock, _mutex, _lock, _waiting, _readers, _main
    # locks held by other threads at the fork would stay held in the child: new ones
    _launch_lock = threading.Lock()
    _mutex = threading.Lock()
    _lock = threading.Condition(_mutex)
    _waiting = _readers = 0
    _main = threading.main_thread().ident
    if not _fork_safe_layer():      # a fork-unsafe pool was started, by fastbptt or by anyone
        _forked_child = True


def _fork_safe_layer():
    try:
        import numba
        return numba.threading_layer() in ("tbb", "workqueue")
    except ValueError:               # no layer loaded yet
        return True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def parallel_allowed():
    """False in a process forked after its parent started a fork-unsafe Numba thread pool."""
    if _forked_child:
        _warn_forked()
    return not _forked_child


_warned = False


def _warn_forked():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("parallel=True runs the serial kernels (same results) in this process: it was "
                      "forked after its parent started Numba's OpenMP threads, which do not survive a "
                      "fork. Use multiprocessing's 'spawn' or 'forkserver' start method to run in "
                      "parallel in the children.", RuntimeWarning, stacklevel=caller_stacklevel())


def parallel_launch():
    """A context manager around one launch of a ``parallel=True`` kernel."""
    return _launch_lock
