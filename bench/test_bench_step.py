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

Stacks (tag ``layers``: ``fastbptt.benchmark.LAYER_SIZES`` at 1 and 2 layers, each cell)
are timed in fastbptt and PyTorch (``num_layers=L``); sequences of different lengths
(tag ``lengths``: ``LENGTH_SIZES``, lengths uniform in 1..T) in fastbptt with
``lengths=``, fastbptt at full lengths (``fastbptt-full``), PyTorch on packed sequences
(``torch-packed``) and on the padded batch with a masked loss (``torch-padded``).

Cases of one configuration share a benchmark group, so pytest-benchmark prints them side
by side. PyTorch and JAX cases are skipped when the package is missing. Case ids end
in the Elman activation (``tanh``, ``relu``, ``identity``) or the cell (``gru``, ``lstm``),
then ``L2`` for a stack and ``uniform`` for lengths.
Select with -k, e.g. ``-k "sizes and not reference"``, ``-k H64``, ``-k "cells and lstm"``,
``-k "layers and gru"``, ``-k lengths``,
``-k "not gru and not lstm"`` (the Elman cell alone), ``-m "not large"`` (skips H = 1760);
``--fastbptt-methods fused,blas`` adds fastbptt with each ``method=`` of loss_and_grad.
"""

import time

import pytest
from conftest import problem_with_lengths

from fastbptt import compare
from fastbptt.benchmark import CELL_SIZES, LAYER_SIZES, LENGTH_SIZES, SIZES, Config

LARGE_FLOPS = 5e10        # slower than about half a second a step: few rounds


def _configs():
    """(Config, tag) pairs: the eight training shapes, sweeps of T, H and B, float64, the cells' shapes,
    stacks of 1 and 2 layers, and lengths.

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
    for shape in LAYER_SIZES:                                 # the shapes of bench --layers 1,2
        for layers in (1, 2):
            out += cells("layers", *shape, layers=layers)
    for shape in LENGTH_SIZES:                                # the shapes of bench --lengths uniform
        out += cells("lengths", *shape, lengths="uniform")
    return out


#: The implementations of each tag: stacks against PyTorch alone (the JAX step has one layer,
#: the reference is slow there), lengths against their full-length time and PyTorch's two ways.
IMPLS = {"layers": ("fastbptt", "torch"),
         "lengths": ("fastbptt", "fastbptt-full", "torch-packed", "torch-padded")}
PLAIN = tuple(n for n in compare.IMPLEMENTATIONS if n not in ("fastbptt-full", "torch-packed", "torch-padded"))


def _cases(methods=()):
    """Every (config, implementation) case, one configuration after another, fastbptt first."""
    cases = []
    for config, tag in _configs():
        cid = (f"{tag}-T{config.T}-B{config.B}-D{config.D}-H{config.H}-O{config.O}-"
               f"{config.dtype}-{config.activation if config.cell == 'rnn' else config.cell}"
               + (f"-L{config.layers}" if config.layers != 1 else "")
               + (f"-{config.lengths}" if config.variable else ""))
        large = config.H >= 1760
        marks = [pytest.mark.large] if large else []
        impls = list(IMPLS.get(tag, PLAIN))
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
    base = compare.parse_name(impl)[0]
    if base in compare.TORCH or base == "jax":
        pytest.importorskip("torch" if base in compare.TORCH else base)
    why = compare.unsupported(impl, config.activation, config.cell, config.layers, config.variable)
    if why:
        pytest.skip(why)
    model, X, Y, lengths, expected, full = problem_with_lengths(config)
    if base == "fastbptt-full":
        expected = full                                           # every sequence run to T
    step = compare.make_step(impl, model, X, Y, lengths=lengths)
    checked = compare.check(step(), expected, config.dtype)       # also compiles / traces
    assert checked["ok"], (f"{impl} disagrees with the float64 reference: max gradient error "
                           f"{checked['max_grad_error']:.2e} ({checked['worst']}), loss error "
                           f"{checked['loss_error']:.2e}, tolerance {checked['tolerance']:.0e}")

    flops = config.flops
    benchmark.group = config.label
    benchmark.extra_info.update(
        impl=impl, T=config.T, B=config.B, D=config.D, H=config.H, O=config.O, dtype=config.dtype,
        activation=config.activation, cell=config.cell, layers=config.layers, lengths=config.lengths,
        positions=config.positions, flops=flops,
        flop_formula=compare.STACK_FLOP_FORMULA if config.layers != 1 or config.variable else compare.FLOP_FORMULA,
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
