"""Fixtures of the benchmark suite: the machine's GEMM peak, problems and float64 oracles, cached.

Run with ``pytest bench/ --benchmark-only`` (see bench/test_bench_step.py).
"""

import functools

import numpy as np
import pytest

from fastbptt import compare
from fastbptt.benchmark import build, gemm_peak


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
    For a Config with lengths see ``problem_with_lengths``.
    """
    model, X, Y, lengths, expected, _ = problem_with_lengths(config)
    return model, X, Y, expected


@functools.lru_cache(maxsize=2)
def problem_with_lengths(config):
    """(model, X, Y, lengths, oracle, full oracle) of a Config (``fastbptt.benchmark.build``).

    ``lengths`` is None at full lengths; the oracle uses the lengths, the full oracle (for
    ``fastbptt-full``) runs every sequence to T: the same as the oracle without lengths.
    """
    model, X, Y, lengths = build(config)
    expected = compare.oracle(model, X, Y, lengths)
    full = expected if lengths is None else compare.oracle(model, X, Y)
    return model, X, Y, lengths, expected, full
