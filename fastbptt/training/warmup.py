"""``python -m fastbptt warmup``: compile every kernel ahead of time, into Numba's on-disk cache.

fastbptt's kernels are compiled by Numba on first use and cached on disk (``cache=True``),
so only a process that finds the cache empty pays for compiling (seconds per cell);
later processes load the compiled code. This command fills the cache up front, by running
tiny problems through the public API along every path a user can reach: each cell (Elman
RNN, GRU, LSTM) × float32/float64 × token ids and dense inputs × the ``fused`` and
``blas`` methods (batches of one and of several sequences, whose per-step arrays Numba
types differently) × ``parallel`` False and True × cross-entropy, mean squared error
(writable and read-only targets) and a caller's ∂L/∂o (``forward``/``backward``), the
layer alone (``layer_forward``/``layer_backward``), plus clipping and every optimizer.

Where the cache goes is Numba's choice: ``__pycache__`` beside fastbptt's sources when
that is writable, else a per-user folder; ``NUMBA_CACHE_DIR`` overrides both. For a
container image or a read-only install, run it once at build time with
``NUMBA_CACHE_DIR`` set to a writable path that the users' processes also get::

    ENV NUMBA_CACHE_DIR=/opt/numba-cache
    RUN python -m fastbptt warmup

The cache is specific to the CPU it was compiled on (Numba keys it on the machine) and to
the exact fastbptt and Numba versions: build the image's cache on the kind of CPU it
will run on, and warm up again after an upgrade.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numba
import numpy as np

from ..core import api
from ..core.kernels import sweep
from ..core.model import CELLS
from ..core.workspace import Workspace
from . import optim

PROG = "python -m fastbptt warmup"
DTYPES = ("float32", "float64")


def warm_cell(cell, dtype):
    """Run tiny problems of ``cell`` (a key of ``fastbptt.CELLS``) in ``dtype`` along every path.

    Each kernel is compiled (or loaded from the cache) for the argument types the API
    gives it. Sizes are small but not 1: H > 1 and G·H > 1, so the per-step arrays have
    the layouts of real problems.
    """
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    dtype = np.dtype(dtype)
    if dtype.name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype.name!r}")
    T, D, H, O = 3, 3, 4, 3
    model = CELLS[cell](D, H, O, dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        # parallel=True without threadpoolctl warns; here it only compiles
        warnings.simplefilter("ignore", RuntimeWarning)
        for B in (1, 2):        # B = 1: the per-step BLAS arrays are C-contiguous, else F
            ws = Workspace(model, T, B)
            tokens = rng.integers(0, D, (T, B))
            dense = rng.normal(size=(T, B, D)).astype(dtype)
            labels = rng.integers(0, O, (T, B))
            targets = rng.normal(size=(T, B, O)).astype(dtype)
            frozen = targets.copy()
            frozen.flags.writeable = False        # read-only targets are typed apart
            for X in (tokens, dense):
                for method in ("fused", "blas"):
                    for parallel in (False, True):
                        run = {"workspace": ws, "parallel": parallel, "method": method}
                        for loss, Y in (("cross_entropy", labels), ("mse", targets), ("mse", frozen)):
                            api.loss_and_grad(model, X, Y, loss=loss, **run)
                        O_, _ = api.forward(model, X, **run)
                        api.backward(model, np.ones_like(O_), **run)
                        H_, _ = api.layer_forward(model, X, **run)
                        api.layer_backward(model, np.ones_like(H_), **run)


def warm_optim(dtype):
    """Compile clipping, the gradient norm and every optimizer's update for ``dtype``."""
    dtype = np.dtype(dtype)
    model = CELLS["rnn"](1, 2, 1, dtype=dtype)
    grad = np.ones(model.n_params, dtype)
    optim.grad_norm(grad)
    optim.clip_grad_norm(grad, 0.5)
    optim.clip_grad_value(grad, 0.25)
    grad[0] = np.inf                               # an Inf element: max |g| is looked for
    optim.clip_grad_norm(grad, 0.5)
    if dtype == np.float64:
        grad[...] = 1e-200                         # a sum of squares that underflows: rescaled
        optim.clip_grad_norm(grad, 0.5)
    grad[...] = 0.0
    for name in optim.OPTIMIZERS:
        optim.make_optimizer(name, model, 0.1).step(grad)


def cache_location():
    """Where Numba keeps the compiled kernels: ``NUMBA_CACHE_DIR`` when set, else the folder of the
    sweep kernels' cache (the others lie beside their own modules); None if Numba does not say."""
    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR
    stats = getattr(sweep.recurrence, "stats", None)
    return getattr(stats, "cache_path", None)


def warmup(cells=None, dtypes=None, log=print):
    """Compile every kernel for ``cells`` and ``dtypes`` (default: all); return the seconds per cell.

    Parameters
    ----------
    cells : list of str, optional
        Keys of ``fastbptt.CELLS`` ("rnn", "gru", "lstm").
    dtypes : list of str, optional
        "float32", "float64".
    log : callable or None
        Gets one line per cell (and one for the optimizers) as each finishes.

    Returns
    -------
    dict
        Seconds taken, by cell name, and ``"optim"`` for clipping and the optimizers.
    """
    cells = list(CELLS) if cells is None else list(dict.fromkeys(cells))
    dtypes = list(DTYPES) if dtypes is None else list(dict.fromkeys(dtypes))
    for cell in cells:
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    seconds = {}
    what = ", ".join(dtypes)
    for name in cells + ["optim"]:
        start = time.perf_counter()
        for dtype in dtypes:
            if name == "optim":
                warm_optim(dtype)
            else:
                warm_cell(name, dtype)
        seconds[name] = time.perf_counter() - start
        if log is not None:
            label = "optimizers" if name == "optim" else name
            log(f"{label:<10} {seconds[name]:7.1f} s  ({what})")
    return seconds


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compile every fastbptt kernel a program can reach (each cell, dtype, input kind, "
                    "method, parallel setting and loss, clipping and the optimizers) into Numba's "
                    "on-disk cache, so that later processes start in well under a second.",
        epilog="The cache goes where Numba puts it: __pycache__ beside fastbptt's sources if writable, "
               "else a per-user folder, or NUMBA_CACHE_DIR when set. For images and read-only installs, "
               "run this once at build time with NUMBA_CACHE_DIR set to a writable path that the "
               "users' processes also get, on the kind of CPU they will run on.")
    p.add_argument("--cell", action="append", choices=tuple(CELLS),
                   help="a cell to compile (repeat for several; default: all)")
    p.add_argument("--dtype", action="append", choices=DTYPES,
                   help="a dtype to compile (repeat for both; default: both)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    return p


def main(argv=None):
    """Run the command; returns the exit status (0 done, 2 bad arguments)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:               # --help (0) or an argparse error (2), already printed
        return int(exc.code or 0)
    log = None if args.quiet else print
    seconds = warmup(args.cell, args.dtype, log=log)
    if log is not None:
        log(f"total      {sum(seconds.values()):7.1f} s; cache: {cache_location() or 'unknown'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
