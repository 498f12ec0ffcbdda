"""Command line: ``python -m fastbptt`` profiles fastbptt against the NumPy reference."""

import argparse
import platform
import sys

import numpy as np


def _sizes(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastbptt",
        description="Profile one BPTT training step (forward, cross-entropy, all gradients) of "
                    "fastbptt against the plain NumPy reference over a grid of T and H.")
    parser.add_argument("--T", type=_sizes, default=[10, 100, 1000], metavar="T1,T2,...",
                        help="sequence lengths (default 10,100,1000)")
    parser.add_argument("--H", type=_sizes, default=[16, 64, 256], metavar="H1,H2,...",
                        help="hidden sizes (default 16,64,256)")
    parser.add_argument("--B", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--parallel", action="store_true", help="spread sequences over threads")
    args = parser.parse_args(argv)
    if args.B < 1:
        parser.error(f"--B must be a positive integer, got {args.B}")

    import numba

    from . import __version__
    from .profile import HEADER, format_row, profile_step

    print(f"fastbptt {__version__}, numba {numba.__version__}, numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}, {numba.get_num_threads()} threads")
    print("one step: forward + softmax cross-entropy + all gradients; token inputs, "
          f"vocabulary 28, tanh, {args.dtype}; best of 5\n")
    print(HEADER, flush=True)
    for T in args.T:
        for H in args.H:
            row = profile_step(T, H, B=args.B, dtype=np.dtype(args.dtype), parallel=args.parallel)
            print(format_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
