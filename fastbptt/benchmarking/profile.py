"""Profile fastbptt against the NumPy reference across sequence length T and hidden size H.

One full training step is timed: forward, softmax cross-entropy and every
gradient, on token inputs (a character-level model: D = O = vocabulary size), for
the Elman cell (tanh) or the GRU or LSTM (``--cell``).
"""

import argparse
import platform

import numpy as np

from ..core import reference, reference_cells
from ..core.api import loss_and_grad
from ..core.model import CELLS
from ..core.workspace import Workspace
from . import timing
from .timing import positive_ints  # noqa: F401 (the old place of the flag parser)


def best_time(fn, repeats=5, min_time=0.05):
    """Best wall time of one call of ``fn`` in seconds (``fastbptt.benchmarking.timing.best_time``)."""
    return timing.best_time(fn, repeats=repeats, min_time=min_time)[0]


def profile_step(T, H, B=1, vocab=28, dtype=np.float32, parallel=False, seed=0, cell="rnn"):
    """Time one step of fastbptt and of the reference for one size and cell; check they agree.

    ``cell`` is ``"rnn"`` (Elman, tanh; reference ``fastbptt.reference``), ``"gru"`` or
    ``"lstm"`` (reference ``fastbptt.reference_cells``).

    Returns
    -------
    dict with cell, T, H, B, ``fast_ms``, ``reference_ms``, ``speedup`` and ``max_grad_error``.
    """
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose from {', '.join(CELLS)}")
    rng = np.random.default_rng(seed)
    model = CELLS[cell](vocab, H, vocab, dtype=dtype, seed=seed)
    X = rng.integers(0, vocab, size=(T, B))
    Y = rng.integers(0, vocab, size=(T, B))
    ws = Workspace(model, T, B)
    params = dict(model.params)

    def fast():
        return loss_and_grad(model, X, Y, workspace=ws, parallel=parallel)

    def ref():
        if cell == "rnn":
            return reference.loss_and_grad(params, X, Y, None, model.activation, "cross_entropy")
        return reference_cells.loss_and_grad(params, X, Y, None, cell, "cross_entropy")

    _, grads, _ = fast()
    _, ref_grads, _, _, _ = ref()
    error = max(float(np.max(np.abs(grads[k] - ref_grads[k]))) for k in grads)
    fast_s = best_time(fast)
    ref_s = best_time(ref, repeats=3)
    return {"cell": cell, "T": T, "H": H, "B": B, "fast_ms": fast_s * 1e3, "reference_ms": ref_s * 1e3,
            "speedup": ref_s / fast_s, "max_grad_error": error}


def warm_up(dtype, parallel, cells=("rnn",)):
    """Compile (or load from the cache) the token-input kernels of both methods on a tiny problem, per cell."""
    from ..core import api

    X = np.zeros((3, 2), dtype=np.int64)
    for cell in cells:
        model = CELLS[cell](5, 4, 5, dtype=dtype, seed=0)
        for method in [m for m in getattr(api, "METHODS", ()) if m != "auto"] or [None]:
            options = {} if method is None else {"method": method}
            loss_and_grad(model, X, X, workspace=Workspace(model, 3, 2), parallel=parallel, **options)


HEADER = (f"{'cell':>4} {'T':>6} {'H':>5} {'B':>3} {'fastbptt ms':>12} {'reference ms':>13} {'speedup':>8} "
          f"{'max |Δgrad|':>12}")


def format_row(r):
    """One result of ``profile_step`` as a line of the table under ``HEADER``."""
    return (f"{r.get('cell', 'rnn'):>4} {r['T']:>6} {r['H']:>5} {r['B']:>3} {r['fast_ms']:>12.3f} "
            f"{r['reference_ms']:>13.3f} {r['speedup']:>7.1f}x {r['max_grad_error']:>12.1e}")


def _cells(text):
    """Parse --cell: comma-separated cells (rnn, gru, lstm), or "all"."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if "all" in values:
        values = list(CELLS)
    bad = [v for v in values if v not in CELLS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"unknown cell {bad or text!r}; choose from {', '.join(CELLS)} or all")
    return [c for c in CELLS if c in values]


def build_parser():
    """The command line of ``python -m fastbptt profile``."""
    parser = argparse.ArgumentParser(
        prog="python -m fastbptt profile",
        description="Profile one BPTT training step (forward, cross-entropy, all gradients) of "
                    "fastbptt against the plain NumPy reference over a grid of T and H.")
    parser.add_argument("--T", type=positive_ints, default=[10, 100, 1000], metavar="T1,T2,...",
                        help="sequence lengths (default 10,100,1000)")
    parser.add_argument("--H", type=positive_ints, default=[16, 64, 256], metavar="H1,H2,...",
                        help="hidden sizes (default 16,64,256)")
    parser.add_argument("--B", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--cell", type=_cells, default=["rnn"], metavar="rnn,gru,lstm|all",
                        help="the cells to profile: rnn (Elman, tanh), gru, lstm, or all (default rnn)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="the model's dtype (default float32)")
    parser.add_argument("--parallel", action="store_true",
                        help="call fastbptt with parallel=True (the B sequences spread over Numba's threads)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (on stderr: a bar on a terminal, nothing otherwise) and no "
                             "compilation notice")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.B < 1:
        parser.error(f"--B must be a positive integer, got {args.B}")

    import numba

    from .. import __version__
    from .._progress import Progress, compiling
    from . import _machine

    blas = _machine.blas_libraries()
    extension = _machine.cpu_vector_extension()
    print(f"fastbptt {__version__}, numba {numba.__version__}, numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}, {numba.get_num_threads()} threads")
    print(f"{_machine.describe_blas(blas)}; {_machine.describe_cpu(extension)}")
    for line in _machine.kernel_warnings(blas, extension):
        print(line)
    cells = ", ".join("rnn (tanh)" if c == "rnn" else c for c in args.cell)
    print("one step: forward + softmax cross-entropy + all gradients; token inputs, "
          f"vocabulary 28, {cells}, {args.dtype}; best of 5\n", flush=True)
    with compiling(enabled=not args.no_progress):
        warm_up(np.dtype(args.dtype), args.parallel, args.cell)
    # rows go to stdout as they come; the bar (a terminal only) says which one is being timed
    progress = Progress(len(args.cell) * len(args.T) * len(args.H), enabled=not args.no_progress, lines=False)
    progress.write(HEADER)
    try:
        for cell in args.cell:
            for T in args.T:
                for H in args.H:
                    progress.step(f"{cell} T={T} H={H}")
                    row = profile_step(T, H, B=args.B, dtype=np.dtype(args.dtype), parallel=args.parallel,
                                       cell=cell)
                    progress.write(format_row(row))
    finally:
        progress.close()
    return 0
