"""Keep Numba's threads and BLAS's threads off each other's cores.

With ``parallel=True`` the fused kernels run on Numba's threads, and the GEMMs
between them would run on BLAS's own threads. Both kinds spin for a while after
their work is done, so on a small machine they take turns preempting each other;
a step can get several times slower than the serial one. During a parallel step
``blas_single_threaded()`` therefore limits BLAS to one thread (the caller's own),
through threadpoolctl when it is installed (``pip install fastbptt[parallel]``).
Without threadpoolctl nothing is limited and a warning says so, once.
"""

import contextlib
import warnings

_controller = None


def _blas_controller():
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
            warnings.warn("parallel=True without threadpoolctl: BLAS keeps its own threads and "
                          "may fight Numba's for the cores; pip install threadpoolctl "
                          "(or set OPENBLAS_NUM_THREADS=1)", RuntimeWarning, stacklevel=4)
        else:
            _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def blas_single_threaded():
    """A context manager in which BLAS uses one thread (a no-op without threadpoolctl)."""
    controller = _blas_controller()
    if not controller:
        return contextlib.nullcontext()
    return controller.limit(limits=1)
