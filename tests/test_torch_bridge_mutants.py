"""Tests written from mutation testing of fastbptt/torch/modules.py (issue 10; docs/mutation-testing.md).

Each test kills mutants that survived the bridge's own tests (tests/test_torch_bridge*.py): the
mutant is named in the test's docstring, and the test was checked to fail with it applied in a
copy of the repository. The oracle, where there is one, is ``torch.nn``'s module with the same
``state_dict`` (float64).
"""

import pytest

torch = pytest.importorskip("torch")

import torch_twins as twins  # noqa: E402

from fastbptt.torch.modules import WorkspaceCache  # noqa: E402

F64 = torch.float64

# torch.nn warns about dropout > 0 with one layer; a test builds such modules on purpose
pytestmark = pytest.mark.filterwarnings("ignore:dropout option adds dropout after all but last")


def pair(cell="LSTM", D=3, H=4, **kw):
    """(torch.nn module, fastbptt.torch module) with the same random float64 parameters."""
    return twins.pair(cell, D, H, **kw)


rnd = twins.rnd


# ---------------------------------------------------------------- the workspace cache

def test_workspace_cache_defaults_are_the_documented_ones():
    """Mutants: the defaults max_count=4 and max_bytes=256 * 2**20 changed (5, 257, 3, /, *)."""
    cache = WorkspaceCache()
    assert cache.max_count == 4 and cache.max_bytes == 256 * 2**20
    _, fb = pair("GRU")
    assert fb.workspaces.max_count == 4 and fb.workspaces.max_bytes == 256 * 2**20


def test_workspace_cache_counts_made_and_reused():
    """Mutants: reused starting at 1, ``reused += 1`` made ``-= 1``, ``= 1`` or ``+= 2``."""
    _, fb = pair("GRU")
    cache = fb.workspaces
    assert (cache.made, cache.reused) == (0, 0)
    with torch.no_grad():
        for k in range(1, 4):
            fb(rnd(5, 2, 3, seed=k))
            assert (cache.made, cache.reused) == (1, k - 1)
    fb(rnd(5, 2, 3, grad=True))[0].sum().backward()     # a graph's workspace comes from the cache too
    assert (cache.made, cache.reused) == (1, 3)


def test_workspace_cache_drops_the_least_recently_used_and_keeps_max_count():
    """Mutant: ``len > max_count`` made ``>=`` (one fewer kept). Also pins the order: the least
    recently used goes first (``popitem(last=True)``, the newest dropped, the suite already kills).
    The shapes differ by B (a workspace serves only its own B; a longer T serves a shorter one)."""
    _, fb = pair("GRU")
    cache = fb.workspaces
    cache.max_count = 2
    with torch.no_grad():
        for B in (1, 2, 3):                           # three shapes into a cache of two: B=1 goes
            fb(rnd(5, B, 3))
        assert len(cache) == 2 and cache.made == 3
        fb(rnd(5, 3, 3))                              # the newest is kept
        fb(rnd(5, 2, 3))
        assert (cache.made, cache.reused) == (3, 2)
        fb(rnd(5, 1, 3))                              # the oldest was dropped
        assert (cache.made, cache.reused) == (4, 2)
        assert len(cache) == 2


def test_workspace_cache_keeps_exactly_max_bytes():
    """Mutant: ``nbytes > max_bytes`` made ``>=`` (a cache filled to its bound exactly drops it)."""
    _, fb = pair("GRU")
    cache = fb.workspaces
    with torch.no_grad():
        fb(rnd(5, 2, 3))
        size = cache.nbytes
        assert size > 0 and len(cache) == 1
        cache.max_bytes = size
        fb(rnd(5, 2, 3))                              # the same workspace again: exactly at the bound
        assert len(cache) == 1 and cache.nbytes == size and cache.reused == 1
        cache.max_bytes = size - 1
        fb(rnd(5, 2, 3))
        assert len(cache) == 0 and cache.nbytes == 0


# ---------------------------------------------------------------- dropout's seed

@pytest.mark.parametrize("layers, dropout, training", [(2, 0.0, True), (1, 0.5, True), (2, 0.5, False)],
                         ids=["two-layers-no-dropout", "one-layer-dropout", "eval"])
def test_no_dropout_draws_nothing_from_torchs_generator(layers, dropout, training):
    """Where torch.nn applies no dropout (dropout=0, one layer, eval()), fastbptt draws no seed from
    torch's global generator either: a training loop seeded with torch.manual_seed draws the same
    numbers after the module as with torch.nn's. Mutants: ``dropout > 0`` made ``>= 0``,
    ``num_layers > 1`` made ``>= 1``, ``training and ...`` made ``training or ...``."""
    ref, fb = pair("LSTM", num_layers=layers, dropout=dropout)
    ref.train(training), fb.train(training)
    after = []
    for m in (ref, fb):
        torch.manual_seed(123)
        m(rnd(4, 2, 3, grad=True))[0].sum().backward()
        after.append(torch.rand(3))
    assert torch.equal(after[1], after[0])


def test_dropout_masks_of_many_calls_are_all_different():
    """Each call's seed is drawn from 2**62 values: sixty calls give sixty different masks. Mutant:
    ``2**62`` made ``2*62`` (124 seeds: masks repeat within a few dozen calls)."""
    _, fb = pair("GRU", H=8, num_layers=2, dropout=0.5)
    fb.train()
    x = rnd(4, 2, 3)
    torch.manual_seed(0)
    with torch.no_grad():
        outs = {fb(x)[0].numpy().tobytes() for _ in range(60)}
    assert len(outs) == 60


# ---------------------------------------------------------------- the shared buffer

@pytest.mark.parametrize("how", ["parametrization", "tied"])
def test_a_weight_copied_in_at_each_call_keeps_the_buffer_and_the_workspace(how):
    """A weight fastbptt copies in at each call (computed by a parametrization, or tied to another
    parameter) is checked, not rebuilt for: the other parameters stay where they are and the call
    reuses its workspace. Mutants: ``_Bridge.current``'s check of the copied weights made always
    false (``w = None``, ``not`` dropped, ``!=`` made ``==``): the buffer and the cache rebuilt at
    every call, with the same results."""
    ref, fb = pair("LSTM", num_layers=2)
    for m in (ref, fb):
        if how == "parametrization":
            torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
        else:
            m.weight_hh_l1 = m.weight_hh_l0               # one Parameter in two places
    x = rnd(5, 2, 3, grad=True)
    for step in range(3):
        ptrs = [p.data_ptr() for p in fb.parameters()]
        for m in (ref, fb):
            m.zero_grad()
            out, (h, c) = m(x)
            (out.sum() + 2 * h.sum() + 3 * c.sum()).backward()
        assert torch.allclose(out, ref(x)[0], rtol=0, atol=1e-10)
        for (name, p), q in zip(fb.named_parameters(), ref.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-10), name
        if step:
            assert [p.data_ptr() for p in fb.parameters()] == ptrs, "the parameters moved"
    assert (fb.workspaces.made, fb.workspaces.reused) == (1, 2)


@pytest.mark.parametrize("bad", ["dtype", "shape"])
def test_a_plain_tensor_weight_whose_data_changes_runs_torchs_implementation(bad):
    """A weight set as a plain tensor (fastbptt copies it in at each call) whose ``.data`` is then
    replaced by one of another dtype or shape: the same tensor object, so torch.nn's
    ``_update_flat_weights`` sees no change, and only ``_Bridge.current`` can notice. fastbptt must
    not cast or broadcast it into its buffer; PyTorch's implementation runs and raises as torch.nn
    does. Mutants: ``current`` accepting a copied weight that no longer fits (``return False`` made
    ``return True``; the dtype test dropped by its ``or`` made ``and``)."""
    ref, fb = pair("GRU", num_layers=2)
    x = rnd(5, 2, 3)
    for m in (ref, fb):
        w = m.weight_hh_l1.detach().clone()
        del m.weight_hh_l1
        m.weight_hh_l1 = w                                # a plain tensor: not moved into the buffer
    assert torch.allclose(fb(x)[0], ref(x)[0], rtol=0, atol=1e-10)
    for m in (ref, fb):
        m.weight_hh_l1.data = m.weight_hh_l1.data.float() if bad == "dtype" else m.weight_hh_l1.data[:1]
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(type(want.value)):
        fb(x)


# ---------------------------------------------------------------- the autograd node

@pytest.mark.parametrize("grads", ["c0", "h0", "c0-and-weights"])
def test_lstm_state_gradients_with_frozen_parameters(grads):
    """Only some of (h0, c0) need a gradient, the parameters frozen: each gets torch.nn's gradient.
    Mutants: ``want[2] or want[3]`` (h0 or c0 needs a gradient) made ``want[2] or want[4]`` (the
    first weight's), and c0's gradient returned ``if want[4]`` instead of ``if want[3]``."""
    ref, fb = pair("LSTM", num_layers=2)
    for m in (ref, fb):
        m.requires_grad_(grads == "c0-and-weights")
        if grads == "c0-and-weights":
            m.weight_ih_l0.requires_grad_(False)
    x = rnd(5, 2, 3, grad=True)
    h0, c0 = rnd(2, 2, 4, seed=1), rnd(2, 2, 4, seed=2)
    got = []
    for m in (ref, fb):
        hx = (h0.clone().requires_grad_(grads == "h0"), c0.clone().requires_grad_(grads != "h0"))
        xm = x.detach().clone().requires_grad_()
        out, (h, c) = m(xm, hx)
        (out.sum() + 2 * h.sum() + 3 * c.sum()).backward()
        got.append([xm.grad, *(t.grad for t in hx), *(p.grad for p in m.parameters())])
    for i, (g, w) in enumerate(zip(got[1], got[0])):
        assert (g is None) == (w is None), i
        if w is not None:
            assert torch.allclose(g, w, rtol=0, atol=1e-10), i


def tile_one_block(tensors):
    """Whether the tensors' memory, in address order, follows on without gap or overlap (views of
    one buffer; separate allocations never do, with the allocator's alignment and headers)."""
    ts = sorted(tensors, key=lambda t: t.data_ptr())
    return all(a.data_ptr() + a.nbytes == b.data_ptr() for a, b in zip(ts, ts[1:]))


def test_parameter_gradients_are_views_of_one_flat_gradient():
    """One backward pass makes one flat gradient; each parameter's gradient is a view into it (no
    copy per parameter: the design note of issue 10), except the Elman cell's second bias, which
    gets a copy of the shared b_h gradient. Mutant: ``g.copy() if offset in seen else g`` made
    ``not in`` (every parameter's gradient copied: the same values, one more copy each)."""
    for cell in ("LSTM", "RNN"):
        _, fb = pair(cell, num_layers=2)
        names = [n for n, _ in fb.named_parameters()]
        out, _ = fb(rnd(5, 2, 3))
        grads = dict(zip(names, torch.autograd.grad(out.sum(), list(fb.parameters()))))
        views = [g for n, g in grads.items() if not (cell == "RNN" and n.startswith("bias_hh"))]
        assert tile_one_block(views), cell
        if cell == "RNN":
            for k in (0, 1):
                ih, hh = grads[f"bias_ih_l{k}"], grads[f"bias_hh_l{k}"]
                assert torch.equal(ih, hh) and hh.data_ptr() != ih.data_ptr()
