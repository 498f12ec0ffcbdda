"""fastbptt.torch (issue 10) against torch.nn: equivalence, autograd, parameters, modes, errors, optimizers.

The oracle is PyTorch's own ``nn.RNN``/``nn.GRU``/``nn.LSTM`` holding the same ``state_dict``
(loaded one way or the other): outputs, final states and the gradients of every parameter, of
the input and of ``hx`` agree to 1e-10 in float64 (relative to the largest magnitude of the
expected tensor, at least 1). ``torch.autograd.gradcheck`` is the second, independent oracle.
The loss is a random weighted sum of every output (``loss_of``), so that each output gets a
gradient of its own.

Numba compiles once per dtype, cell and method (and keeps it on disk): the random sweep uses
small sizes and reuses those; a few realistic sizes (T=50, B=37, H=64) run once each.
"""

import copy
import io
import pickle
import shutil
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence  # noqa: E402

import fastbptt.torch as ft  # noqa: E402

F64, F32 = torch.float64, torch.float32
TOL64, TOL32 = 1e-10, 1e-4
CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
MODES = ("dense", "unbatched", "packed_sorted", "packed_unsorted")
METHODS = ("auto", "fused", "blas")
ROOT = Path(__file__).resolve().parents[1]

# torch.nn warns about dropout > 0 with one layer; the tests build such modules on purpose
pytestmark = pytest.mark.filterwarnings("ignore:dropout option adds dropout after all but last")


# ---------------------------------------------------------------- building pairs of modules

def classes(cell):
    """(torch.nn class, fastbptt.torch class, extra constructor arguments) of a cell's name."""
    if cell.startswith("rnn"):
        return nn.RNN, ft.RNN, {"nonlinearity": cell[4:]}
    return getattr(nn, cell.upper()), getattr(ft, cell.upper()), {}


def randomize(module, seed, gain=None):
    """Draw every parameter from N(0, (gain/√H)²) with a seeded NumPy generator (in place)."""
    rng = np.random.default_rng(seed)
    gain = gain or (0.9 if getattr(module, "nonlinearity", "") == "relu" else 1.3)
    scale = gain / np.sqrt(module.hidden_size)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.normal(0.0, scale, size=tuple(p.shape))))


def build(cell, D, H, *, L=1, bidir=False, bias=True, batch_first=False, dropout=0.0, dtype=F64, seed=0,
          load="into_fb", **fbkw):
    """A torch.nn module and a fastbptt.torch one with the same random parameters: (ref, fb).

    load="into_fb" draws the torch.nn module's parameters and loads its state_dict into fb;
    "into_ref" draws fb's and loads them into the torch.nn module.
    """
    tcls, fcls, extra = classes(cell)
    kw = dict(num_layers=L, bias=bias, batch_first=batch_first, dropout=dropout, bidirectional=bidir,
              dtype=dtype, **extra)
    ref, fb = tcls(D, H, **kw), fcls(D, H, **kw, **fbkw)
    src, dst = (ref, fb) if load == "into_fb" else (fb, ref)
    randomize(src, seed)
    dst.load_state_dict(src.state_dict())
    return ref, fb


# ---------------------------------------------------------------- batches, calls, losses

def make_batch(cell, T, B, D, H, L, dirs, *, mode="dense", batch_first=False, hx=True, dtype=F64, seed=0,
               x_grad=True, h_grad=(True, True)):
    """(x, hx, lengths): leaves of the input and the initial state, and the lengths of a packed batch.

    mode: "dense", "unbatched" ((T, D) input), "packed_sorted" (lengths descending) or
    "packed_unsorted". hx is None, a tensor, or (h0, c0) for the LSTM.
    """
    rng = np.random.default_rng(seed + 1000)

    def leaf(shape, grad):
        return torch.from_numpy(rng.normal(size=shape)).to(dtype).requires_grad_(grad)

    if mode == "unbatched":
        x, state = leaf((T, D), x_grad), (L * dirs, H)
    else:
        x, state = leaf((B, T, D) if batch_first else (T, B, D), x_grad), (L * dirs, B, H)
    h = None
    if hx:
        h = (leaf(state, h_grad[0]), leaf(state, h_grad[1])) if cell == "lstm" else leaf(state, h_grad[0])
    lengths = None
    if mode.startswith("packed"):
        lengths = rng.integers(1, T + 1, size=B)
        if mode == "packed_sorted":
            lengths = np.sort(lengths)[::-1].copy()
    return x, h, lengths


def fresh(x, h):
    """Copies of the leaves (each module gets its own, so their gradients do not add up)."""
    def c(t):
        return t.detach().clone().requires_grad_(t.requires_grad)
    return c(x), (None if h is None else tuple(map(c, h)) if isinstance(h, tuple) else c(h))


def call(module, x, h=None, lengths=None, *, sorted_=False, pass_none=False):
    """module(input[, hx]) with the input packed from x when lengths are given."""
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=module.batch_first,
                                   enforce_sorted=sorted_)
    if h is None:
        return module(inp, None) if pass_none else module(inp)
    return module(inp, h)


def flat_outputs(result):
    """[output tensor (a PackedSequence's data), h_n (, c_n)] of a forward pass."""
    out, state = result
    data = out.data if isinstance(out, PackedSequence) else out
    return [data] + (list(state) if isinstance(state, tuple) else [state])


def loss_of(result, seed=7):
    """A random weighted sum of every output: each output gets its own nonzero gradient."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for t in flat_outputs(result):
        total = total + (t * torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype)).sum()
    return total


# ---------------------------------------------------------------- comparisons

def assert_close(name, got, want, tol):
    """max|got - want| <= tol · max(1, max|want|), same shape and dtype; NaNs must be where want has them."""
    if want is None or got is None:
        assert got is None and want is None, f"{name}: got {got is not None}, expected {want is not None}"
        return
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    g, w = got.detach().double(), want.detach().double()
    nan = torch.isnan(w)
    assert torch.equal(torch.isnan(g), nan), f"{name}: NaNs at other positions than torch.nn's"
    g, w = g[~nan], w[~nan]
    if w.numel() == 0:
        return
    scale = max(1.0, w.abs().max().item())
    err = (g - w).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} exceeds {tol:.0e} x {scale:.3g}"


def assert_same_results(got, want, tol, what=""):
    """Two forward results: the same structure (PackedSequence, tuple states) and close tensors."""
    (gout, gstate), (wout, wstate) = got, want
    assert isinstance(gout, PackedSequence) == isinstance(wout, PackedSequence), f"{what}output type"
    if isinstance(wout, PackedSequence):
        assert torch.equal(gout.batch_sizes, wout.batch_sizes), f"{what}batch_sizes"
        for field in ("sorted_indices", "unsorted_indices"):
            g, w = getattr(gout, field), getattr(wout, field)
            assert (g is None) == (w is None) and (w is None or torch.equal(g, w)), f"{what}{field}"
    assert isinstance(gstate, tuple) == isinstance(wstate, tuple), f"{what}state type"
    for name, g, w in zip(("output", "h_n", "c_n"), flat_outputs(got), flat_outputs(want)):
        assert_close(what + name, g, w, tol)
        assert g.requires_grad == w.requires_grad, f"{what}{name}.requires_grad"


def assert_same_grads(ref, fb, tol, leaves_ref=(), leaves_fb=(), what=""):
    """Every parameter's .grad (same names, same order) and each leaf's .grad are close."""
    rp, fp = list(ref.named_parameters()), list(fb.named_parameters())
    assert [n for n, _ in fp] == [n for n, _ in rp]
    for (name, r), (_, f) in zip(rp, fp):
        assert_close(f"{what}{name}.grad", f.grad, r.grad, tol)
    for i, (r, f) in enumerate(zip(leaves_ref, leaves_fb)):
        if r is not None:
            assert_close(f"{what}leaf {i}.grad", f.grad, r.grad, tol)


def leaves(x, h):
    return [x] + (list(h) if isinstance(h, tuple) else [h])


def check_against_torch(cell, *, T, B, D, H, L=1, bidir=False, bias=True, batch_first=False, mode="dense",
                        hx=True, dtype=F64, tol=TOL64, seed=0, load="into_fb", x_grad=True, h_grad=(True, True),
                        pass_none=False, fbkw=None, attrs=None):
    """Build a pair, run forward and backward of loss_of on each, compare everything; return (ref, fb)."""
    ref, fb = build(cell, D, H, L=L, bidir=bidir, bias=bias, batch_first=batch_first, dtype=dtype, seed=seed,
                    load=load, **(fbkw or {}))
    for k, v in (attrs or {}).items():
        setattr(fb, k, v)
    x, h, lengths = make_batch(cell, T, B, D, H, L, 2 if bidir else 1, mode=mode, batch_first=batch_first,
                               hx=hx, dtype=dtype, seed=seed, x_grad=x_grad, h_grad=h_grad)
    results, all_leaves = [], []
    for m in (ref, fb):
        xm, hm = fresh(x, h)
        res = call(m, xm, hm, lengths, sorted_=mode == "packed_sorted", pass_none=pass_none)
        loss_of(res).backward()
        results.append(res)
        all_leaves.append(leaves(xm, hm))
    assert_same_results(results[1], results[0], tol)
    assert_same_grads(ref, fb, tol, all_leaves[0], all_leaves[1])
    return ref, fb


# ---------------------------------------------------------------- 1. equivalence with torch.nn

def sweep_cases(n_rounds=2, seed=2024):
    """Random configurations: every cell in every input mode, n_rounds times, the rest drawn."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n_rounds):
        for cell in CELLS:
            for mode in MODES:
                cases.append(dict(
                    cell=cell, mode=mode, T=int(rng.integers(1, 7)), B=int(rng.integers(1, 6)),
                    D=int(rng.integers(1, 5)), H=int(rng.integers(1, 6)), L=int(rng.integers(1, 4)),
                    bidir=bool(rng.integers(2)), bias=bool(rng.integers(2)), batch_first=bool(rng.integers(2)),
                    hx=bool(rng.integers(2)), x_grad=bool(rng.random() < 0.8),
                    h_grad=(bool(rng.random() < 0.8), bool(rng.random() < 0.8)),
                    method=str(rng.choice(METHODS)), how=str(rng.choice(["kw", "attr"])),
                    load=str(rng.choice(["into_fb", "into_ref"])), pass_none=bool(rng.integers(2)),
                    seed=int(rng.integers(1 << 30))))
    return cases


SWEEP = sweep_cases()


def case_id(c):
    return (f"{c['cell']}-{c['mode']}-T{c['T']}B{c['B']}D{c['D']}H{c['H']}L{c['L']}"
            f"{'-bi' if c['bidir'] else ''}{'' if c['bias'] else '-nobias'}{'-bf' if c['batch_first'] else ''}"
            f"{'-hx' if c['hx'] else ''}-{c['method']}-{c['how']}")


def test_sweep_covers_every_option():
    """The random sweep below draws every value of every option (else it tests less than it says)."""
    for key in ("L", "bidir", "bias", "batch_first", "hx", "x_grad", "method", "how", "load", "pass_none"):
        seen = {str(c[key]) for c in SWEEP}
        want = {"L": {"1", "2", "3"}, "method": set(METHODS), "how": {"kw", "attr"},
                "load": {"into_fb", "into_ref"}}.get(key, {"True", "False"})
        assert seen == want, f"{key}: the sweep draws only {seen}"
    assert any(c["T"] == 1 for c in SWEEP) and any(c["B"] == 1 for c in SWEEP)
    assert any(c["cell"] == "lstm" and c["hx"] and False in c["h_grad"] for c in SWEEP)


@pytest.mark.parametrize("case", SWEEP, ids=case_id)
def test_random_configuration_float64(case):
    c = dict(case)
    method, how = c.pop("method"), c.pop("how")
    fbkw, attrs = ({"method": method}, None) if how == "kw" else (None, {"method": method})
    _, fb = check_against_torch(**c, fbkw=fbkw, attrs=attrs)
    assert fb.method == method


REALISTIC = [
    dict(cell="lstm", L=2, bidir=True, mode="packed_unsorted", hx=True),
    dict(cell="gru", L=1, batch_first=True, mode="dense", hx=False, fbkw={"method": "fused"}),
    dict(cell="rnn_tanh", L=2, mode="packed_sorted", hx=True, fbkw={"method": "blas"}),
    dict(cell="rnn_relu", L=1, bidir=True, batch_first=True, mode="packed_unsorted", hx=False),
]


@pytest.mark.parametrize("case", REALISTIC, ids=lambda c: f"{c['cell']}-{c['mode']}")
def test_realistic_sizes_float64(case):
    check_against_torch(T=50, B=37, D=20, H=64, **case)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", ["dense", "packed_unsorted"])
def test_float32_against_torch_float32(cell, mode):
    check_against_torch(cell, T=7, B=5, D=4, H=6, L=2, bidir=True, mode=mode, dtype=F32, tol=TOL32, seed=3)


def test_float32_realistic_size():
    check_against_torch("lstm", T=50, B=37, D=20, H=64, L=2, mode="packed_unsorted", dtype=F32, tol=TOL32)


@pytest.mark.parametrize("how", ["kw", "attr"])
@pytest.mark.parametrize("mode", ["dense", "packed_unsorted"])
def test_parallel(how, mode):
    fbkw, attrs = ({"parallel": True}, None) if how == "kw" else (None, {"parallel": True})
    _, fb = check_against_torch("lstm", T=6, B=5, D=3, H=4, L=2, bidir=True, mode=mode, fbkw=fbkw, attrs=attrs)
    assert fb.parallel is True


def test_method_and_parallel_defaults_and_bad_values():
    m = ft.GRU(3, 4)
    assert (m.method, m.parallel) == ("auto", False)
    with pytest.raises(ValueError, match="method"):
        ft.LSTM(3, 4, method="fastest")
    bad = ft.LSTM(3, 4)
    try:
        bad.method = "fastest"          # refused here or at the next call, never silently used
    except ValueError:
        return
    with pytest.raises(ValueError, match="method"):
        bad(torch.randn(2, 1, 3))


def test_kernels_run_not_torch(monkeypatch):
    """On CPU float32/float64 the recurrence is fastbptt's: with torch's own RNN ops gone, every
    input form still runs forward and backward (and a float16 module, which must use torch's, fails)."""
    import torch.nn.modules.rnn as rnn_mod

    class NoTorchRNN:
        def __getattr__(self, name):
            if name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
                raise AssertionError(f"torch's _VF.{name} ran instead of fastbptt's kernels")
            return getattr(torch._VF, name)

    monkeypatch.setattr(rnn_mod, "_VF", NoTorchRNN())
    for cell in CELLS:
        for dtype in (F32, F64):
            for mode in MODES:
                _, fb = build(cell, 3, 4, L=2, bidir=True, dtype=dtype, batch_first=mode == "dense")
                x, h, lengths = make_batch(cell, 5, 3, 3, 4, 2, 2, mode=mode, batch_first=mode == "dense",
                                           dtype=dtype)
                loss_of(call(fb, x, h, lengths, sorted_=mode == "packed_sorted")).backward()
                assert x.grad is not None and fb.weight_hh_l1_reverse.grad is not None
    half = ft.GRU(3, 4).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="_VF.gru"):
        half(torch.randn(5, 2, 3, dtype=torch.bfloat16))


# ---------------------------------------------------------------- 2. gradcheck

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", ["dense", "packed_unsorted", "unbatched"])
def test_gradcheck_input_and_hx(cell, mode):
    _, fb = build(cell, 2, 3, L=2, bidir=True, seed=5)
    x, h, lengths = make_batch(cell, 4, 3, 2, 3, 2, 2, mode=mode, seed=5)
    hs = list(h) if isinstance(h, tuple) else [h]

    def f(x, *hs):
        return tuple(flat_outputs(call(fb, x, tuple(hs) if cell == "lstm" else hs[0], lengths)))

    assert torch.autograd.gradcheck(f, (x, *hs))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", ["dense", "packed_unsorted"])
def test_gradcheck_parameters_through_functional_call(cell, mode):
    """torch.func.functional_call swaps in other parameter tensors: they are used and get gradients."""
    _, fb = build(cell, 2, 3, L=2, bidir=mode == "dense", seed=6)
    names = [n for n, _ in fb.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in fb.parameters()]
    x, h, lengths = make_batch(cell, 3, 2, 2, 3, 2, 2 if mode == "dense" else 1, mode=mode, seed=6)

    def f(x, *ps):
        out = torch.func.functional_call(fb, dict(zip(names, ps)), (call_input(fb, x, lengths), h))
        return tuple(flat_outputs(out))

    assert torch.autograd.gradcheck(f, (x, *params))


def call_input(module, x, lengths):
    if lengths is None:
        return x
    return pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=module.batch_first, enforce_sorted=False)


# ---------------------------------------------------------------- 3. autograd semantics

def both(cell="lstm", D=3, H=4, L=2, bidir=True, **kw):
    return build(cell, D, H, L=L, bidir=bidir, **kw)


def randn(*shape, grad=True, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_module_used_twice_in_one_graph(cell):
    """The output and state of one call are the input and hx of the next, then both enter the loss."""
    ref, fb = build(cell, 4, 4, L=1, seed=1)
    xs, res = [], []
    for m in (ref, fb):
        x = randn(5, 3, 4)
        r1 = m(x)
        r2 = m(r1[0] * 0.5, r1[1])
        (loss_of(r1) + loss_of(r2, seed=8)).backward()
        xs.append(x)
        res.append(r2)
    assert_same_results(res[1], res[0], TOL64)
    assert_same_grads(ref, fb, TOL64, [xs[0]], [xs[1]])


@pytest.mark.parametrize("shapes", [[(5, 3)] * 3, [(5, 3), (2, 3), (5, 4), (5, 3)]], ids=["same", "mixed"])
def test_several_forwards_before_one_backward(shapes):
    """Calls of the same (T, B) before one backward: each keeps its own activations."""
    ref, fb = both("gru")
    got = []
    for m in (ref, fb):
        xs = [randn(T, B, 3, seed=i) for i, (T, B) in enumerate(shapes)]
        results = [m(x) for x in xs]
        sum(loss_of(r, seed=i) for i, r in enumerate(results)).backward()
        got.append((xs, results))
    (xr, rr), (xf, rf) = got
    for a, b in zip(rf, rr):
        assert_same_results(a, b, TOL64)
    assert_same_grads(ref, fb, TOL64, xr, xf)


def test_several_packed_forwards_before_one_backward():
    ref, fb = both("lstm")
    got = []
    for m in (ref, fb):
        xs = [randn(6, 4, 3, seed=i) for i in range(3)]
        lens = [[6, 2, 5, 1], [3, 6, 6, 2], [6, 2, 5, 1]]
        total = sum(loss_of(call(m, x, None, n), seed=i) for i, (x, n) in enumerate(zip(xs, lens)))
        total.backward()
        got.append(xs)
    assert_same_grads(ref, fb, TOL64, got[0], got[1])


@pytest.mark.parametrize("between", [False, True], ids=["plain", "other-call-between"])
def test_backward_twice_with_retain_graph(between):
    """Gradients accumulate as torch.nn's; another call of the same shape between the two
    backward passes (which may take the same workspace) changes nothing."""
    ref, fb = both("lstm")
    xs = []
    for m in (ref, fb):
        x = randn(5, 3, 3)
        h = (randn(4, 3, 4, seed=1), randn(4, 3, 4, seed=2))
        loss = loss_of(m(x, h))
        loss.backward(retain_graph=True)
        if between:
            loss_of(m(randn(5, 3, 3, seed=9)), seed=3).backward()
        loss.backward()
        xs.append([x, *h])
    assert_same_grads(ref, fb, TOL64, xs[0], xs[1])


def test_retain_graph_with_dropout_repeats_the_masks():
    """A second backward recomputes the forward with the first call's masks, even after eval()."""
    _, fb = both("gru", dropout=0.5)
    fb.train()
    x = randn(6, 3, 3)
    torch.manual_seed(4)
    loss_of(fb(x)).backward()
    once = [p.grad.clone() for p in fb.parameters()] + [x.grad.clone()]
    fb.zero_grad()
    x.grad = None
    torch.manual_seed(4)
    loss = loss_of(fb(x))
    loss.backward(retain_graph=True)
    fb.eval()
    torch.manual_seed(99)
    loss.backward()
    for i, (g, w) in enumerate(zip([p.grad for p in fb.parameters()] + [x.grad], once)):
        assert_close(f"gradient {i} after two passes", g, 2 * w, TOL64)


def test_parameters_moved_while_a_graph_is_held():
    """A parameter replaced between a forward and its backward: the backward uses the values the
    forward saw (or refuses), and later calls of the same shape use the new ones."""
    ref, fb = build("lstm", 3, 4, L=2)
    x = randn(5, 3, 3)
    loss_of(ref(x)).backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters()}
    loss = loss_of(fb(x2 := x.detach().clone().requires_grad_()))
    new = randn(16, 4, grad=False, seed=5) * 0.3
    fb.weight_hh_l1.data = new.clone()
    with torch.no_grad():
        fb(randn(5, 3, 3, grad=False))              # notices the change: a new buffer
    try:
        loss.backward()
    except RuntimeError:
        pass
    else:
        for n, p in fb.named_parameters():
            assert_close(f"{n}.grad", p.grad, want[n], TOL64)
        assert_close("x.grad", x2.grad, x.grad, TOL64)
    ref.weight_hh_l1.data = new.clone()
    check_pair(ref, fb)


def test_second_backward_without_retain_graph_is_refused_or_exact():
    """torch.nn refuses; fastbptt must refuse too, or give exactly the gradients of a second pass."""
    ref, fb = both("gru")
    x = randn(4, 2, 3)
    out, h = fb(x)
    loss = out.sum() + h.sum()                      # no saved tensors before the recurrence's node
    loss.backward()
    first = x.grad.clone()
    try:
        loss.backward()
    except RuntimeError:
        return
    assert_close("x.grad after two passes", x.grad, 2 * first, TOL64)


@pytest.mark.parametrize("used", ["h_n", "c_n", "output", "output_last"])
def test_only_some_outputs_used(used):
    ref, fb = both("lstm")
    xs = []
    for m in (ref, fb):
        x = randn(5, 3, 3)
        out, (h, c) = m(x)
        t = {"h_n": h, "c_n": c, "output": out, "output_last": out[-1]}[used]
        (t * randn(*t.shape, grad=False, seed=4)).sum().backward()
        xs.append(x)
    assert_same_grads(ref, fb, TOL64, [xs[0]], [xs[1]])


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("mode", ["dense", "packed_unsorted"])
def test_no_grad_and_inference_mode(ctx, mode):
    ref, fb = both("lstm")
    x, h, lengths = make_batch("lstm", 5, 3, 3, 4, 2, 2, mode=mode)
    with torch.no_grad():
        want = call(ref, x, h, lengths)
    with (torch.no_grad() if ctx == "no_grad" else torch.inference_mode()):
        got = call(fb, x, h, lengths)
    for t in flat_outputs(got):
        assert not t.requires_grad and t.grad_fn is None
    assert_same_results(got, want, TOL64)
    # and a graph afterwards works (nothing made in that mode is reused for autograd)
    check = call(fb, *fresh(x, h), lengths)
    loss_of(check).backward()


@pytest.mark.parametrize("ctx", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm"])
def test_outputs_not_aliased_between_calls(ctx, cell):
    """Call 1's outputs keep their values through call 2 of the same shape (and its backward)."""
    _, fb = both(cell)
    manager = {"grad": nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[ctx]
    for mode in ("dense", "packed_unsorted"):
        x1, h1, n = make_batch(cell, 5, 3, 3, 4, 2, 2, mode=mode, seed=1)
        x2, h2, _ = make_batch(cell, 5, 3, 3, 4, 2, 2, mode=mode, seed=2)
        with manager():
            r1 = call(fb, x1, h1, n)
            kept = [t.detach().clone() for t in flat_outputs(r1)]
            r2 = call(fb, x2, h2, n)
            if ctx == "grad":
                loss_of(r2).backward()
        for a, b in zip(flat_outputs(r1), kept):
            assert torch.equal(a.detach(), b), f"{mode}: call 1's output changed"
        assert not torch.equal(flat_outputs(r2)[0].detach(), kept[0])


def test_outputs_are_not_the_input_or_hx():
    _, fb = both("gru", D=4, H=4, L=1, bidir=False)
    x, h = randn(5, 2, 4), randn(1, 2, 4, seed=1)
    out, hn = fb(x, h)
    for t in (out, hn):
        assert t.data_ptr() not in (x.data_ptr(), h.data_ptr())
    with torch.no_grad():
        out.add_(1.0)                  # a caller's in-place change does not reach the next call
        hn.add_(1.0)
    out2, hn2 = fb(x, h)
    with torch.no_grad():
        assert torch.allclose(out2, out - 1.0, atol=1e-12) and torch.allclose(hn2, hn - 1.0, atol=1e-12)


def test_gradients_are_fresh_tensors():
    """The first backward's .grad (parameters and input) keep their values through another
    forward/backward after zero_grad(set_to_none=True); without zeroing they add up as torch.nn's."""
    ref, fb = both("lstm")
    x1 = randn(5, 3, 3, seed=1)
    loss_of(fb(x1)).backward()
    held = {n: p.grad for n, p in fb.named_parameters()}
    kept = {n: g.clone() for n, g in held.items()}
    held_x, kept_x = x1.grad, x1.grad.clone()
    fb.zero_grad(set_to_none=True)
    x1.grad = None
    loss_of(fb(randn(5, 3, 3, seed=2)), seed=3).backward()
    loss_of(fb(x1), seed=4).backward()
    for n in held:
        assert torch.equal(held[n], kept[n]), f"{n}.grad of the first backward changed"
    assert torch.equal(held_x, kept_x)
    # accumulation without zeroing, as torch.nn
    for m in (ref, fb):
        m.zero_grad(set_to_none=True)
        for i in range(3):
            loss_of(m(randn(5, 3, 3, seed=10 + i)), seed=i).backward()
    assert_same_grads(ref, fb, TOL64)
    grads = [p.grad.data_ptr() for p in fb.parameters()]
    assert len(set(grads)) == len(grads), "two parameters share one .grad tensor"


def test_elman_biases_get_separate_gradient_tensors():
    """bias_ih and bias_hh of the Elman cell have the same gradient, in two tensors."""
    ref, fb = build("rnn_tanh", 3, 4, L=1)
    loss_of(fb(randn(4, 2, 3))).backward()
    assert_close("bias_ih.grad", fb.bias_ih_l0.grad, fb.bias_hh_l0.grad, TOL64)
    assert fb.bias_ih_l0.grad.data_ptr() != fb.bias_hh_l0.grad.data_ptr()
    with torch.no_grad():
        fb.bias_ih_l0.grad.add_(1.0)
    assert not torch.equal(fb.bias_ih_l0.grad, fb.bias_hh_l0.grad)


@pytest.mark.parametrize("what", ["parameter", "input", "hx"])
def test_inplace_change_between_forward_and_backward(what):
    """torch.nn refuses a backward after an in-place change of what the forward used; fastbptt must
    refuse too, or give the gradients of the values the forward saw — never mix in the new ones."""
    ref, fb = both("gru", L=1, bidir=False)
    x0, h0 = randn(5, 3, 3), randn(1, 3, 4, seed=1)
    # the correct gradients: no change at all
    loss_of(ref(*fresh(x0, h0))).backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters()}
    x, h = fresh(x0, h0)
    xi, hi = x * 1.0, h * 1.0                      # non-leaves, so that they can change in place
    res = fb(xi, hi)
    with torch.no_grad():
        {"parameter": fb.weight_hh_l0, "input": xi, "hx": hi}[what].mul_(1.5)
    try:
        loss_of(res).backward()
    except RuntimeError:
        return
    for n, p in fb.named_parameters():
        assert_close(f"{n}.grad", p.grad, want[n], TOL64)


def test_inplace_change_of_output_before_backward():
    """out.mul_(2) then backward: torch.nn refuses; fastbptt refuses or gives the exact gradients."""
    ref, fb = both("lstm", L=1, bidir=False)
    x = randn(5, 3, 3)
    out, (h, c) = ref(x)
    (2 * out.sum() + h.sum()).backward()
    out, (h, c) = fb(x2 := randn(5, 3, 3))
    out.mul_(2)
    try:
        (out.sum() + h.sum()).backward()
    except RuntimeError:
        return
    assert_same_grads(ref, fb, TOL64, [x], [x2])


def test_double_backward_refused_or_exact():
    """A gradient penalty (create_graph=True, then backward through the gradient): torch.nn
    differentiates twice; fastbptt must do the same or raise — never treat the gradient as a constant."""
    ref, fb = both("gru", L=1, bidir=False)
    xs = []
    for m in (ref, fb):
        x = randn(5, 2, 3)
        out, h = m(x)
        try:
            g, = torch.autograd.grad(loss_of((out, h)), x, create_graph=True)
            g.square().sum().backward()
        except RuntimeError as e:
            assert m is fb, e
            assert "differentiat" in str(e) or "create_graph" in str(e) or "twice" in str(e), str(e)
            return
        xs.append(x)
    assert_same_grads(ref, fb, TOL64, [xs[0]], [xs[1]])


def test_autograd_grad_wrt_input_only():
    """torch.autograd.grad(loss, x): the input's gradient, and no parameter's .grad is touched."""
    ref, fb = both("lstm")
    got = []
    for m in (ref, fb):
        x = randn(5, 3, 3)
        got.append(torch.autograd.grad(loss_of(m(x)), x)[0])
        assert all(p.grad is None for p in m.parameters())
    assert_close("dL/dx", got[1], got[0], TOL64)


def test_full_backward_hook_and_forward_hook():
    ref, fb = both("gru", L=1, bidir=False)
    seen = {}
    def forward_hook(mod, inp, out):
        seen[id(mod), "fwd"] = out[0].detach().clone()      # returns None: the output is kept

    def backward_hook(mod, grad_input, grad_output):
        seen[id(mod), "bwd"] = [None if g is None else g.clone() for g in grad_input]

    for m in (ref, fb):
        m.register_forward_hook(forward_hook)
        m.register_full_backward_hook(backward_hook)
        loss_of(m(randn(5, 3, 3))).backward()
    assert_close("forward hook output", seen[(id(fb), "fwd")], seen[(id(ref), "fwd")], TOL64)
    for a, b in zip(seen[(id(fb), "bwd")], seen[(id(ref), "bwd")]):
        assert_close("grad_input of the backward hook", a, b, TOL64)


def test_autocast_runs_torch_in_bfloat16():
    ref, fb = both("lstm")
    x = randn(5, 3, 3, grad=False).float()
    for m in (ref, fb):
        m.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x), fb(x)
    assert got[0].dtype == want[0].dtype
    assert_same_results(got, want, 1e-2)


def test_threads_share_a_module():
    """Four threads calling one module at once (the kernels release the GIL) get serial results."""
    import threading
    ref, fb = both("rnn_tanh")
    xs = [randn(6, 4, 3, grad=False, seed=i) for i in range(8)]
    with torch.no_grad():
        want = [ref(x)[0] for x in xs]
    got, errors = [None] * len(xs), []

    def work(i):
        try:
            for _ in range(5):
                x = xs[i].clone().requires_grad_()
                out, h = fb(x)
                (out.sum() + h.sum()).backward()
                got[i] = out.detach()
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"thread {i}", g, w, TOL64)


def workspace_cache(module):
    caches = [v for v in vars(module).values() if isinstance(v, ft.WorkspaceCache)]
    assert len(caches) == 1, "a module keeps one WorkspaceCache"
    return caches[0]


def test_workspace_cache_is_bounded_and_graphs_give_workspaces_back():
    _, fb = both("gru")
    cache = workspace_cache(fb)
    for T in range(1, 12):                          # more shapes than the cache keeps
        loss_of(fb(randn(T, 3, 3, seed=T))).backward()
    assert 0 < len(cache) <= cache.max_count and cache.nbytes <= cache.max_bytes
    made = cache.made
    for i in range(20):                             # graphs dropped without a backward pass
        out, h = fb(randn(5, 3, 3, seed=i))
        del out, h
    assert cache.made <= made + 1, "dropped graphs keep their workspaces"
    cache.max_bytes = 1
    loss_of(fb(randn(5, 3, 3))).backward()
    assert len(cache) == 0 and cache.nbytes == 0


@pytest.mark.parametrize("lengths", [[1, 1, 1], [6, 6, 6], [6], [1]], ids=["all1", "allT", "B1T", "B1one"])
def test_packed_edge_lengths(lengths):
    ref, fb = both("lstm")
    B = len(lengths)
    x = randn(6, B, 3)
    res, lv = [], []
    for m in (ref, fb):
        xm = x.detach().clone().requires_grad_()
        r = call(m, xm, None, lengths)
        loss_of(r).backward()
        res.append(r)
        lv.append([xm])
    assert_same_results(res[1], res[0], TOL64)
    assert_same_grads(ref, fb, TOL64, lv[0], lv[1])


# ---------------------------------------------------------------- 4. parameters

@pytest.mark.parametrize("cell", CELLS)
def test_parameters_as_torch_nn(cell):
    ref, fb = build(cell, 3, 4, L=3, bidir=True, bias=True)
    assert isinstance(fb, classes(cell)[0])
    assert [(n, p.shape, p.dtype) for n, p in fb.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
    assert all(type(p) is nn.Parameter and p.requires_grad for p in fb.parameters())
    assert list(fb.state_dict()) == list(ref.state_dict())
    assert len(list(fb.buffers())) == len(list(ref.buffers()))
    assert repr(fb) == repr(ref)
    ref.load_state_dict(fb.state_dict(), strict=True)
    fb.load_state_dict(ref.state_dict(), strict=True)
    r0 = ft.RNN(3, 4, bias=False)
    assert [n for n, _ in r0.named_parameters()] == ["weight_ih_l0", "weight_hh_l0"]


def test_parameters_share_one_buffer_zero_copy():
    """.detach().numpy() of a parameter is the memory the kernels read: a NumPy write is used."""
    ref, fb = build("lstm", 3, 4, L=2)
    arr = fb.weight_hh_l1.detach().numpy()
    arr *= 0.5
    with torch.no_grad():
        ref.weight_hh_l1.mul_(0.5)
    check_pair(ref, fb)


def check_pair(ref, fb, *, T=5, B=3, tol=TOL64, seed=0, hx=True, mode="dense"):
    """Forward and backward of both modules on the same batch; results and gradients compared."""
    ref.zero_grad(set_to_none=True)
    fb.zero_grad(set_to_none=True)
    cell = "lstm" if isinstance(ref, nn.LSTM) else "gru"
    dirs = 2 if ref.bidirectional else 1
    dtype = next(ref.parameters()).dtype
    x, h, n = make_batch(cell, T, B, ref.input_size, ref.hidden_size, ref.num_layers, dirs, mode=mode, hx=hx,
                         dtype=dtype, seed=seed, batch_first=ref.batch_first)
    res, lv = [], []
    for m in (ref, fb):
        xm, hm = fresh(x, h)
        r = call(m, xm, hm, n)
        loss_of(r).backward()
        res.append(r)
        lv.append(leaves(xm, hm))
    assert_same_results(res[1], res[0], tol)
    assert_same_grads(ref, fb, tol, lv[0], lv[1])


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm"])
def test_optimizer_steps_are_seen_by_the_next_call(opt, cell):
    ref, fb = build(cell, 3, 4, L=2, bidir=True)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
            "adam": lambda p: torch.optim.Adam(p, lr=0.05)}[opt]
    opts = [make(m.parameters()) for m in (ref, fb)]
    for step in range(3):
        for m, o in zip((ref, fb), opts):
            o.zero_grad()
            loss_of(m(randn(5, 3, 3, seed=step, grad=False))).backward()
            o.step()
        for (n, r), f in zip(ref.named_parameters(), fb.parameters()):
            assert_close(f"step {step} {n}", f, r, 1e-9)
    check_pair(ref, fb)


@pytest.mark.parametrize("cell", CELLS)
def test_inplace_change_of_each_parameter_is_seen(cell):
    ref, fb = build(cell, 3, 4, L=2, bidir=True)
    for i, ((name, r), f) in enumerate(zip(ref.named_parameters(), fb.parameters())):
        delta = randn(*r.shape, grad=False, seed=i) * 0.1
        with torch.no_grad():
            r.add_(delta)
            f.add_(delta)
        with torch.no_grad():
            x = randn(4, 2, 3, grad=False, seed=i)
            assert_same_results(fb(x), ref(x), TOL64, what=f"after {name} += delta: ")
    check_pair(ref, fb)


@pytest.mark.parametrize("how", ["parameter", "noncontiguous", "data"])
@pytest.mark.parametrize("cell", ["rnn_relu", "gru", "lstm"])
def test_parameter_replaced_by_hand(how, cell):
    """module.w = nn.Parameter(...) (contiguous or not) or w.data = tensor: the new values are used,
    the new parameter gets the gradient, and an optimizer over the new parameters keeps working."""
    ref, fb = build(cell, 3, 4, L=2)
    for name in ("weight_hh_l0", "bias_ih_l1"):
        shape = getattr(ref, name).shape
        new = randn(*shape, grad=False, seed=len(name)) * 0.3
        for m in (ref, fb):
            if how == "data":
                getattr(m, name).data = new.clone()
            elif how == "parameter":
                setattr(m, name, nn.Parameter(new.clone()))
            else:
                setattr(m, name, nn.Parameter(new.t().contiguous().t() if new.dim() == 2 else new[::1].clone()))
    check_pair(ref, fb)
    assert fb.weight_hh_l0.grad is not None
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (ref, fb)]
    for o in opts:
        o.step()
    check_pair(ref, fb, seed=1)


def test_parameter_replaced_by_a_transposed_view_of_itself():
    """w.data = w.data.t() (square W_hh: same memory, other strides) is a change torch.nn sees."""
    ref, fb = build("rnn_tanh", 3, 4, L=1)
    for m in (ref, fb):
        m.weight_hh_l0.data = m.weight_hh_l0.data.t()
    check_pair(ref, fb)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_parameter_replaced_then_first_call_without_grad(ctx):
    """A replacement noticed under no_grad/inference_mode, then training: nothing made in that mode
    (an inference tensor) becomes a parameter's memory."""
    ref, fb = build("lstm", 3, 4, L=2)
    new = randn(16, 4, grad=False, seed=3) * 0.3
    for m in (ref, fb):
        m.weight_hh_l0 = nn.Parameter(new.clone())
    with (torch.no_grad() if ctx == "no_grad" else torch.inference_mode()):
        x = randn(5, 3, 3, grad=False)
        assert_same_results(fb(x), ref(x), TOL64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (ref, fb)]
    check_pair(ref, fb)
    for o in opts:
        o.step()
    check_pair(ref, fb, seed=1)


def test_frozen_parameters():
    """requires_grad_(False) on some parameters: they get no gradient, the others torch.nn's."""
    ref, fb = build("gru", 3, 4, L=2, bidir=True)
    for m in (ref, fb):
        for n, p in m.named_parameters():
            if n.endswith("l0") or n.startswith("bias_hh"):
                p.requires_grad_(False)
    check_pair(ref, fb)
    assert fb.weight_ih_l0.grad is None and fb.weight_ih_l1.grad is not None
    for m in (ref, fb):
        m.requires_grad_(False)
    check_pair(ref, fb, seed=2)          # only the input and hx need gradients


@pytest.mark.parametrize("which", ["old", "parametrizations", "prune"])
def test_weight_norm_on_a_recurrent_weight(which):
    """torch.nn.utils.weight_norm (AWD-LSTM style) and pruning: the weight is a new non-leaf tensor
    computed at every call (by a forward pre-hook or a parametrization)."""
    ref, fb = build("lstm", 3, 4, L=1)
    for m in (ref, fb):
        if which == "old":
            with pytest.warns(FutureWarning):
                torch.nn.utils.weight_norm(m, "weight_hh_l0")
        elif which == "prune":
            import torch.nn.utils.prune as prune
            prune.l1_unstructured(m, "weight_hh_l0", amount=0.3)
        else:
            torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    check_pair(ref, fb)
    opts = [torch.optim.SGD(m.parameters(), lr=0.3) for m in (ref, fb)]
    for o in opts:
        o.step()
    check_pair(ref, fb, seed=1)


@pytest.mark.parametrize("convert", ["double", "to_dtype", "to_kw"])
def test_dtype_conversions(convert):
    """float32 modules converted to float64 match torch.nn to 1e-10, stay zero-copy under an
    optimizer, and back to float32; through half precision (torch's own code) and back."""
    ref, fb = build("lstm", 3, 4, L=2, bidir=True, dtype=F32)
    for m in (ref, fb):
        {"double": lambda: m.double(), "to_dtype": lambda: m.to(F64), "to_kw": lambda: m.to(dtype=F64)}[convert]()
    assert all(p.dtype == F64 for p in fb.parameters())
    check_pair(ref, fb)
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (ref, fb)]
    for o in opts:
        o.step()
    check_pair(ref, fb, seed=1)
    for m in (ref, fb):
        m.float()
    check_pair(ref, fb, tol=TOL32)
    for m in (ref, fb):
        m.half()
        m.double()
    check_pair(ref, fb, seed=2)


def test_deepcopy_is_independent():
    ref, fb = build("gru", 3, 4, L=2, bidir=True)
    x = randn(5, 3, 3, grad=False)
    loss_of(fb(x)).backward()                       # a workspace is cached, gradients exist
    before = [t.detach().clone() for t in flat_outputs(fb(x))]
    fb2, ref2 = copy.deepcopy(fb), copy.deepcopy(ref)
    assert type(fb2) is ft.GRU
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(fb.parameters(), fb2.parameters()))
    for m in (fb2, ref2):
        with torch.no_grad():
            m.weight_hh_l1.mul_(0.5)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m.zero_grad()
        loss_of(m(x)).backward()
        opt.step()
    for a, b in zip(flat_outputs(fb(x)), before):
        assert torch.equal(a.detach(), b), "changing the copy changed the original"
    check_pair(ref2, fb2)
    check_pair(ref, fb)


def roundtrip(obj, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=how == "torch.save state_dict")


@pytest.mark.parametrize("how", ["torch.save module", "pickle"])
def test_save_and_load_whole_module(how):
    ref, fb = build("lstm", 3, 4, L=2, bidir=True)
    loss_of(fb(randn(5, 3, 3))).backward()
    fb2 = roundtrip(fb, how)
    assert type(fb2) is ft.LSTM and (fb2.method, fb2.parallel) == (fb.method, fb.parallel)
    ref2 = copy.deepcopy(ref)
    check_pair(ref2, fb2)
    opts = [torch.optim.Adam(m.parameters(), lr=0.1) for m in (ref2, fb2)]
    for o in opts:
        o.step()
    check_pair(ref2, fb2, seed=1)                   # zero copy again after unpickling
    check_pair(ref, fb, seed=1)                     # the original is untouched


def test_save_and_load_state_dict_both_ways():
    ref, fb = build("gru", 3, 4, L=2, bidir=True, load="into_ref")
    sd = roundtrip(fb.state_dict(), "torch.save state_dict")
    ref2 = nn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    ref2.load_state_dict(sd)
    fb2 = ft.GRU(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    fb2.load_state_dict(roundtrip(ref.state_dict(), "torch.save state_dict"))
    check_pair(ref2, fb2)
    check_pair(ref2, fb)


def test_load_state_dict_with_assign():
    """load_state_dict(assign=True) replaces the parameters by the state_dict's tensors."""
    ref, fb = build("lstm", 3, 4, L=2)
    src = copy.deepcopy(ref)
    randomize(src, 9)
    for m in (ref, fb):
        m.load_state_dict(copy.deepcopy(src.state_dict()), assign=True)
    check_pair(ref, fb)
    for o in [torch.optim.SGD(m.parameters(), lr=0.2) for m in (ref, fb)]:
        o.step()
    check_pair(ref, fb, seed=1)


def test_vector_to_parameters():
    """torch.nn.utils.vector_to_parameters points every parameter's .data into one vector."""
    ref, fb = build("gru", 3, 4, L=2, bidir=True)
    vec = torch.nn.utils.parameters_to_vector(ref.parameters()).detach() * 0.7
    for m in (ref, fb):
        torch.nn.utils.vector_to_parameters(vec.clone(), m.parameters())
    check_pair(ref, fb)


def test_flatten_parameters_and_share_memory():
    ref, fb = build("lstm", 3, 4, L=2)
    fb.flatten_parameters()
    check_pair(ref, fb)
    fb.share_memory()
    ref.share_memory()
    check_pair(ref, fb, seed=1)
    for o in [torch.optim.SGD(m.parameters(), lr=0.2) for m in (ref, fb)]:
        o.step()
    check_pair(ref, fb, seed=2)


# ---------------------------------------------------------------- 5. train() and eval()

@pytest.mark.parametrize("cell", CELLS)
def test_dropout_in_eval_matches_torch(cell):
    ref, fb = build(cell, 3, 4, L=3, bidir=True, dropout=0.5)
    ref.eval()
    fb.eval()
    check_pair(ref, fb)
    check_pair(ref, fb, mode="packed_unsorted", seed=1)


def test_dropout_with_one_layer_does_nothing():
    """torch.nn drops out between layers only: one layer in training is the eval result."""
    ref, fb = build("gru", 3, 4, L=1, dropout=0.5)
    ref.train()
    fb.train()
    check_pair(ref, fb)


@pytest.mark.parametrize("mode", ["dense", "packed_unsorted"])
def test_dropout_in_training_is_repeatable_with_manual_seed(mode):
    _, fb = build("lstm", 3, 4, L=2, bidir=True, dropout=0.4)
    x, h, n = make_batch("lstm", 6, 3, 3, 4, 2, 2, mode=mode)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        xm, hm = fresh(x, h)
        fb.zero_grad()
        r = call(fb, xm, hm, n)
        loss_of(r).backward()
        runs.append([t.detach().clone() for t in flat_outputs(r)] + [xm.grad] +
                    [p.grad.clone() for p in fb.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])), "torch.manual_seed does not repeat a run"
    assert not torch.equal(runs[0][0], runs[2][0]), "another seed gives the same masks"
    fb.eval()
    with torch.no_grad():
        ev = flat_outputs(call(fb, x, h, n))
    assert not torch.equal(runs[0][0], ev[0]), "dropout had no effect in training"
    # the bottom layer's final states are before any dropout
    assert_close("h_n of layer 0", runs[0][1][:2], ev[1][:2], TOL64)


def test_dropout_masks_are_inverted_bernoulli():
    """Layer 2 = tanh(I · dropped(layer 1's output)): atanh recovers the mask, whose entries are
    0 or 1/(1-p), zero with frequency p, and which changes along time and the batch."""
    p, T, B, H = 0.3, 20, 8, 16
    _, fb = build("rnn_tanh", 5, H, L=2, bias=False, dropout=p)
    with torch.no_grad():
        fb.weight_ih_l1.copy_(torch.eye(H, dtype=F64))
        fb.weight_hh_l1.zero_()
        fb.weight_ih_l0.mul_(0.5)                   # layer 1's outputs well inside (-1, 1)
    x = randn(T, B, 5, grad=False)
    fb.eval()
    with torch.no_grad():
        clean = torch.atanh(fb(x)[0])
    fb.train()
    torch.manual_seed(0)
    with torch.no_grad():
        masked = torch.atanh(fb(x)[0])
    ratio = masked / clean
    dropped = ratio.abs() < 1e-8
    kept = (ratio - 1 / (1 - p)).abs() < 1e-6
    assert torch.all(dropped | kept), "a mask entry is neither 0 nor 1/(1-p)"
    assert abs(dropped.double().mean().item() - p) < 0.05
    assert dropped.any(dim=0).float().mean() > 0.5 and not torch.equal(dropped[0], dropped[1])


def test_gradcheck_with_dropout_reseeded():
    """With torch.manual_seed before each call the masks repeat, so gradcheck checks dropout's backward."""
    _, fb = build("gru", 2, 3, L=2, bidir=True, dropout=0.4)
    fb.train()
    x, h = randn(4, 2, 2), randn(4, 2, 3, seed=1)

    def f(x, h):
        torch.manual_seed(123)
        return tuple(flat_outputs(fb(x, h)))

    assert torch.autograd.gradcheck(f, (x, h))


# ---------------------------------------------------------------- 6. other dtypes, bad input, edge cases

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_half_precision_runs_torch(dtype, cell):
    ref, fb = build(cell, 3, 4, L=2, bidir=True)
    for m in (ref, fb):
        m.to(dtype)
    x = randn(5, 3, 3, grad=False).to(dtype)
    res = []
    for m in (ref, fb):
        xm = x.clone().requires_grad_()
        r = m(xm)
        loss_of(r).backward()
        res.append((r, xm))
    assert_same_results(res[1][0], res[0][0], 1e-2)
    assert_same_grads(ref, fb, 1e-2, [res[0][1]], [res[1][1]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the fallback to torch's CUDA code)")
def test_cuda_runs_torch_and_moves_back():
    """On a CUDA device the module runs torch's implementation; moved back it runs fastbptt's again."""
    ref, fb = build("lstm", 3, 4, L=2, bidir=True)
    for m in (ref, fb):
        m.cuda()
    x = randn(5, 3, 3, grad=False).cuda()
    with torch.no_grad():
        assert_same_results(fb(x), ref(x), 1e-6)
    for m in (ref, fb):
        m.cpu()
    check_pair(ref, fb)


def test_proj_size_refused():
    with pytest.raises(ValueError, match="proj_size"):
        ft.LSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="proj_size"):
        ft.GRU(3, 4, proj_size=2)               # as torch.nn.GRU


BAD_INPUTS = {
    # name: (cell, args builder, words the message must contain)
    "wrong D": ("lstm", lambda: (torch.randn(5, 2, 7, dtype=F64),), ["input", "7"]),
    "4-D input": ("gru", lambda: (torch.randn(5, 2, 3, 1, dtype=F64),), ["4D"]),
    "1-D input": ("gru", lambda: (torch.randn(5, dtype=F64),), ["1D"]),
    "wrong hx batch": ("gru", lambda: (torch.randn(5, 2, 3, dtype=F64), torch.randn(2, 3, 4, dtype=F64)),
                       ["hidden", "(2, 2, 4)"]),
    "wrong hx layers": ("rnn_tanh", lambda: (torch.randn(5, 2, 3, dtype=F64), torch.randn(1, 2, 4, dtype=F64)),
                        ["hidden", "(2, 2, 4)"]),
    "wrong c0": ("lstm", lambda: (torch.randn(5, 2, 3, dtype=F64),
                                  (torch.randn(2, 2, 4, dtype=F64), torch.randn(2, 2, 5, dtype=F64))),
                 ["hidden[1]", "(2, 2, 4)"]),
    "3-D hx for unbatched": ("lstm", lambda: (torch.randn(5, 3, dtype=F64),
                                              (torch.randn(2, 1, 4, dtype=F64), torch.randn(2, 1, 4, dtype=F64))),
                             ["2-D"]),
    "float32 input": ("gru", lambda: (torch.randn(5, 2, 3),), ["dtype", "float64"]),
    "integer input": ("gru", lambda: (torch.randint(0, 3, (5, 2, 3)),), ["dtype"]),
    "float32 hx": ("gru", lambda: (torch.randn(5, 2, 3, dtype=F64), torch.randn(2, 2, 4)), ["dtype"]),
    "T = 0": ("lstm", lambda: (torch.randn(0, 2, 3, dtype=F64),), ["length"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_like_torch(name):
    """Each bad call raises what torch.nn raises (a RuntimeError or ValueError) with a helpful message."""
    cell, args, words = BAD_INPUTS[name]
    ref, fb = build(cell, 3, 4, L=2)
    with pytest.raises(Exception) as want:
        ref(*args())
    with pytest.raises((RuntimeError, ValueError, TypeError)) as got:
        fb(*args())
    assert isinstance(got.value, (type(want.value), ValueError, RuntimeError)), (got.value, want.value)
    message = str(got.value)
    for w in words:
        assert w in message, f"{name}: {w!r} not in the message {message!r} (torch.nn's: {want.value})"


def test_lstm_hx_must_be_a_pair():
    _, fb = build("lstm", 3, 4)
    with pytest.raises((TypeError, RuntimeError, ValueError, IndexError)):
        fb(torch.randn(5, 2, 3, dtype=F64), torch.randn(1, 2, 4, dtype=F64))


def test_empty_batch_as_torch():
    """B = 0: torch.nn returns empty outputs of the right shapes."""
    ref, fb = build("lstm", 3, 4, L=2, bidir=True)
    x = torch.zeros(5, 0, 3, dtype=F64)
    assert_same_results(fb(x), ref(x), TOL64)


def test_nan_input_propagates_as_torch():
    ref, fb = build("gru", 3, 4, L=2)
    x = randn(6, 3, 3, grad=False)
    x[2, 1, 0] = float("nan")
    with torch.no_grad():
        got, want = fb(x), ref(x)
    assert torch.isnan(got[0][2:, 1]).all() and torch.isfinite(got[0][:, [0, 2]]).all()
    assert_same_results(got, want, TOL64)


@pytest.mark.parametrize("kind", ["strided", "transposed", "expanded"])
def test_noncontiguous_input_and_hx(kind):
    ref, fb = build("lstm", 3, 4, L=2, bidir=True)
    base = randn(5, 6, 3, grad=False)
    hb = randn(4, 6, 4, grad=False, seed=1)
    if kind == "strided":
        x, h = base[:, ::2], (hb[:, ::2], hb[:, 1::2])
    elif kind == "transposed":
        x, h = base[:, :3].transpose(0, 1).contiguous().transpose(0, 1), (hb[:, :3], hb[:, 3:])
    else:
        x, h = base[:, :1].expand(5, 3, 3), (hb[:, :1].expand(4, 3, 4), hb[:, 1:2].expand(4, 3, 4))
    res, lv = [], []
    for m in (ref, fb):
        xm = x.detach().requires_grad_()
        hm = tuple(t.detach().requires_grad_() for t in h)
        r = m(xm, hm)
        loss_of(r).backward()
        res.append(r)
        lv.append([xm, *hm])
    assert_same_results(res[1], res[0], TOL64)
    assert_same_grads(ref, fb, TOL64, lv[0], lv[1])


def test_packed_output_pads_back_like_torch():
    ref, fb = build("gru", 3, 4, L=2, bidir=True, batch_first=True)
    x = randn(5, 7, 3, grad=False)
    n = [7, 2, 7, 1, 4]
    with torch.no_grad():
        got = pad_packed_sequence(call(fb, x, None, n)[0], batch_first=True)
        want = pad_packed_sequence(call(ref, x, None, n)[0], batch_first=True)
    assert torch.equal(got[1], want[1])
    assert_close("padded output", got[0], want[0], TOL64)


# ---------------------------------------------------------------- 7. clipping, optimizers, torch.compile

def test_clip_grad_norm():
    ref, fb = build("lstm", 3, 4, L=2, bidir=True)
    norms = []
    for m in (ref, fb):
        loss_of(m(randn(6, 3, 3))).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5))
    assert norms[0].item() > 0.5
    assert_close("total norm", norms[1], norms[0], TOL64)
    assert_same_grads(ref, fb, TOL64)


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru"])
def test_adam_with_step_lr(cell):
    ref, fb = build(cell, 3, 4, L=2, bidir=True)
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (ref, fb)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    for step in range(6):
        for m, o, s in zip((ref, fb), opts, scheds):
            o.zero_grad()
            loss_of(m(randn(5, 3, 3, grad=False, seed=step))).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()
            s.step()
    for (n, r), f in zip(ref.named_parameters(), fb.parameters()):
        assert_close(n, f, r, 1e-9)
    check_pair(ref, fb)


class Tagger(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(2 * rnn.hidden_size, 5, dtype=F64)

    def forward(self, x):
        out, (h, c) = self.rnn(torch.tanh(x))
        return self.head(out).log_softmax(-1).sum() + h.square().sum()


def test_torch_compile_of_a_model_containing_it():
    """torch.compile (inductor) runs a model with the module inside (a graph break) and equals eager."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile's inductor backend needs a C++ compiler, and none is on PATH")
    torch._dynamo.reset()
    _, fb = build("lstm", 3, 4, L=1, bidir=True)
    torch.manual_seed(0)
    eager = Tagger(fb)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    for seed in (0, 1):                             # a second call reuses the compiled graphs
        x1, x2 = randn(5, 3, 3, seed=seed), randn(5, 3, 3, seed=seed)
        a, b = eager(x1), compiled(x2)
        a.backward()
        b.backward()
        assert_close("loss", b, a, 1e-9)
        assert_close("x.grad", x2.grad, x1.grad, 1e-9)
    for (n, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        assert_close(n + ".grad", q.grad, p.grad, 1e-9)


# ---------------------------------------------------------------- 10. without PyTorch

NO_TORCH = """
import sys
{block}
import fastbptt
assert "torch" not in sys.modules or sys.modules["torch"] is None, "import fastbptt imported torch"
try:
    import fastbptt.torch
except ImportError as e:
    print("MESSAGE:", e)
else:
    raise SystemExit("import fastbptt.torch worked without torch")
"""


@pytest.mark.parametrize("block", ["none", "raising-module"])
def test_without_pytorch(block, tmp_path):
    if block == "none":
        code = "sys.modules['torch'] = None"
    else:
        (tmp_path / "torch.py").write_text("raise ImportError('No module named torch (test)')\n")
        code = f"sys.path.insert(0, {str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", NO_TORCH.format(block=code)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert 'pip install "fastbptt[torch]"' in proc.stdout, proc.stdout


def test_import_fastbptt_does_not_import_torch():
    code = "import sys, fastbptt; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_the_torch_extra_exists():
    """The error message tells people to pip install "fastbptt[torch]": pyproject.toml has that extra."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "torch" in extras and any(r.startswith("torch") for r in extras["torch"])


def test_imports_the_package_of_this_repository():
    """The tests run the package in this checkout (fastbptt/torch/), not an installed or stand-in one."""
    assert Path(ft.__file__).resolve().parent == ROOT / "fastbptt" / "torch", textwrap.shorten(ft.__file__, 80)
