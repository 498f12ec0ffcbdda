"""fastbptt.torch under PyTorch's autograd machinery beyond one backward (issue 16): a second backward
(``retain_graph=True``) after the module's attributes changed, batched gradients
(``autograd.grad(is_grads_batched=True)``, ``autograd.functional.jacobian(vectorize=True)``, ``torch.func.vmap``
over a backward). The oracle is ``torch.nn``'s module with the same ``state_dict`` (float64), or, with
dropout (whose masks are fastbptt's own), the same call's first backward."""

import pytest

torch = pytest.importorskip("torch")

import torch_twins as twins  # noqa: E402
from torch.nn.utils.rnn import pack_sequence  # noqa: E402

import fastbptt.torch as ft  # noqa: E402

F64 = torch.float64
TOL = 1e-10


def pair(cell, D=6, H=12, **kw):
    """(torch.nn module, fastbptt.torch module) with the same random float64 parameters."""
    return twins.pair(cell, D, H, **kw)


rnd = twins.rnd


def close(name, got, want, tol=TOL):
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (name, i, g.shape, w.shape)
        err = (g - w).abs().max().item() if g.numel() else 0.0
        assert err <= tol * (1 + w.abs().max().item() if w.numel() else 1), (name, i, err)


def outputs(result):
    out, h = result
    out = out.data if hasattr(out, "batch_sizes") else out
    return [out] + (list(h) if isinstance(h, tuple) else [h])


def weighted(result, seed=7):
    return sum((t * rnd(*t.shape, seed=seed + i)).sum() for i, t in enumerate(outputs(result)))


# ---------------------------------------------------------------- a second backward reads its call's facts

CHANGES = {
    "dropout": lambda m: setattr(m, "dropout", 0.1),
    "dropout-0": lambda m: setattr(m, "dropout", 0.0),
    "eval": lambda m: m.eval(),
    "method": lambda m: setattr(m, "method", "blas" if m.method != "blas" else "fused"),
    "parallel": lambda m: setattr(m, "parallel", not m.parallel),
    "workspaces": lambda m: setattr(m, "workspaces", ft.WorkspaceCache(max_count=1)),
    "all": lambda m: (setattr(m, "dropout", 0.0), m.eval(), setattr(m, "method", "blas"),
                      setattr(m, "parallel", True)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")          # parallel=True without threadpoolctl
@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_second_backward_uses_the_forwards_attributes(cell, change):
    """retain_graph=True: the second backward gives the first one's gradients whatever changed on the
    module in between (torch.nn's graph keeps its forward's dropout, mode, ...), with dropout on."""
    _, fb = pair(cell, num_layers=3, dropout=0.5, fbkw={"method": "fused"})
    fb.train()
    x = rnd(30, 8, 6, seed=1, grad=True)
    torch.manual_seed(3)
    loss = weighted(fb(x))
    params = [x] + list(fb.parameters())
    first = torch.autograd.grad(loss, params, retain_graph=True)
    CHANGES[change](fb)
    second = torch.autograd.grad(loss, params, retain_graph=True)
    close(change, second, first, 1e-13)
    third = torch.autograd.grad(loss, params)
    close(change + " (third)", third, first, 1e-13)


@pytest.mark.parametrize("change", ["eval", "dropout-0", "all"])
def test_second_backward_as_torch_after_changes(change):
    """Without dropout masks to compare (evaluation mode at the forward), torch.nn as the oracle: both
    modules changed the same way between the two backwards."""
    ref, fb = pair("LSTM", num_layers=2, dropout=0.5, bidirectional=True)
    res = []
    for m in (ref, fb):
        m.eval()
        x = rnd(25, 4, 6, seed=2, grad=True)
        loss = weighted(m(x))
        loss.backward(retain_graph=True)
        (CHANGES[change] if m is fb else lambda m: (setattr(m, "dropout", 0.0), m.train()))(m)
        m.train()                                 # training now (dropout applies to a new forward)
        loss.backward()
        res.append([x.grad] + [p.grad for p in m.parameters()])
    close(change, res[1], res[0])


# ---------------------------------------------------------------- batched gradients

LAYOUTS = [("GRU", {}, "tbd"), ("LSTM", {"num_layers": 2, "bidirectional": True}, "tbd"),
           ("RNN", {"num_layers": 2, "batch_first": True, "nonlinearity": "relu"}, "btd"),
           ("RNN", {"bias": False}, "td"), ("LSTM", {"num_layers": 2}, "td"),
           ("GRU", {"num_layers": 2, "bidirectional": True}, "packed"),
           ("LSTM", {"num_layers": 3, "dropout": 0.4}, "tbd")]    # eval mode below: no masks


def call_inputs(layout, seed=1):
    if layout == "packed":
        return pack_sequence([rnd(n, 6, seed=seed + n, grad=True) for n in (12, 9, 9, 4)])
    if layout == "td":
        return rnd(12, 6, seed=seed, grad=True)
    return rnd(*((5, 12) if layout == "btd" else (12, 5)), 6, seed=seed, grad=True)


def leaf(inp):
    return inp.data if hasattr(inp, "batch_sizes") else inp


@pytest.mark.parametrize("cell, kw, layout", LAYOUTS, ids=[f"{c}-{lay}-{len(k)}" for c, k, lay in LAYOUTS])
def test_is_grads_batched_as_torch(cell, kw, layout):
    """autograd.grad(is_grads_batched=True) with respect to the input, h0 and the parameters: torch.nn's
    values (the bridge runs that backward through PyTorch's operators)."""
    res = []
    for m in pair(cell, **kw):
        m.eval() if "dropout" in kw else m.train()
        inp = call_inputs(layout)
        h0 = rnd(m.num_layers * (2 if m.bidirectional else 1), *(() if layout == "td" else (4 if layout == "packed"
                                                                                            else 5,)), 12,
                 seed=9, grad=True)
        hx = (h0, h0 * 0.5) if cell == "LSTM" else h0
        outs = outputs(m(inp, hx))
        V = [rnd(7, *t.shape, seed=20 + i) for i, t in enumerate(outs)]
        wrt = [leaf(inp), h0] + list(m.parameters())
        res.append(torch.autograd.grad(outs, wrt, V, is_grads_batched=True))
        assert res[-1][0].shape == (7,) + leaf(inp).shape
    close(f"{cell} {layout}", res[1], res[0])


@pytest.mark.parametrize("cell", ["RNN", "GRU", "LSTM"])
def test_jacobian_vectorized_as_torch(cell):
    res = []
    for m in pair(cell, num_layers=2):
        x = rnd(10, 3, 6, seed=4)
        res.append([torch.autograd.functional.jacobian(lambda x, m=m: m(x)[0], x, vectorize=True)])
    close(cell, res[1], res[0])


def test_batched_gradients_with_dropout_are_the_calls_own():
    """With dropout (fastbptt's masks), a batched backward gives what one backward per vector gives."""
    _, fb = pair("LSTM", num_layers=3, dropout=0.5, bidirectional=True)
    fb.train()
    for layout in ("tbd", "packed"):
        inp = call_inputs(layout, seed=5)
        torch.manual_seed(1)
        out = outputs(fb(inp))[0]
        V = rnd(5, *out.shape, seed=6)
        wrt = [leaf(inp)] + list(fb.parameters())
        batched = torch.autograd.grad(out, wrt, V, is_grads_batched=True, retain_graph=True)
        one_by_one = [torch.stack(g) for g in zip(*(torch.autograd.grad(out, wrt, v, retain_graph=True)
                                                     for v in V))]
        close(layout, batched, one_by_one)


def test_vmap_over_a_backward_as_torch():
    """torch.func.vmap of autograd.grad over a graph made outside it (functorch's batched tensors)."""
    res = []
    for m in pair("GRU", num_layers=2):
        x = rnd(15, 4, 6, seed=3, grad=True)
        out = m(x)[0]
        V = rnd(6, *out.shape, seed=8)
        res.append(torch.func.vmap(lambda v, out=out, x=x: torch.autograd.grad(out, x, v, retain_graph=True)[0])(V))
    close("vmap", res[1:], res[:1])
