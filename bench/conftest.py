"""Fixtures of the benchmark suite: the machine's GEMM peak, problems and float64 oracles, cached.

Run with ``pytest bench/ --benchmark-only`` (see bench/test_bench_step.py).
"""

import functools

import numpy as np
import pytest

from fastbptt import compare
from fastbptt.benchmark import gemm_peak


def pytest_addoption(parser):
    parser.addoption("--fastbptt-methods", default="", metavar="NAME,...",
                     help="also time fastbptt with loss_and_grad(method=NAME) for each NAME "
                          "(e.g. fused,blas), on every configuration but the H = 1760 ones")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: the H = 1760 configurations (seconds per step)")


@pytest.fixture(scope="session")
def peak_gflops():
    """GFLOP/s of NumPy's GEMM at n = 2048, by dtype name, measured once per session.

    Measured when the first case starts, before any implementation has started a thread pool.
    """
    peaks = {name: gemm_peak(np.dtype(name), n=2048) for name in ("float32", "float64")}
    return lambda dtype: peaks[np.dtype(dtype).name]


@functools.lru_cache(maxsize=2)
def problem(config):
    """(model, X, Y, oracle) of a Config: the batch and the float64 reference's (loss, grads).

    The suite runs every implementation of one configuration in a row, so two entries suffice.
    """
    dtype = np.dtype(config.dtype)
    model, X, Y = compare.make_problem(config.T, config.B, config.D, config.H, config.O,
                                       dtype=dtype, activation=config.activation, cell=config.cell)
    return model, X, Y, compare.oracle(model, X, Y)
