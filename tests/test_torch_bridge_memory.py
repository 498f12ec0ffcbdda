"""fastbptt.torch's workspaces when T changes from call to call (issue 16): a variable-length BPTT loop
reuses a few workspaces (a call of T runs over the first T steps of a longer idle one) rather than making
one per T, whose memory the allocator keeps. Counts of workspaces and bytes, never time or RSS; results are
torch.nn's (float64, same ``state_dict``) whatever workspace a call ran in."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_twins as twins  # noqa: E402
from torch.nn.utils.rnn import pack_sequence  # noqa: E402

from fastbptt.core.workspace import Workspace  # noqa: E402

F64 = torch.float64
TOL = 1e-10


def pair(cell, D=8, H=16, **kw):
    """(torch.nn module, fastbptt.torch module) with the same random float64 parameters."""
    return twins.pair(cell, D, H, **kw)


rnd = twins.rnd


def step(m, x, hx=None):
    """One training step's outputs and gradients (input, parameters)."""
    out, h = m(x, hx)
    outs = [out.data if hasattr(out, "batch_sizes") else out] + (list(h) if isinstance(h, tuple) else [h])
    loss = sum((t * rnd(*t.shape, seed=3 + i)).sum() for i, t in enumerate(outs))
    leaf = x.data if hasattr(x, "batch_sizes") else x
    grads = torch.autograd.grad(loss, [leaf] + list(m.parameters()))
    return [t.detach() for t in outs] + list(grads)


def close(name, got, want, tol=TOL):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (name, i)
        assert (g - w).abs().max().item() <= tol * (1 + w.abs().max().item()), (name, i)


def test_variable_length_loop_makes_one_workspace():
    """word_language_model's variable BPTT: T around 35 ± 10 for 400 steps. After the longest, every
    shorter call reuses its workspace: one made, none more (it made one per new T: dozens)."""
    _, fb = pair("LSTM", D=20, H=32, num_layers=2, dropout=0.2)
    cache = fb.workspaces
    rng = np.random.default_rng(0)
    Ts = np.clip(rng.normal(35, 10, 400).astype(int), 5, 60)
    Ts[0] = Ts.max()
    hidden = None
    for T in Ts:
        out, hidden = fb(rnd(int(T), 16, 20, seed=int(T), grad=True), hidden)
        hidden = tuple(h.detach() for h in hidden)
        out.sum().backward()
    assert len(set(Ts.tolist())) > 30
    assert (cache.made, cache.reused) == (1, len(Ts) - 1), cache
    assert len(cache) == 1
    ws = next(iter(cache._idle.values()))
    assert Ts.max() <= ws.T <= 1.25 * Ts.max()
    one = Workspace(fb._fastbptt.model, int(Ts.max()), 16).nbytes
    assert cache.nbytes <= 1.25 * one + 2 ** 16, (cache.nbytes, one)


def test_lengths_growing_make_a_workspace_per_bucket():
    """T growing 1 .. 200 one by one: a workspace per bucket (T rounded up by at most 25 %), not per T."""
    _, fb = pair("GRU")
    cache = fb.workspaces
    with torch.no_grad():
        for T in range(1, 201):
            fb(rnd(T, 3, 8, seed=T))
            assert len(cache) <= cache.max_count and cache.nbytes <= cache.max_bytes
    assert cache.made <= 8 + 8 * 5, cache          # exact up to 8, then 8 per power of two: 8..256
    assert all(ws.T >= 8 for ws in cache._idle.values())


def test_graphs_held_at_once_each_have_their_own():
    """Forwards before one backward need a workspace each, whatever their T."""
    ref, fb = pair("GRU", num_layers=2)
    xs = [rnd(T, 4, 8, seed=T, grad=True) for T in (40, 30, 20, 35)]
    outs = [fb(x)[0] for x in xs]
    assert fb.workspaces.made == 4 and len(fb.workspaces) == 0
    for x, out in zip(xs, outs):
        out.sum().backward()
    want = [torch.autograd.grad(ref(x)[0].sum(), x)[0] for x in xs]
    close("held", [x.grad for x in xs], want)
    assert len(fb.workspaces) == 4


CASES = [("LSTM", {"num_layers": 2, "bidirectional": True}, "tbd"), ("GRU", {"batch_first": True}, "btd"),
         ("RNN", {"num_layers": 3}, "td"), ("LSTM", {"num_layers": 2}, "packed"),
         ("GRU", {"num_layers": 2, "bidirectional": True}, "packed")]


def inputs(layout, T, seed):
    if layout == "packed":
        return pack_sequence([rnd(n, 8, seed=seed + n, grad=True) for n in (T, max(1, T - 3), max(1, T // 2))])
    if layout == "td":
        return rnd(T, 8, seed=seed, grad=True)
    return rnd(*((5, T) if layout == "btd" else (T, 5)), 8, seed=seed, grad=True)


@pytest.mark.parametrize("cell, kw, layout", CASES, ids=[f"{c}-{lay}" for c, _, lay in CASES])
def test_shorter_calls_in_a_longer_workspace_as_torch(cell, kw, layout):
    """Calls of T falling and rising within one workspace (what a longer call left in it is never read):
    torch.nn's outputs and gradients, and one workspace made."""
    ref, fb = pair(cell, **kw)
    for i, T in enumerate((45, 44, 20, 37, 1, 9, 45, 30)):
        got = step(fb, inputs(layout, T, seed=i))
        want = step(ref, inputs(layout, T, seed=i))
        close(f"T={T}", got, want)
    assert fb.workspaces.made == 1, fb.workspaces


def test_dropout_masks_do_not_depend_on_the_workspace():
    """With dropout, a call in a longer workspace gives what the same call in a workspace of its own T gives
    (the masks are drawn for the call's T from the same seed)."""
    res = []
    for warm in (False, True):
        _, fb = pair("LSTM", num_layers=3, dropout=0.5)
        if warm:
            step(fb, rnd(50, 4, 8, seed=9, grad=True))
        torch.manual_seed(1)
        res.append(step(fb, rnd(33, 4, 8, seed=2, grad=True)))
        assert fb.workspaces.made == 1
    close("dropout", res[1], res[0], 0)
