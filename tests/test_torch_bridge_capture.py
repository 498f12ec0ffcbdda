"""fastbptt.torch under graph capture (issue 16): ``torch.jit.trace``, ``torch.jit.script``, ``torch.export``
(what the ONNX exporters build on: the dynamo exporter runs torch.export, the TorchScript exporter traces),
``torch.compile`` (dynamo), ``TorchDispatchMode``s. Under capture the module runs PyTorch's implementation, so
the captured graph holds torch's operators and computes what torch.nn's module computes; eagerly afterwards,
fastbptt's kernels run again. torch.nn's module with the same ``state_dict`` (float64) is the oracle.

``torch.onnx.export`` itself needs the ``onnx`` (and, for the dynamo exporter, ``onnxscript``) packages,
which are not dependencies; it was checked by hand with them installed (both exporters)."""

import pytest

torch = pytest.importorskip("torch")

import torch_twins as twins  # noqa: E402
from torch import nn  # noqa: E402

import fastbptt.torch as ft  # noqa: E402

F64 = torch.float64
TOL = 1e-10


def pair(cell, D=6, H=12, **kw):
    """(torch.nn module, fastbptt.torch module) with the same random float64 parameters."""
    return twins.pair(cell, D, H, **kw)


rnd = twins.rnd


def close(name, got, want, tol=TOL):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (name, i)
        assert (g - w).abs().max().item() <= tol * (1 + w.abs().max().item()), (name, i)


class Head(nn.Module):
    """A model holding the recurrent module: its output and last state through a linear readout."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.out = rnn, nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3, dtype=F64)
        with torch.no_grad():
            self.out.weight.copy_(torch.linspace(-1, 1, self.out.weight.numel(), dtype=F64).view_as(self.out.weight))
            self.out.bias.fill_(0.1)

    def forward(self, x):
        y, h = self.rnn(x)
        return self.out(y), (h[0] if isinstance(h, tuple) else h)


def heads(cell, **kw):
    return [Head(m).eval() for m in pair(cell, **kw)]


CASES = [("LSTM", {"num_layers": 2}), ("GRU", {"bidirectional": True}), ("RNN", {"nonlinearity": "relu"})]


@pytest.mark.parametrize("cell, kw", CASES, ids=[c for c, _ in CASES])
def test_jit_trace_passes_its_check_and_computes_as_torch(cell, kw):
    ref, fb = heads(cell, **kw)
    x = rnd(20, 4, 6, seed=1)
    traced = torch.jit.trace(fb, (x,))       # check_trace=True (it failed its own check): eager fb runs too
    graph = str(traced.inlined_graph)
    assert "aten::lift_fresh" not in graph and f"aten::{cell.lower()}" in graph.replace("rnn_relu", "rnn"), graph
    x2 = rnd(11, 3, 6, seed=2)
    close("traced", list(traced(x2)), list(ref(x2)))
    made = fb.rnn.workspaces.made
    close("eager after", list(fb(x2)), list(ref(x2)))
    assert fb.rnn.workspaces.made == made + 1, "fastbptt runs again outside the trace"


@pytest.mark.parametrize("cell, kw", CASES, ids=[c for c, _ in CASES])
def test_torch_export_as_torch(cell, kw):
    ref, fb = heads(cell, **kw)
    x = rnd(20, 4, 6, seed=1)
    ep = torch.export.export(fb, (x,))                    # FakeTensor weights: no data pointer to read
    close("exported", list(ep.module()(x)), list(ref(x)))
    assert fb.rnn.workspaces.made == 0
    close("eager after", list(fb(x)), list(ref(x)))
    assert fb.rnn.workspaces.made == 1


def test_torch_jit_script_refuses_and_names_convert():
    """TorchScript cannot compile fastbptt's code: a clear error naming the way (it was a NotSupportedError
    from deep in the compiler); the converted model scripts and computes as torch.nn's."""
    from fastbptt.torch import convert

    ref, fb = heads("LSTM", num_layers=2)
    with pytest.raises(RuntimeError, match=r"convert\(model, to='torch'\)"):
        torch.jit.script(fb)
    assert isinstance(fb.rnn, ft.LSTM), "the model is left as it was"
    scripted = torch.jit.script(convert(fb, to="torch"))
    x = rnd(9, 2, 6, seed=3)
    close("scripted", list(scripted(x)), list(ref(x)))


@pytest.mark.parametrize("allow_rnn", [False, True])
def test_torch_compile_as_torch(allow_rnn):
    """torch.compile (dynamo; the eager backend: no C compiler in the test). By default dynamo breaks the
    graph at a recurrent module (torch.nn's too) and fastbptt runs; with ``allow_rnn`` dynamo traces the
    module, and torch's implementation is what it traces (fullgraph)."""
    import torch._dynamo

    torch._dynamo.reset()
    ref, fb = heads("GRU", num_layers=2)
    fb.train(), ref.train()
    with torch._dynamo.config.patch(allow_rnn=allow_rnn):
        compiled = torch.compile(fb, backend="eager", fullgraph=allow_rnn)
        res = []
        for m in (ref, compiled):
            x = rnd(15, 3, 6, seed=4, grad=True)
            out = m(x)
            sum((t * rnd(*t.shape, seed=9)).sum() for t in out).backward()
            res.append(list(out) + [x.grad] + [p.grad for p in ref.parameters() if m is ref]
                       + [p.grad for p in fb.parameters() if m is not ref])
    close("compiled", res[1], res[0])
    assert (fb.rnn.workspaces.made == 0) == allow_rnn
    torch._dynamo.reset()


def test_dispatch_modes_see_torchs_operators():
    """Under a TorchDispatchMode (here FlopCounterMode) the module runs PyTorch's implementation: the mode
    counts what it counts for torch.nn's module."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for m in heads("LSTM", num_layers=2):
        x = rnd(10, 2, 6, seed=5, grad=True)
        with FlopCounterMode(display=False) as mode:
            sum(t.sum() for t in m(x)).backward()
        counts.append(mode.get_total_flops())
    assert counts[1] == counts[0] > 0
