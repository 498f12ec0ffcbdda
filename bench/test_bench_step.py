"""One BPTT training step in fastbptt, the NumPy reference, PyTorch and JAX: ``pytest bench/ --benchmark-only``.

A step is forward over T steps, softmax cross-entropy averaged over the T·B positions,
and the gradient of every parameter, from h_0 = 0, on dense inputs of size D with a
linear readout of size O and biases (``fastbptt.compare`` builds each implementation
from the same weights and batch), for each cell: the Elman RNN (``rnn``), the GRU and
the LSTM (``torch.nn.GRU``/``nn.LSTM`` and a ``lax.scan`` of the same equations). Every case

1. builds its step and calls it once untimed: that compiles (Numba, XLA) and its result
   is checked against the reference run in float64 (loss and every gradient);
2. times the step; gradients are overwritten (fastbptt, JAX) or set to None (PyTorch)
   in every call, never accumulated across rounds;
3. records in ``extra_info`` the flop count (``compare.FLOP_FORMULA``), GFLOP/s at the
   best and the median time, and their fraction of the session's measured GEMM peak.

Cases of one configuration share a benchmark group, so pytest-benchmark prints them side
by side. PyTorch and JAX cases are skipped when the package is missing. Case ids end
in the Elman activation (``tanh``, ``relu``, ``identity``) or the cell (``gru``, ``lstm``).
Select with -k, e.g. ``-k "sizes and not reference"``, ``-k H64``, ``-k "cells and lstm"``,
``-k "not gru and not lstm"`` (the Elman cell alone), ``-m "not large"`` (skips H = 1760);
``--fastbptt-methods fused,blas`` adds fastbptt with each ``method=`` of loss_and_grad.
"""

import time

import pytest
from conftest import problem

from fastbptt import compare
from fastbptt.benchmark import CELL_SIZES, SIZES, Config

LARGE_FLOPS = 5e10        # slower than about half a second a step: few rounds


def _configs():
    """(Config, tag) pairs: the eight training shapes, sweeps of T, H and B, float64, the cells' shapes.

    Each shape in each cell (the Elman cell first, then the GRU and the LSTM); the relu and
    identity rows are the Elman cell's alone.
    """
    def cells(tag, *shape, **kw):
        return [(Config(*shape, **kw), tag)] + [(Config(*shape, **kw, activation=None, cell=c), tag)
                                                for c in ("gru", "lstm")]

    out = [c for shape in SIZES for c in cells("sizes", *shape)]
    for T in (10, 100):                                       # T sweep (T = 1000 is one of the sizes)
        out += cells("sweepT", T, 1, 28, 64, 28)
    for H in (16, 64, 256, 1024):                             # H sweep
        out += cells("sweepH", 100, 8, 28, H, 28)
    for B in (1, 32):                                         # B sweep (B = 8 is in the H sweep)
        out += cells("sweepB", 100, B, 28, 128, 28)
    for shape in ((35, 1, 28, 256, 28), (1000, 1, 28, 64, 28), (200, 8, 64, 128, 64)):
        out += cells("float64", *shape, dtype="float64")
        out.append((Config(*shape, activation="relu"), "relu"))
    out.append((Config(200, 8, 64, 128, 64, activation="identity"), "identity"))
    for shape in CELL_SIZES:                                  # the shapes of bench --cell all
        out += cells("cells", *shape)
    return out


def _cases(methods=()):
    """Every (config, implementation) case, one configuration after another, fastbptt first."""
    cases = []
    for config, tag in _configs():
        cid = (f"{tag}-T{config.T}-B{config.B}-D{config.D}-H{config.H}-O{config.O}-"
               f"{config.dtype}-{config.activation if config.cell == 'rnn' else config.cell}")
        large = config.H >= 1760
        marks = [pytest.mark.large] if large else []
        impls = list(compare.IMPLEMENTATIONS)
        if not large:
            impls[1:1] = [f"fastbptt:{m}" for m in methods]
        for impl in impls:
            if impl == "fastbptt-parallel" and config.B < 8:
                continue
            cases.append(pytest.param(config, impl, id=f"{cid}-{impl}", marks=marks))
    return cases


def pytest_generate_tests(metafunc):
    if {"config", "impl"} <= set(metafunc.fixturenames):
        option = metafunc.config.getoption("--fastbptt-methods", default="") or ""
        methods = [m.strip() for m in option.split(",") if m.strip()]
        metafunc.parametrize("config, impl", _cases(methods))


def test_step(benchmark, peak_gflops, config, impl):
    if impl in ("torch", "jax"):
        pytest.importorskip(impl)
    if not compare.supports(impl, config.activation, config.cell):
        pytest.skip(f"{impl} has no activation {config.activation!r}")
    model, X, Y, expected = problem(config)
    step = compare.make_step(impl, model, X, Y)
    checked = compare.check(step(), expected, config.dtype)       # also compiles / traces
    assert checked["ok"], (f"{impl} disagrees with the float64 reference: max gradient error "
                           f"{checked['max_grad_error']:.2e} ({checked['worst']}), loss error "
                           f"{checked['loss_error']:.2e}, tolerance {checked['tolerance']:.0e}")

    flops = config.flops
    benchmark.group = config.label
    benchmark.extra_info.update(
        impl=impl, T=config.T, B=config.B, D=config.D, H=config.H, O=config.O, dtype=config.dtype,
        activation=config.activation, cell=config.cell, flops=flops, flop_formula=compare.FLOP_FORMULA,
        max_grad_error=checked["max_grad_error"], loss_error=checked["loss_error"],
        version=compare.version(impl))
    time.sleep(0.1)          # let the thread pools of the case before go idle
    if flops > LARGE_FLOPS:
        rounds = 2 if impl == "reference" else 3
        benchmark.pedantic(step, rounds=rounds, iterations=1)
    else:
        benchmark(step)

    stats = getattr(benchmark.stats, "stats", None) if benchmark.stats else None
    if stats is not None:                                       # None under --benchmark-disable
        peak = peak_gflops(config.dtype)
        best, median = flops / stats.min / 1e9, flops / stats.median / 1e9
        benchmark.extra_info.update(gflops=best, gflops_median=median, gemm_peak_gflops=peak,
                                    peak_fraction=best / peak, peak_fraction_median=median / peak)
