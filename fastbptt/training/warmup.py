"""``python -m fastbptt warmup``: compile every kernel ahead of time, into Numba's on-disk cache.

fastbptt's kernels are compiled by Numba on first use and cached on disk (``cache=True``),
so only a process that finds the cache empty pays for compiling (seconds per cell);
later processes load the compiled code. This command fills the cache up front, by running
tiny problems through the public API along every path a user can reach (``warm_cell``):
each cell (Elman RNN, GRU, LSTM) × float32/float64 × one layer and stacks, one direction
and both, dropout, with and without biases × token ids and dense inputs × full lengths and
``lengths=`` × cross-entropy and mean squared error, with and without loss weights, carry
weights, initial states and their gradients, ∂L/∂X × ``loss_and_grad``, ``forward``/
``backward`` and the layer alone (``layer_forward``/``layer_backward``) × the ``fused`` and
``blas`` methods × ``parallel`` False and True × batches of one and of several sequences
(whose per-step arrays Numba types differently) × the caller's arrays writable and
read-only (typed apart too); then clipping, random truncation and every optimizer.

The kernels are not listed here: ``kernels()`` finds every Numba dispatcher that
fastbptt's core and training packages define, and ``warmup`` fails (exit status 1) if any
of them is left uncompiled, or uncached, after the runs above; a new kernel that no path
reaches is caught by the tests rather than by the first user who calls it.

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
import contextlib
import importlib
import pkgutil
import sys
import time
import warnings

import numba
import numpy as np
from numba.core.caching import NullCache
from numba.core.dispatcher import Dispatcher

from .. import core as _core_package
from .. import training as _training_package
from ..core import api
from ..core.kernels import sweep
from ..core.model import CELLS
from ..core.workspace import Workspace
from . import optim, tbptt

PROG = "python -m fastbptt warmup"
DTYPES = ("float32", "float64")
#: The packages whose modules hold fastbptt's compiled code (walked, not listed module by module).
KERNEL_PACKAGES = (_core_package, _training_package)


def kernels():
    """Every Numba dispatcher (``@njit`` function) defined in fastbptt's core and training packages.

    Found by importing each of their modules and looking at what it defines, so a kernel added
    anywhere there is on the list without anyone listing it. Sorted by module and name.
    """
    found = {}
    for package in KERNEL_PACKAGES:
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if isinstance(value, Dispatcher) and value.py_func.__module__ == info.name:
                    found[id(value)] = value
    return sorted(found.values(), key=kernel_name)


def kernel_name(kernel):
    """``module.function`` of a dispatcher."""
    return f"{kernel.py_func.__module__}.{kernel.py_func.__qualname__}"


def is_inlined(kernel):
    """Whether ``kernel`` is inlined into its callers (``inline="always"``): compiled, and cached, with them."""
    return kernel.targetoptions.get("inline") == "always"


def is_cached(kernel):
    """Whether ``kernel`` keeps its compiled code in Numba's on-disk cache (``cache=True``)."""
    return not isinstance(kernel._cache, NullCache)


#: Kernels that no path of the API calls (public for the tests and for callers of the kernels
#: themselves, whose argument types warmup cannot know): left to compile on first use.
NOT_CALLED_BY_THE_API = frozenset({"fastbptt.core.kernels.sweep.scale_rows"})


def unreached(found=None):
    """What warmup has not covered in this process: ``(name, why)`` for every kernel that would be
    compiled again by each process (neither cached nor inlined) or that was not compiled here
    (no call of warmup reaches it). Empty after a complete warmup."""
    problems = []
    for kernel in kernels() if found is None else found:
        if is_inlined(kernel) or kernel_name(kernel) in NOT_CALLED_BY_THE_API:
            continue
        if not is_cached(kernel):
            problems.append((kernel_name(kernel), "not cached (cache=True): every process compiles it again"))
        elif not kernel.overloads:
            problems.append((kernel_name(kernel), "no call of warmup reached it"))
    return problems


def _frozen(a):
    """A read-only copy of ``a`` (or of each array of a pair): Numba types read-only arrays apart."""
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(_frozen(x) for x in a)
    a = np.array(a)
    a.flags.writeable = False
    return a


# the model structures of every path: (layers, bidirectional, dropout, bias)
_STRUCTURES = ((1, False, 0.0, True), (2, False, 0.5, True), (1, True, 0.0, True), (2, True, 0.5, True),
               (1, False, 0.0, False), (2, True, 0.5, False))


def warm_cell(cell, dtype):
    """Run tiny problems of ``cell`` (a key of ``fastbptt.CELLS``) in ``dtype`` along every path.

    Every feature the API has, each with the others: one layer and stacks, one direction and
    both, dropout between layers, with and without biases; token ids and dense inputs; full
    lengths and ``lengths=`` (sorted, and the per-step and packed products that long batches get
    from ``api.PACKED_MIN_FLOPS`` on, forced here at tiny sizes); cross-entropy and mean squared error, with and
    without ``loss_weights``; carry weights; initial states and their gradients (``return_dh0``)
    and ∂L/∂X (``return_dX``); ``forward``/``backward`` and ``layer_forward``/``layer_backward``
    with ∂L/∂(last state); the ``fused`` and ``blas`` methods, ``parallel`` False and True;
    batches of one and of several sequences (whose per-step arrays Numba types differently);
    each of the caller's arrays writable and read-only (typed apart too). Each kernel is
    compiled (or loaded from the cache) for the argument types the API gives it. Sizes are
    small but not 1: H > 1 and G·H > 1, so the per-step arrays have the layouts of real problems.
    """
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    dtype = np.dtype(dtype)
    if dtype.name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype.name!r}")
    T, D, H, O = 3, 3, 4, 3
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        # parallel=True without threadpoolctl warns; here it only compiles
        warnings.simplefilter("ignore", RuntimeWarning)
        for layers, bidirectional, dropout, bias in _STRUCTURES:
            model = CELLS[cell](D, H, O, dtype=dtype, seed=0, bias=bias, num_layers=layers,
                                bidirectional=bidirectional, dropout=dropout)
            for B in (1, 2):        # B = 1: the per-step BLAS arrays are C-contiguous, else F
                _warm_model(model, T, B, rng)
            model.eval()            # dropout off: the masks are not drawn
            _warm_model(model, T, 2, rng, frozen_too=False)
            model.train()


@contextlib.contextmanager
def _packed_products(on):
    """With ``on``, the products of calls with ``lengths=`` take their packed path (one product per
    step over the active rows, the weight gradients over the packed rows) at any size, as they do
    from ``api.PACKED_MIN_FLOPS`` on: that path has kernels of its own."""
    saved = api.PACKED_MIN_FLOPS
    api.PACKED_MIN_FLOPS = 0 if on else saved
    try:
        yield
    finally:
        api.PACKED_MIN_FLOPS = saved


def _warm_model(model, T, B, rng, frozen_too=True):
    dtype, D, H, O = model.dtype, model.input_size, model.hidden_size, model.output_size
    dirs = 2 if model.bidirectional else 1
    states = model.num_layers * dirs
    ws = Workspace(model, T, B)
    h0 = rng.normal(size=(states, B, H) if states > 1 else (B, H)).astype(dtype)
    h0 = (h0, h0.copy()) if model.cell == "lstm" else h0
    arrays = {
        "tokens": rng.integers(0, D, (T, B)),
        "dense": rng.normal(size=(T, B, D)).astype(dtype),
        "labels": rng.integers(0, O, (T, B)),
        "targets": rng.normal(size=(T, B, O)).astype(dtype),
        "weights": rng.random((T, B)).astype(dtype),
        "carry": None if model.bidirectional else np.ones((T, B), dtype),
        "carry1": None if model.bidirectional else np.ones(T, dtype),
        "h0": h0,
        "dO": np.ones((T, B, O), dtype),
        "dH": np.ones((T, B, dirs * H), dtype),
        "dstate": h0,
    }
    lengths = np.arange(T, T - B, -1)[::-1].copy() if B > 1 else np.array([T - 1])
    for frozen in (False, True) if frozen_too else (False,):
        a = {k: _frozen(v) for k, v in arrays.items()} if frozen else arrays
        # parallel=True runs the fused sweep's and the losses' parallel kernels; the blas method's
        # steps are serial whatever it says, and its losses are those of the fused method's
        for method, parallel in (("fused", False), ("fused", True), ("blas", False)):
            run = {"workspace": ws, "parallel": parallel, "method": method}
            for lens, packed in ((None, False), (lengths, False), (lengths, True)):
                with _packed_products(packed):
                    for X in (a["tokens"], a["dense"]):
                        dense = X.ndim == 3
                        api.loss_and_grad(model, X, a["labels"], a["h0"], lengths=lens, return_dh0=True,
                                          return_dX=dense, carry=a["carry"], **run)
                        api.loss_and_grad(model, X, a["labels"], lengths=lens, loss_weights=a["weights"],
                                          carry=a["carry1"], **run)
                        api.loss_and_grad(model, X, a["targets"], a["h0"], "mse", lengths=lens, **run)
                        api.loss_and_grad(model, X, a["targets"], loss="mse", lengths=lens,
                                          loss_weights=a["weights"], **run)
                        api.forward(model, X, a["h0"], lengths=lens, **run)
                        api.backward(model, a["dO"], return_dh0=True, return_dX=dense, carry=a["carry"],
                                     **run)
                        api.layer_forward(model, X, a["h0"], lengths=lens, **run)
                        api.layer_backward(model, a["dH"], a["dstate"], return_dX=dense, carry=a["carry1"],
                                           **run)
                        api.layer_forward(model, X, lengths=lens, **run)
                        api.layer_backward(model, a["dH"], return_dX=dense, **run)


def warm_optim(dtype):
    """Compile clipping, the gradient norm, random truncation and every optimizer's update for ``dtype``."""
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
    else:
        # float32 squares never underflow the float64 sum: the rescaled sum is float64's alone, but
        # compiled here too so that the check of every kernel holds whatever --dtype warms
        optim._sum_squares_scaled(grad, dtype.type(1))
    grad[...] = 0.0
    for name in optim.OPTIMIZERS:
        optim.make_optimizer(name, model, 0.1).step(grad)
    rng = np.random.default_rng(0)
    tbptt.random_truncation(3, 0.5, rng, dtype=dtype)
    tbptt.random_truncation(3, 0.5, rng, B=2, dtype=dtype)


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

    Raises
    ------
    RuntimeError
        If a kernel of ``kernels()`` is left uncompiled (no path of ``warm_cell`` or ``warm_optim``
        reaches it) or is not cached: what warmup promises would not hold.
    """
    cells = list(CELLS) if cells is None else list(dict.fromkeys(cells))
    dtypes = list(DTYPES) if dtypes is None else list(dict.fromkeys(dtypes))
    for cell in cells:
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    found = kernels()
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
    problems = unreached(found)
    if problems:
        raise RuntimeError("warmup left kernels to compile later (a fastbptt bug: warm_cell must drive the "
                           "feature that uses each): " + "; ".join(f"{n} ({why})" for n, why in problems))
    return seconds


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compile every fastbptt kernel a program can reach (each cell and dtype; stacks, both "
                    "directions, dropout, lengths, token and dense inputs, both losses with and without "
                    "weights, carry weights, state and input gradients, each method and parallel setting; "
                    "clipping and the optimizers) into Numba's on-disk cache, so that later processes "
                    "start in well under a second. Fails (exit status 1) if any kernel is left to compile.",
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
    """Run the command; returns the exit status (0 done, 1 a kernel left uncompiled, 2 bad arguments)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:               # --help (0) or an argparse error (2), already printed
        return int(exc.code or 0)
    log = None if args.quiet else print
    try:
        seconds = warmup(args.cell, args.dtype, log=log)
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if log is not None:
        compiled = sum(len(k.overloads) for k in kernels())
        log(f"total      {sum(seconds.values()):7.1f} s; {compiled} compiled kernels; "
            f"cache: {cache_location() or 'unknown'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
