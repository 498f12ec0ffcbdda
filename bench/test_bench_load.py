"""One fastbptt training step alone and beside busy-loop processes: ``pytest bench/test_bench_load.py --benchmark-only``.

The shapes of ``python -m fastbptt bench --load`` (``fastbptt.benchmark.LOAD_SIZES``), each
timed twice by pytest-benchmark: "idle", and "loaded" with K CPU-bound busy-loop processes
running (K = half the cores, at least 1; pinned to nothing). Both cases of a shape share a
benchmark group, so they print side by side; ``extra_info`` holds how many cores other
processes kept busy meanwhile (from /proc/stat, where it exists) and the ratio's bound
(cores / (cores - K), 2 for one of two cores).

pytest-benchmark times the two cases one after the other; ``python -m fastbptt bench --load``
interleaves idle and loaded phases, which is fairer on a drifting machine, and prints the
ratio itself. Nothing here asserts on a time.
"""

import time

import pytest

from fastbptt import compare
from fastbptt._load import LoadMonitor
from fastbptt._loadbench import Competitors, bound
from fastbptt.benchmark import LOAD_SIZES, Config

CORES = compare.default_threads()
COMPETITORS = max(1, CORES // 2)


@pytest.mark.parametrize("condition", ["idle", "loaded"])
@pytest.mark.parametrize("shape", LOAD_SIZES, ids=lambda s: "T{}-B{}-D{}-H{}-O{}".format(*s))
def test_step_under_load(benchmark, shape, condition):
    config = Config(*shape)
    model, X, Y = compare.make_problem(*shape)
    step = compare.make_step("fastbptt", model, X, Y)
    checked = compare.check(step(), compare.oracle(model, X, Y), config.dtype)     # also compiles
    assert checked["ok"], f"fastbptt disagrees with the float64 reference: {checked['max_grad_error']:.2e}"
    benchmark.group = f"load: {config.label}"
    benchmark.extra_info.update(T=config.T, B=config.B, D=config.D, H=config.H, O=config.O,
                                condition=condition, cores=CORES,
                                competitors=COMPETITORS if condition == "loaded" else 0,
                                bound=bound(CORES, COMPETITORS))
    monitor = LoadMonitor()
    time.sleep(0.1)                       # let the thread pools of the case before go idle
    with Competitors(COMPETITORS if condition == "loaded" else 0):
        start = monitor.sample()
        benchmark(step)
        load = monitor.since(start)
    if load is not None:
        benchmark.extra_info.update(others_cores=load.others_cores, others_fraction=load.fraction)
