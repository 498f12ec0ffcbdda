"""Hostile tests of fastbptt.torch (issue 10): what a PyTorch user may do to a drop-in module.

The equivalence tests live in tests/test_torch_bridge*.py; these are the attacks around them:
tensors handed in through PyTorch's other doors (``torch.func``, ``register_parameter``,
shared memory, hand-built PackedSequences), parameters tied, mis-shaped or frozen,
non-finite values under NumPy's strict error modes, graphs dropped or held, threads, fork,
pickling, checkpointing. Wherever a result is expected the oracle is ``torch.nn`` holding the
same ``state_dict`` in float64 (to 1e-10, NaN and Inf at the same positions); where torch.nn
raises, fastbptt must raise too (an error, never a result of another shape or silent garbage).
"""

import copy
import io
import multiprocessing
import pickle
import threading
import warnings
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.multiprocessing  # noqa: E402,F401  (registers PyTorch's shared-memory reductions)
import torch.utils.checkpoint  # noqa: E402
import torch_twins as twins  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence  # noqa: E402

import fastbptt.torch as ft  # noqa: E402

F64 = torch.float64
TOL = 1e-10
CELLS = ("RNN", "GRU", "LSTM")

pytestmark = pytest.mark.filterwarnings("ignore:dropout option adds dropout after all but last")


# ---------------------------------------------------------------- helpers

def pair(cell="LSTM", D=3, H=4, **kw):
    """(torch.nn module, fastbptt.torch module) with the same random float64 parameters."""
    return twins.pair(cell, D, H, **kw)


rnd = twins.rnd


def tensors(result):
    """Every tensor of a forward result, in order (a PackedSequence's data for the output)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, PackedSequence):
        return [result.data]
    return [t for part in result for t in tensors(part)]


def weighted(result, seed=7):
    """A random weighted sum of every output: each gets its own nonzero gradient."""
    gen = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=gen, dtype=F64)).sum() for t in tensors(result))


def close(name, got, want, tol=TOL):
    """Same shape, dtype, NaN and ±Inf positions; finite entries within tol · max(1, max|want|)."""
    assert (got is None) == (want is None), f"{name}: got {got is not None}, expected {want is not None}"
    if want is None:
        return
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{name}: {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}"
    g, w = got.detach(), want.detach()
    for what in ("isnan", "isposinf", "isneginf"):
        assert torch.equal(getattr(g, what)(), getattr(w, what)()), f"{name}: {what} differs from torch.nn's"
    fin = torch.isfinite(w)
    if fin.any():
        scale = max(1.0, w[fin].abs().max().item())
        err = (g[fin] - w[fin]).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3e} (scale {scale:.3g})"


def close_all(name, got, want, tol=TOL):
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want)):
        close(f"{name}[{i}]", g, w, tol)


def grads(module):
    return [p.grad for p in module.parameters()]


def raises_like_torch(ref_call, fb_call, also=()):
    """torch.nn raises: fastbptt must raise too (PyTorch's type, or a ValueError/TypeError of its own)."""
    with pytest.raises(Exception) as want:
        ref_call()
    with pytest.raises((type(want.value), ValueError, TypeError, RuntimeError) + tuple(also)):
        fb_call()
    return want.value


# ---------------------------------------------------------------- 1. parameters through PyTorch's other doors

@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_functional_call_uses_the_tensors_it_is_given(cell):
    """torch.func.functional_call(module, params, x): the given tensors are the parameters of that
    call (MAML, per-sample gradients, ensembles); the module's own are untouched and used after.
    (torch.nn.RNNBase notices the swap in _update_flat_weights; the swap bypasses __setattr__.)"""
    ref, fb = pair(cell, num_layers=2)
    x = rnd(5, 3, 3, seed=1)
    other = {n: rnd(*p.shape, seed=10 + i, scale=0.4) for i, (n, p) in enumerate(ref.named_parameters())}
    got = []
    for m in (ref, fb):
        params = {n: t.clone().requires_grad_() for n, t in other.items()}
        res = torch.func.functional_call(m, params, (x,))
        g = torch.autograd.grad(weighted(res), list(params.values()))
        got.append((tensors(res), list(g)))
    close_all("outputs with the given parameters", got[1][0], got[0][0])
    close_all("gradients of the given parameters", got[1][1], got[0][1])
    with torch.no_grad():
        close_all("own parameters afterwards", tensors(fb(x)), tensors(ref(x)))


def test_functional_call_leaves_the_callers_tensors_alone():
    """The tensors given to functional_call are the caller's: still views of the caller's vector
    after the call, so that an in-place update of that vector is what the next call uses."""
    x = rnd(5, 3, 3, seed=1)
    got = []
    for m in pair("GRU"):
        vec = rnd(sum(p.numel() for p in m.parameters()), seed=2, scale=0.4)
        params, at = {}, 0
        for n, p in m.named_parameters():
            params[n] = vec[at:at + p.numel()].view(p.shape)
            at += p.numel()
        where = [t.data_ptr() for t in params.values()]
        first = torch.func.functional_call(m, params, (x,))[0]
        assert [t.data_ptr() for t in params.values()] == where, "the caller's tensors were moved"
        with torch.no_grad():
            vec.mul_(0.5)
        got.append([first, torch.func.functional_call(m, params, (x,))[0]])
    close_all("calls before and after the vector's update", got[1], got[0])


class _Scaled(nn.Module):
    """A parametrization whose value changes between calls (as weight drop's masks do)."""

    k = 1.0

    def forward(self, w):
        return w * self.k


@pytest.mark.parametrize("how", ["parametrization, two calls in one graph",
                                 "parametrization, a no_grad call before the backward",
                                 "functional_call of computed weights, three calls in one graph"])
def test_computed_weights_of_several_calls_in_one_graph(how):
    """Weights computed at each call (a parametrization such as AWD-LSTM's weight drop, or a
    hypernetwork's output through functional_call), different at each call, several calls
    before one backward: each call's backward uses the weights that call saw."""
    x = rnd(5, 2, 3, seed=1)
    got = []
    for m in pair("GRU"):
        if how.startswith("parametrization"):
            torch.nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", _Scaled())
            scale = m.parametrizations.weight_hh_l0[0]
            scale.k = 1.0
            first = m(x)
            scale.k = 2.0
            if "no_grad" in how:
                with torch.no_grad():
                    m(x)
                total = weighted(first)
            else:
                total = weighted(first) + weighted(m(x), seed=8)
            total.backward()
            got.append(grads(m))
        else:
            base = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}
            total = 0
            for i, k in enumerate((1.0, 0.5, -0.7)):
                params = {n: b * k for n, b in base.items()}
                total = total + weighted(torch.func.functional_call(m, params, (x,)), seed=i)
            total.backward()
            got.append([b.grad for b in base.values()])
    close_all(how, got[1], got[0])


@pytest.mark.parametrize("how", ["register_parameter", "_parameters"])
def test_parameter_registered_without_setattr_is_used(how):
    """A parameter put in place without module.__setattr__ (register_parameter after del, or the
    _parameters dict, as torch.nn.utils.parametrize and stateless tools do) is what the next call uses."""
    ref, fb = pair("GRU", 4, 4)
    x = rnd(5, 3, 4, seed=1)
    for m in (ref, fb):
        m(x)                                        # a first call: the module has seen its parameters
        new = nn.Parameter(rnd(12, 4, seed=3, scale=0.5))
        if how == "register_parameter":
            del m.weight_hh_l0
            m.register_parameter("weight_hh_l0", new)
        else:
            m._parameters["weight_hh_l0"] = new
    res = []
    for m in (ref, fb):
        r = m(x)
        weighted(r).backward()
        res.append(r)
    close_all("outputs", tensors(res[1]), tensors(res[0]))
    close_all("grads", grads(fb), grads(ref))


@pytest.mark.parametrize("tie", ["weight_hh_l0=weight_hh_l1", "weight_ih_l1=weight_hh_l1", "rnn bias_ih_l0=bias_hh_l0"])
def test_weights_tied_within_one_module_follow_the_optimizer(tie):
    """One Parameter object at two places of one module: every optimizer step must reach both uses."""
    cell = "RNN" if tie.startswith("rnn") else "LSTM"
    ref, fb = pair(cell, 4, 4, num_layers=2)
    a, b = tie.split()[-1].split("=")
    x = rnd(5, 3, 4, seed=1)
    for m in (ref, fb):
        setattr(m, a, getattr(m, b))
        assert len(list(m.parameters())) == len(m._flat_weights_names) - 1
    opts = [torch.optim.SGD(m.parameters(), lr=0.3) for m in (ref, fb)]
    for step in range(3):
        res = []
        for m, o in zip((ref, fb), opts):
            o.zero_grad()
            r = m(x)
            weighted(r, seed=step).backward()
            o.step()
            res.append(r)
        close_all(f"step {step} outputs", tensors(res[1]), tensors(res[0]))
        close_all(f"step {step} parameters", list(fb.parameters()), list(ref.parameters()))


def test_weights_tied_across_two_modules():
    """Two modules sharing one Parameter (an encoder's and a decoder's recurrent weight), Adam on both."""
    r1, f1 = pair("GRU", 4, 4, seed=0)
    r2, f2 = pair("GRU", 4, 4, seed=1)
    x = rnd(5, 3, 4, seed=2)
    outs = []
    for a, b in ((r1, r2), (f1, f2)):
        b.weight_hh_l0 = a.weight_hh_l0
        params = list({id(p): p for p in [*a.parameters(), *b.parameters()]}.values())
        opt = torch.optim.Adam(params, lr=0.1)
        for step in range(3):
            opt.zero_grad()
            weighted(b(a(x)[0]), seed=step).backward()
            opt.step()
        with torch.no_grad():
            outs.append(tensors(b(a(x)[0])) + list(a.parameters()) + list(b.parameters()))
    close_all("after 3 Adam steps", outs[1], outs[0], 1e-9)


class _FirstRow(nn.Module):
    """A parametrization of the wrong shape (registered with unsafe=True)."""

    def forward(self, w):
        return w[:1]


@pytest.mark.parametrize("how", ["Parameter", ".data", "bias", "sliced .data (same pointer and strides)",
                                 "parametrization", "None"])
def test_parameter_of_the_wrong_shape_raises_like_torch(how):
    """A parameter replaced by one of another shape (or None): torch.nn raises; fastbptt must raise,
    not run over the neighbouring parameters' memory (nor broadcast a row, nor keep using the
    rows a slice left out), and must leave the caller's tensor as it was."""
    ref, fb = pair("GRU", 3, 4, num_layers=2)
    x = rnd(5, 3, 3, seed=1)
    new = {}
    for name, m in (("ref", ref), ("fb", fb)):
        m(x)                                        # a first call: the module has seen its parameters
        if how == "Parameter":
            m.weight_hh_l0 = nn.Parameter(rnd(12, 5, seed=2))
        elif how == ".data":
            m.weight_hh_l0.data = rnd(12, 5, seed=2)
        elif how == "bias":
            m.bias_hh_l0.data = rnd(11, seed=2)
        elif how.startswith("sliced"):
            m.weight_hh_l0.data = m.weight_hh_l0.data[:6]
        elif how == "parametrization":
            torch.nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", _FirstRow(), unsafe=True)
        else:
            m.weight_hh_l0 = None
        w = m.bias_hh_l0 if how == "bias" else m.weight_hh_l0
        new[name] = None if w is None else w.detach().clone()
    raises_like_torch(lambda: ref(x), lambda: fb(x))
    if how not in ("None", "parametrization"):
        w = fb.bias_hh_l0 if how == "bias" else fb.weight_hh_l0
        assert torch.equal(w.detach(), new["fb"]), "the caller's parameter was overwritten"


def test_share_memory_keeps_parameters_shared():
    """module.share_memory() (Hogwild): the parameters stay in shared memory through calls."""
    ref, fb = pair("LSTM", num_layers=2)
    x = rnd(5, 3, 3, seed=1)
    for m in (ref, fb):
        m.share_memory()
        weighted(m(x)).backward()
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        m(x)
    assert all(p.is_shared() for p in ref.parameters())
    assert all(p.is_shared() for p in fb.parameters()), \
        [n for n, p in fb.named_parameters() if not p.is_shared()]


def test_hogwild_child_updates_reach_the_parent():
    """What a 'spawn'/'forkserver' child of torch.multiprocessing receives (ForkingPickler, here
    unpickled in this process): its in-place updates are the parent's parameters, as with torch.nn."""
    x = rnd(5, 3, 3, seed=1)
    for m in pair("GRU"):
        m.share_memory()
        with torch.no_grad():
            before = m(x)[0].clone()
        buf = io.BytesIO()
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(m)
        child = pickle.loads(buf.getvalue())
        with torch.no_grad():
            child(x)                                # the child calls it, then updates in place
            for p in child.parameters():
                p.mul_(0.5)
            after = m(x)[0]
        assert not torch.equal(before, after), f"{type(m).__module__}: the child's update is lost"


# ---------------------------------------------------------------- 2. autograd beyond the first derivative

@pytest.mark.parametrize("wrt", ["parameters", "input"])
def test_gradient_penalty_through_autograd_grad_raises_or_exact(wrt):
    """A gradient penalty differentiated with torch.autograd.grad (WGAN-GP, MAML): torch.nn gives
    the second-order terms; fastbptt must give them or raise — never drop them silently.
    (loss.backward() raises already; autograd.grad only walks paths to what it is asked for.)"""
    got = []
    for m in pair("GRU"):
        x = rnd(5, 2, 3, seed=1, grad=True)
        out, h = m(x)
        targets = list(m.parameters()) if wrt == "parameters" else [x]
        try:
            g, = torch.autograd.grad(weighted((out, h)), x, create_graph=True)
            penalty = g.square().sum() + out.sum()
            got.append(torch.autograd.grad(penalty, targets))
        except RuntimeError as e:
            assert isinstance(m, ft.GRU), e
            assert "double backward" in str(e) or "create_graph" in str(e), e
            return
    close_all(f"∂penalty/∂{wrt}", got[1], got[0])


@pytest.mark.parametrize("transform", ["func.grad", "func.jacrev", "func.jvp", "forward_ad"])
def test_torch_func_transforms_as_torch(transform):
    """torch.func's transforms and forward-mode AD run torch.nn's RNNs; a drop-in gives the same
    (by running PyTorch's implementation under them, as it does for other dtypes)."""
    import torch.autograd.forward_ad as fwad
    x = rnd(4, 2, 3, seed=1)
    v = rnd(4, 2, 3, seed=2)
    got = []
    for m in pair("LSTM"):
        params = {n: p.detach().clone() for n, p in m.named_parameters()}
        if transform == "func.grad":
            r = list(torch.func.grad(lambda p: weighted(torch.func.functional_call(m, p, (x,))))(params).values())
        elif transform == "func.jacrev":
            r = [torch.func.jacrev(lambda t: m(t)[0][-1])(x)]
        elif transform == "func.jvp":
            r = list(torch.func.jvp(lambda t: m(t)[0], (x,), (v,)))
        else:
            with fwad.dual_level():
                out = m(fwad.make_dual(x, v))[0]
                r = [fwad.unpack_dual(out).primal.clone(), fwad.unpack_dual(out).tangent.clone()]
        got.append(r)
    close_all(transform, got[1], got[0])


# ---------------------------------------------------------------- 3. inputs

@pytest.mark.parametrize("cell, what", [(c, w) for c in CELLS for w in ("+inf", "-inf", "nan", "1e300", "nan h0")]
                         + [("LSTM", "inf c0")])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_and_huge_values_propagate_like_torch(cell, what):
    """Outputs, final states and every gradient: the same values, NaNs and infinities as torch.nn."""
    res = []
    for m in pair(cell, num_layers=2):
        x, h, c = rnd(5, 3, 3, seed=1), rnd(2, 3, 4, seed=2), rnd(2, 3, 4, seed=3)
        if what == "1e300":
            x = x * 1e300
        elif what == "nan h0":
            h[0, 1, 2] = float("nan")
        elif what == "inf c0":
            c[1, 0, 0] = float("inf")
        else:
            x[2, 1, 0] = float(what)
        leaves = [t.requires_grad_() for t in (x, h, c)]
        r = m(x, (h, c) if cell == "LSTM" else h)
        weighted(r).backward()
        res.append(tensors(r) + [t.grad for t in leaves] + grads(m))
    close_all(what, res[1], res[0])


@pytest.mark.parametrize("strict", ["np.errstate(all='raise')", "warnings as errors"])
def test_inf_input_under_strict_numpy_and_warning_settings(strict):
    """A caller's np.seterr(all='raise') or -W error (common in test suites) is not a reason for a
    torch module to raise on an infinite input: torch.nn propagates it; so must fastbptt."""
    res = []
    for m in pair("GRU"):
        x = rnd(5, 3, 3, seed=1)
        x[2, 1, 0] = float("inf")
        x.requires_grad_()
        with np.errstate(all="raise") if strict.startswith("np") else warnings.catch_warnings():
            if strict.startswith("warnings"):
                warnings.simplefilter("error")
            r = m(x)
            weighted(r).backward()
        res.append(tensors(r) + [x.grad] + grads(m))
    close_all(strict, res[1], res[0])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", ["T1", "B1", "T1B1", "packed one of length 1", "unbatched T1"])
def test_tiny_shapes(cell, shape):
    res = []
    for m in pair(cell, num_layers=2, bidirectional=True):
        T, B = {"T1": (1, 3), "B1": (4, 1), "T1B1": (1, 1)}.get(shape, (1, 1))
        x = rnd(T, B, 3, seed=1, grad=True) if shape != "unbatched T1" else rnd(1, 3, seed=1, grad=True)
        inp = pack_padded_sequence(x, torch.tensor([1]), enforce_sorted=False) if shape.startswith("packed") else x
        r = m(inp)
        weighted(r).backward()
        res.append(tensors(r) + [x.grad] + grads(m))
    close_all(shape, res[1], res[0])


def test_empty_batch_with_hx_and_backward_as_torch():
    res = []
    for m in pair("LSTM", num_layers=2):
        x = torch.zeros(5, 0, 3, dtype=F64, requires_grad=True)
        h = (torch.zeros(2, 0, 4, dtype=F64, requires_grad=True), torch.zeros(2, 0, 4, dtype=F64))
        r = m(x, h)
        sum(t.sum() for t in tensors(r)).backward()
        res.append(tensors(r) + [x.grad, h[0].grad] + grads(m))
    close_all("B = 0", res[1], res[0])
    ref, fb = pair("GRU")
    raises_like_torch(lambda: ref(torch.zeros(0, 3, dtype=F64)), lambda: fb(torch.zeros(0, 3, dtype=F64)))


@pytest.mark.parametrize("bad", ["float64 into float32", "complex", "hx tuple for a GRU", "hx triple for an LSTM"])
def test_wrong_dtypes_and_hx_forms_raise_like_torch(bad):
    cell = "LSTM" if "LSTM" in bad else "GRU"
    ref, fb = pair(cell)
    x = rnd(5, 3, 3, seed=1)
    hx = None
    if bad == "float64 into float32":
        ref.float()
        fb.float()
    elif bad == "complex":
        x = x.to(torch.complex128)
    elif bad == "hx tuple for a GRU":
        hx = (rnd(1, 3, 4),)
    else:
        hx = (rnd(1, 3, 4),) * 3
    raises_like_torch(lambda: ref(x, hx), lambda: fb(x, hx), also=(AttributeError,))


def test_lstm_hx_as_a_list_as_torch():
    """torch.nn.LSTM takes hx=[h0, c0] (a list) as well as a tuple."""
    res = []
    for m in pair("LSTM", num_layers=2):
        x, h, c = (rnd(5, 3, 3, seed=1, grad=True), rnd(2, 3, 4, seed=2, grad=True), rnd(2, 3, 4, seed=3, grad=True))
        r = m(x, [h, c])
        weighted(r).backward()
        res.append(tensors(r) + [x.grad, h.grad, c.grad])
    close_all("list hx", res[1], res[0])


@pytest.mark.parametrize("alias", ["hx only needs a gradient", "h0 is c0", "x is hx", "x views a parameter"])
def test_aliased_and_partial_leaves(alias):
    res = []
    for m in pair("LSTM" if alias == "h0 is c0" or alias.startswith("hx") else "GRU", 4, 4):
        extra = []
        if alias == "hx only needs a gradient":
            m.requires_grad_(False)
            x, h = rnd(5, 3, 4, seed=1), rnd(1, 3, 4, seed=2, grad=True)
            r = m(x, (h, rnd(1, 3, 4, seed=3)))
            extra = [h]
        elif alias == "h0 is c0":
            x, h = rnd(5, 3, 4, seed=1, grad=True), rnd(1, 3, 4, seed=2, grad=True)
            r = m(x, (h, h))
            extra = [x, h]
        elif alias == "x is hx":
            t = rnd(1, 3, 4, seed=1, grad=True)
            r = m(t, t)
            extra = [t]
        else:
            r = m(m.weight_hh_l0.view(3, 4, 4))
        weighted(r).backward()
        res.append(tensors(r) + [t.grad for t in extra] + grads(m))
        assert all(r_.requires_grad for r_ in tensors(r))
    close_all(alias, res[1], res[0])


def test_pack_sequence_leaves_get_their_gradients():
    res = []
    for m in pair("GRU", num_layers=2, bidirectional=True):
        seqs = [rnd(n, 3, seed=n, grad=True) for n in (3, 5, 1, 5)]
        r = m(pack_sequence(seqs, enforce_sorted=False))
        weighted(r).backward()
        res.append(tensors(r) + [s.grad for s in seqs] + grads(m))
    close_all("pack_sequence", res[1], res[0])


def _hand_packed(case):
    """(PackedSequence, hx) built by hand from one valid packing of 3 sequences (lengths 2, 5, 3)."""
    x = rnd(5, 3, 3, seed=1)
    p = pack_sequence([x[:2, 0], x[:, 1], x[:3, 2]], enforce_sorted=False)
    hx = (rnd(2, 3, 4, seed=2), rnd(2, 3, 4, seed=3))
    if case == "sorted_indices too short":
        return PackedSequence(p.data, p.batch_sizes, torch.tensor([1, 0]), torch.tensor([1, 0])), hx
    if case == "sorted_indices too long":
        return PackedSequence(p.data, p.batch_sizes, torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 3])), hx
    if case == "batch_sizes increasing":
        return PackedSequence(p.data, torch.tensor([1, 1, 2, 2, 4])), None
    if case == "batch_sizes 2-D":
        return PackedSequence(p.data, p.batch_sizes[None]), None
    if case == "duplicate sorted_indices":
        return PackedSequence(p.data, p.batch_sizes, torch.tensor([1, 1, 0]), torch.tensor([2, 0, 1])), hx
    if case == "batch_sizes int32":
        return PackedSequence(p.data, p.batch_sizes.int(), p.sorted_indices, p.unsorted_indices), hx
    if case == "trailing zero batch size":
        return PackedSequence(p.data, torch.cat([p.batch_sizes, torch.tensor([0])]),
                              p.sorted_indices, p.unsorted_indices), hx
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["sorted_indices too short", "sorted_indices too long", "batch_sizes increasing",
                                  "batch_sizes 2-D"])
def test_hand_built_packed_sequence_refused_like_torch(case):
    """torch.nn raises on these; fastbptt must raise — not clip indices and return states of the
    wrong batch size."""
    ref, fb = pair("LSTM", num_layers=2)
    inp, hx = _hand_packed(case)
    raises_like_torch(lambda: ref(inp, hx), lambda: fb(inp, hx), also=(IndexError,))


@pytest.mark.parametrize("case", ["duplicate sorted_indices", "batch_sizes int32", "trailing zero batch size"])
def test_hand_built_packed_sequence_as_torch_or_refused_clearly(case):
    """Odd but not refused by torch.nn (or refused only for its type): fastbptt gives the result the
    same sequences give torch.nn, or a ValueError/RuntimeError naming batch_sizes."""
    ref, fb = pair("LSTM", num_layers=2)
    inp, hx = _hand_packed(case)
    canon = PackedSequence(inp.data, inp.batch_sizes.long(), inp.sorted_indices, inp.unsorted_indices)
    want = ref(canon, hx)
    try:
        got = fb(inp, hx)
    except (ValueError, RuntimeError) as e:
        assert "batch_sizes" in str(e) or "Long" in str(e), e
        return
    close_all(case, tensors(got), tensors(want))


def test_tensor_subclass_input_as_torch():
    class Tagged(torch.Tensor):
        pass

    res = []
    for m in pair("GRU"):
        x = rnd(5, 3, 3, seed=1).as_subclass(Tagged).requires_grad_()
        r = m(x)
        weighted(r).backward()
        res.append((type(r[0]), tensors(r) + [x.grad] + grads(m)))
    assert res[1][0] is res[0][0]
    close_all("subclass", res[1][1], res[0][1])


def test_inference_tensor_input_raises_like_torch():
    with torch.inference_mode():
        x = rnd(5, 3, 3, seed=1)
    ref, fb = pair("GRU")
    err = raises_like_torch(lambda: ref(x), lambda: fb(x))
    assert "Inference tensors" in str(err)


# ---------------------------------------------------------------- 4. parameters changing under a graph

@pytest.mark.parametrize("opt", ["SGD", "SGD-loop", "Adam-foreach", "RMSprop"])
@pytest.mark.parametrize("cell", ["RNN", "LSTM"])
def test_optimizer_step_between_forward_and_backward_raises_like_torch(opt, cell):
    """torch.nn refuses a backward after optimizer.step() changed the weights the forward saved."""
    make = {"SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "SGD-loop": lambda p: torch.optim.SGD(p, lr=0.1, foreach=False),
            "Adam-foreach": lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
            "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.1)}[opt]
    for m in pair(cell, num_layers=2):
        o = make(m.parameters())
        weighted(m(rnd(5, 3, 3, seed=1))).backward()
        out = m(rnd(5, 3, 3, seed=2))
        o.step()
        with pytest.raises(RuntimeError, match="inplace operation"):
            weighted(out).backward()


def test_zero_grad_keeping_tensors_accumulates_in_place_as_torch():
    """zero_grad(set_to_none=False), then three backwards: the same .grad tensors, summed as torch.nn's."""
    res = []
    for m in pair("RNN", num_layers=2, bidirectional=True):
        weighted(m(rnd(5, 3, 3, seed=0))).backward()
        m.zero_grad(set_to_none=False)
        held = [p.grad for p in m.parameters()]
        for i in range(3):
            weighted(m(rnd(5, 3, 3, seed=1 + i)), seed=i).backward()
        assert all(p.grad is g for p, g in zip(m.parameters(), held)), "a .grad tensor was replaced"
        res.append(held)
    close_all("accumulated", res[1], res[0])


# ---------------------------------------------------------------- 5. graphs and workspaces

def test_graphs_held_then_dropped_give_their_workspaces_back():
    _, fb = pair("LSTM", num_layers=2)
    cache = fb.workspaces
    x = rnd(5, 3, 3, seed=1, grad=True)
    for _ in range(200):                            # graphs dropped at once, never backward
        out = fb(x)
        del out
    assert cache.made == 1 and len(cache) == 1
    for _ in range(10):                             # three graphs held at once, then dropped
        held = [fb(x) for _ in range(3)]
        del held
    assert cache.made == 3 and len(cache) == 3, cache
    for B in range(4, 104):                         # 100 new shapes (each B its own workspace): in bounds
        fb(rnd(5, B, 3, seed=B, grad=True))
        assert len(cache) <= cache.max_count and cache.nbytes <= cache.max_bytes
    assert cache.made == 103, cache


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_as_torch(reentrant):
    """torch.utils.checkpoint recomputes the forward in the backward pass (with dropout: the
    same RNG state)."""
    res = []
    for m in pair("LSTM", num_layers=2, dropout=0.0):
        x = rnd(5, 3, 3, seed=1, grad=True)
        out = torch.utils.checkpoint.checkpoint(lambda t: m(t)[0], x, use_reentrant=reentrant)
        weighted(out).backward()
        res.append([out, x.grad] + grads(m))
    close_all("checkpoint", res[1], res[0])


def test_deepcopy_and_pickle_while_a_graph_is_held():
    """A copy taken between a forward and its backward (another shape's workspace idle in the
    cache): the original's backward is still right, and no workspace, held or idle, is copied."""
    ref, fb = pair("GRU", num_layers=2, bidirectional=True)
    x = rnd(50, 8, 3, seed=1, grad=True)
    size0 = len(pickle.dumps(fb))
    weighted(fb(rnd(40, 8, 3, seed=2, grad=True))).backward()
    fb.zero_grad(set_to_none=True)
    assert len(fb.workspaces) == 1
    res = []
    for m in (ref, fb):
        xm = x.detach().clone().requires_grad_()
        r = m(xm)
        c1, c2 = copy.deepcopy(m), pickle.loads(pickle.dumps(m))
        if m is fb:
            assert len(pickle.dumps(m)) == size0, "pickling carries workspaces"
            assert len(c1.workspaces) == 0 and len(c2.workspaces) == 0
        for c in (c1, c2):
            with torch.no_grad():
                for p in c.parameters():
                    p.mul_(0.5)
            weighted(c(xm.detach())).backward()
        weighted(r).backward()
        res.append(tensors(r) + [xm.grad] + grads(m) + tensors(c1(xm.detach())))
    close_all("original after copies", res[1], res[0])


@pytest.mark.parametrize("damage", ["missing key", "unexpected key", "wrong shape", "wrong layer count"])
def test_damaged_state_dict_raises_torchs_error(damage):
    ref, fb = pair("LSTM", num_layers=2)
    sd = dict(pair("LSTM", num_layers=2, seed=5)[0].state_dict())      # other values
    if damage == "missing key":
        del sd["bias_hh_l1"]
    elif damage == "unexpected key":
        sd["weight_hh_l2"] = sd["weight_hh_l1"]
    elif damage == "wrong shape":
        sd["weight_ih_l0"] = sd["weight_ih_l0"][:, :2]
    else:
        sd = pair("LSTM", num_layers=1)[0].state_dict()
    err = raises_like_torch(lambda: ref.load_state_dict(sd), lambda: fb.load_state_dict(sd))
    with pytest.raises(type(err)) as got:
        fb.load_state_dict(sd)
    assert str(got.value) == str(err)
    # torch.nn copies the keys it can before it raises: the same parameters, used by the next call
    close_all("parameters after a refused load", list(fb.parameters()), list(ref.parameters()), 0)
    x = rnd(5, 3, 3, seed=1)
    with torch.no_grad():
        close_all("a call after a refused load", tensors(fb(x)), tensors(ref(x)))


def test_meta_device_then_to_empty_and_reset_parameters():
    """Build on the meta device, materialize with to_empty(), initialize: as torch.nn."""
    res = []
    for cls in (nn.LSTM, ft.LSTM):
        m = cls(3, 4, num_layers=2, device="meta", dtype=F64)
        m.to_empty(device="cpu")
        torch.manual_seed(3)
        m.reset_parameters()
        x = rnd(5, 3, 3, seed=1, grad=True)
        r = m(x)
        weighted(r).backward()
        res.append(tensors(r) + [x.grad] + grads(m))
    close_all("meta → cpu", res[1], res[0])


# ---------------------------------------------------------------- 6. threads and processes

def test_threads_on_a_module_whose_first_call_rebuilds_its_buffer():
    """Eight threads released at once (a barrier), on a module whose parameter was just replaced
    (so the first calls rebuild the shared buffer concurrently), with packed and dense batches of
    two shapes, three rounds each: every round of every thread gets the serial results."""
    ref, fb = pair("LSTM", num_layers=2, bidirectional=True)
    new = rnd(16, 4, seed=9, scale=0.5)
    for m in (ref, fb):
        m.weight_hh_l1 = nn.Parameter(new.clone())
    T = 40
    jobs = [(rnd(T, 3 + i % 2, 3, seed=i), None if i % 2 else [T, 2, 25, 1][: 3 + i % 2]) for i in range(8)]

    def run(m, x, lengths):
        x = x.detach().clone().requires_grad_()
        inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        r = m(inp)
        return tensors(r) + list(torch.autograd.grad(weighted(r), [x, *m.parameters()]))

    want = [run(ref, *j) for j in jobs]
    got, errors = [[] for _ in jobs], []
    barrier = threading.Barrier(len(jobs))

    def work(i):
        try:
            barrier.wait(timeout=30)
            for _ in range(3):
                got[i].append(run(fb, *jobs[i]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(len(jobs)):
        for k, res in enumerate(got[i]):
            close_all(f"thread {i} round {k}", res, want[i])


def _child_run(module, x, queue):
    out, h = module(x)
    g = torch.autograd.grad(weighted((out, h)), [x, *module.parameters()])
    queue.put([out.detach().numpy(), h.detach().numpy()] + [t.numpy() for t in g])


@pytest.mark.parametrize("parallel", [False, True])
def test_forked_child_gets_the_parents_results(parallel):
    """A process forked after the module ran (multiprocessing's fork context) computes the same."""
    _, fb = pair("GRU", num_layers=2, fbkw=dict(method="fused", parallel=parallel))
    x = rnd(6, 5, 3, seed=1, grad=True)
    out, h = fb(x)
    want = [out, h] + list(torch.autograd.grad(weighted((out, h)), [x, *fb.parameters()]))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_run, args=(fb, x, queue))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc.start()
        try:
            got = queue.get(timeout=60)
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert proc.exitcode == 0
    close_all("child", [torch.from_numpy(a) for a in got], [t.detach() for t in want], 0)


def test_a_workspace_cache_assigned_is_the_one_used():
    """module.workspaces = WorkspaceCache(...) takes effect (the newcomer's finding: it was ignored)."""
    m = ft.GRU(4, 8)
    cache = ft.WorkspaceCache(max_count=1)
    m.workspaces = cache
    with torch.no_grad():
        for T in (3, 4, 5):
            m(torch.randn(T, 2, 4))
    assert m.workspaces is cache and cache.made == 3 and len(cache) == 1
    with pytest.raises(TypeError, match="WorkspaceCache"):
        m.workspaces = {}


def test_extras_checked_when_set():
    m = ft.LSTM(3, 4)
    with pytest.raises(TypeError, match="parallel must be a bool"):
        m.parallel = "yes"
    with pytest.raises(ValueError, match="method must be"):
        m.method = "bogus"
    m.method, m.parallel = "blas", True
    assert (m.method, m.parallel) == ("blas", True)


def test_lstm_hx_not_a_pair_gets_torchs_exception():
    x, hx = torch.randn(3, 2, 4), torch.zeros(2, 2, 5)
    errors = []
    for m in (torch.nn.LSTM(4, 5), ft.LSTM(4, 5)):
        with pytest.raises(Exception) as e:
            m(x, hx)
        errors.append(type(e.value))
    assert errors[0] is errors[1]
