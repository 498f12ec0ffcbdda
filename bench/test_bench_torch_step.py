"""A PyTorch step with ``fastbptt.torch`` and ``torch.nn``: ``pytest bench/test_bench_torch_step.py --benchmark-only``.

The rows of ``python -m fastbptt bench-torch`` (``fastbptt.benchmarking.torch_step``: the
sets latency, large, bidirectional and packed), each timed twice by pytest-benchmark:
``torch.nn`` (``torch.nn.RNN``/``GRU``/``LSTM``) and ``fastbptt.torch`` (the class of the
same name, loaded with the same ``state_dict``); a step is ``zero_grad`` + the module +
``nn.Linear`` + ``F.cross_entropy`` + ``backward()``, packed rows packing x and y in
every step. Both cases of a row share a benchmark group, so they print side by side.
Before timing, each row checks once that both give the same loss and gradients.
PyTorch runs on 2 threads (``torch.set_num_threads(2)``).

The overhead cases (tag ``overhead``) time, at B = 1, H = 8, T = 1, 2, 5, the module's
forward and ``out.backward(dout)`` in fastbptt.torch and torch.nn, and fastbptt's core
``layer_forward`` + ``layer_backward`` on the same arrays.

pytest-benchmark times the cases one after the other; ``python -m fastbptt bench-torch``
takes their rounds in turn, which is fairer on a noisy machine, and prints the ratios.
Select with -k, e.g. ``-k latency``, ``-k "packed and lstm"``, ``-k overhead``. Nothing
here asserts on a time. Skipped without PyTorch.
"""

import functools
import time

import pytest

from fastbptt.benchmarking import torch_step as ts

torch = pytest.importorskip("torch")
bridge = pytest.importorskip("fastbptt.torch")


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _cid(tag, case):
    return (f"{tag}-{case.cell}-T{case.T}-B{case.B}-H{case.H}-L{case.layers}"
            + ("-bi" if case.bidirectional else "") + ("-packed" if case.packed else ""))


CASES = [pytest.param(case, impl, id=f"{_cid(tag, case)}-{impl}")
         for tag in ts.DEFAULT_SETS for case in ts.SETS[tag] for impl in ts.IMPLS]


@functools.lru_cache(maxsize=2)
def prepared(case):
    """{impl: step} of a row, after checking once that both give the same loss and gradients."""
    parts = ts.make_modules(case)
    x, y, lengths = ts.make_batch(case)
    steps = {"torch.nn": ts.make_step(parts[0], parts[2], x, y, lengths),
             "fastbptt.torch": ts.make_step(parts[1], parts[3], x, y, lengths)}
    checked = ts.check_same(steps["torch.nn"], steps["fastbptt.torch"], parts, case.dtype)
    return steps, checked


@pytest.mark.parametrize("case, impl", CASES)
def test_torch_step(benchmark, case, impl):
    steps, checked = prepared(case)
    assert checked["ok"], (f"fastbptt.torch disagrees with torch.nn: max gradient error "
                           f"{checked['max_grad_error']:.2e} ({checked['worst']}), "
                           f"loss error {checked['loss_error']:.2e}")
    benchmark.group = f"torch step: {case.label}"
    benchmark.extra_info.update(impl=impl, kind=case.kind, goal=case.goal, B_H=case.B * case.H,
                                max_grad_error=checked["max_grad_error"], **{k: getattr(case, k) for k in (
                                    "cell", "T", "B", "D", "H", "O", "layers", "bidirectional", "packed", "dtype")})
    step = steps[impl]
    step()                                   # warm: the kernels compiled, the workspace made
    time.sleep(0.05)                         # let the thread pools of the case before go idle
    benchmark(step)


OVERHEAD = [pytest.param(cell, T, impl, id=f"overhead-{cell}-T{T}-{impl}")
            for cell in ts.CELLS for T in ts.OVERHEAD_T for impl in ("fastbptt.torch", "core", "torch.nn")]


@pytest.mark.parametrize("cell, T, impl", OVERHEAD)
def test_call_overhead(benchmark, cell, T, impl):
    import fastbptt

    case = ts.Case(cell, T, 1, 8, D=8, O=1)
    ref, fast, _, _ = ts.make_modules(case)
    x, dout = torch.randn(T, 1, 8), torch.randn(T, 1, 8)
    if impl == "core":
        model = ts.core_model_from(ref, cell, "float32")
        ws = fastbptt.Workspace(model, T, 1)
        X, dH = x.numpy(), dout.numpy()

        def fn():
            fastbptt.layer_forward(model, X, workspace=ws)
            fastbptt.layer_backward(model, dH, workspace=ws, return_dX=False)
    else:
        module = fast if impl == "fastbptt.torch" else ref
        params = list(module.parameters())

        def fn():
            for p in params:
                p.grad = None
            out, _ = module(x)
            out.backward(dout)
    benchmark.group = f"call overhead: {cell} T={T} B=1 H=8"
    benchmark.extra_info.update(impl=impl, cell=cell, T=T, B=1, H=8, D=8)
    fn()
    benchmark(fn)
