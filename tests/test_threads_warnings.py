"""fastbptt.core.threads' warnings point at the caller's line: the first frame outside fastbptt and
outside PyTorch (a ``fastbptt.torch`` module runs the core from torch's autograd and nn.Module frames)."""

import sys
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt.core import threads


@pytest.fixture
def no_threadpoolctl(monkeypatch):
    """As in an install without threadpoolctl: its import fails, nothing found, not yet warned."""
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)        # import threadpoolctl: ImportError
    monkeypatch.setattr(threads, "_libs", None)                      # looked for again
    monkeypatch.setattr(threads, "_warned_uncontrolled", False)
    yield
    assert threads._libs == []                                       # the import was tried and failed


def _uncontrolled(record):
    found = [w for w in record if "without threadpoolctl" in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in record]
    return found[0]


@pytest.mark.parametrize("call", ["loss_and_grad", "layer_forward", "train_step"])
def test_core_call_warns_at_the_callers_line(no_threadpoolctl, call):
    rng = np.random.default_rng(0)
    T, B, D, H = 12, 8, 6, 16
    m = fastbptt.LSTM(D, H, D, num_layers=2)
    X = rng.integers(0, D, (T, B))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if call == "loss_and_grad":
            line = sys._getframe().f_lineno + 1
            fastbptt.loss_and_grad(m, X, X, parallel=True)
        elif call == "layer_forward":
            line = sys._getframe().f_lineno + 1
            fastbptt.layer_forward(m, X, parallel=True)
        else:
            opt = fastbptt.optim.make_optimizer("sgd", m, 0.1)
            line = sys._getframe().f_lineno + 1
            fastbptt.training.train_step(m, X, X, opt, workspace=fastbptt.Workspace(m, T, B), parallel=True)
    w = _uncontrolled(record)
    assert (w.filename, w.lineno) == (__file__, line)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_torch_module_warns_at_the_callers_line(no_threadpoolctl, where):
    torch = pytest.importorskip("torch")
    import fastbptt.torch as ft
    torch.manual_seed(0)
    m = ft.GRU(6, 16, num_layers=2, parallel=True)
    x = torch.randn(12, 8, 6, requires_grad=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if where == "forward":
            line = sys._getframe().f_lineno + 1
            out, _ = m(x)
        else:
            out, _ = m(x)
            record.clear()
            threads._warned_uncontrolled = False      # warned once per process: again for the backward
            loss = out.square().sum()
            line = sys._getframe().f_lineno + 1
            loss.backward()
    w = _uncontrolled(record)
    assert (w.filename, w.lineno) == (__file__, line)
