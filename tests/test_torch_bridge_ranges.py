"""fastbptt.torch at the ends of every range, as torch.nn (issue 16): dropout 0 and 1, T = 0, B = 0, and
PackedSequences whose batch_sizes hold zeros. torch.nn's module with the same ``state_dict`` (float64) is the
oracle: the same values and gradients, or an exception of the same type."""

import pytest

torch = pytest.importorskip("torch")

import torch_twins as twins  # noqa: E402
from torch.nn.utils.rnn import PackedSequence  # noqa: E402

F64 = torch.float64
TOL = 1e-10


def pair(cell, D=8, H=16, **kw):
    """(torch.nn module, fastbptt.torch module) with the same random float64 parameters."""
    return twins.pair(cell, D, H, **kw)


rnd = twins.rnd


def flat(result):
    out, h = result
    out = out.data if isinstance(out, PackedSequence) else out
    return [out] + (list(h) if isinstance(h, tuple) else [h])


def close(name, got, want, tol=TOL):
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), (name, i)
        if g is None:
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (name, i, g.shape, w.shape)
        if g.numel():
            assert (g - w).abs().max().item() <= tol * (1 + w.abs().max().item()), (name, i)


def run(m, inp, hx=None):
    """Outputs, and the gradients of a weighted sum of them (input, hx, parameters)."""
    res = m(inp, hx)
    outs = flat(res)
    loss = sum((t * rnd(*t.shape, seed=11 + i)).sum() for i, t in enumerate(outs))
    leaves = [inp.data if isinstance(inp, PackedSequence) else inp] + \
        ([] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]) + list(m.parameters())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    return [t.detach() for t in outs] + list(grads)


@pytest.mark.parametrize("cell", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_one_drops_every_unit_as_torch(cell, bidirectional):
    """dropout=1.0 while training: every unit between the layers dropped (torch.nn runs it; fastbptt
    raised ZeroDivisionError). Nothing random is left, so values and gradients are torch.nn's."""
    res = []
    for m in pair(cell, num_layers=3, dropout=1.0, bidirectional=bidirectional):
        m.train()
        res.append(run(m, rnd(30, 6, 8, seed=1, grad=True)))
    close(cell, res[1], res[0])
    names = [n for n, _ in m.named_parameters()]
    top_input = res[1][-len(names):][names.index("weight_ih_l2")]
    assert top_input.abs().sum() == 0, "the top layer's input is all dropped"


@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_dropout_at_the_ends_in_evaluation_and_one_layer(cell, dropout):
    """dropout 0 and 1 in evaluation mode (no dropout), and with one layer (dropout changes nothing)."""
    for layers, training in ((3, False), (1, True)):
        res = []
        for m in pair(cell, num_layers=layers, dropout=dropout):
            m.train(training)
            res.append(run(m, rnd(20, 4, 8, seed=2, grad=True)))
        close(f"{cell} layers={layers}", res[1], res[0])


def test_dropout_one_backward_twice_and_batched():
    """dropout=1.0: a second backward (retain_graph) and batched gradients too."""
    ref, fb = pair("LSTM", num_layers=2, dropout=1.0)
    res = []
    for m in (ref, fb):
        x = rnd(15, 3, 8, seed=4, grad=True)
        out = m(x)[0]
        V = rnd(3, *out.shape, seed=5)
        g1 = torch.autograd.grad(out, [x] + list(m.parameters()), V[0], retain_graph=True)
        g2 = torch.autograd.grad(out, [x] + list(m.parameters()), V, is_grads_batched=True)
        res.append(list(g1) + list(g2))
    close("dropout=1", res[1], res[0])


def outcome(f):
    """f()'s values, or the type of its exception."""
    try:
        return "ok", f()
    except Exception as e:     # noqa: BLE001 - the type is compared with torch.nn's
        return type(e), str(e)


def same_outcome(name, f_ref, f_fb):
    want, got = outcome(f_ref), outcome(f_fb)
    assert got[0] == want[0], (name, got, want)
    if want[0] == "ok":
        close(name, got[1], want[1])
    return want


SHAPES = [(0, 4, 8), (12, 0, 8), (0, 0, 8), (0, 8), (0, 4, 8, "batch_first"), (4, 0, 8, "batch_first")]


@pytest.mark.parametrize("cell", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("with_hx", [False, True])
def test_empty_sequence_or_batch_as_torch(cell, shape, with_hx):
    """T = 0 (torch.nn raises RuntimeError) and B = 0 (empty outputs, zero gradients), with and without
    hx, in training with dropout and stacked layers."""
    batch_first = shape[-1] == "batch_first"
    shape = shape[:-1] if batch_first else shape
    mods = pair(cell, num_layers=2, dropout=0.5, batch_first=batch_first)
    kinds = []
    for m in mods:
        m.train()
        x = rnd(*shape, seed=3, grad=True)
        hx = None
        if with_hx:
            B = () if len(shape) == 2 else (shape[0] if batch_first else shape[1],)
            h = rnd(2, *B, 16, seed=6, grad=True)
            hx = (h, h * 0.5) if cell == "LSTM" else h
        kinds.append(lambda m=m, x=x, hx=hx: run(m, x, hx))
    want = same_outcome(f"{cell} {shape}", kinds[0], kinds[1])
    assert (want[0] == "ok") == (0 not in (shape[:1] if len(shape) == 2 or not batch_first else shape[1:2])), want


BATCH_SIZES = [[5, 5, 3, 0], [4, 0, 0], [0, 0], [0], [3, 3, 3]]


@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
@pytest.mark.parametrize("sizes", BATCH_SIZES, ids=[str(s) for s in BATCH_SIZES])
def test_packed_sequences_with_zero_batch_sizes_as_torch(cell, sizes):
    """Hand-built PackedSequences whose batch_sizes end in zeros or are all zero (pack_padded_sequence
    refuses zero lengths; torch.nn's module takes these)."""
    res = []
    for m in pair(cell, num_layers=2, bidirectional=True):
        data = rnd(sum(sizes), 8, seed=7, grad=True)
        res.append(lambda m=m, data=data: run(m, PackedSequence(data, torch.tensor(sizes))))
    same_outcome(str(sizes), *res)
    empty = []
    for m in pair(cell):
        empty.append(lambda m=m: run(m, PackedSequence(rnd(0, 8, grad=True), torch.tensor([], dtype=torch.int64))))
    same_outcome("no steps", *empty)
