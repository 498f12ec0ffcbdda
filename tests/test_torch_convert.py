"""fastbptt.torch.convert: torch.nn's RNN/GRU/LSTM in a module tree swapped for fastbptt's, and back."""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn

import fastbptt.torch as ft

T, B, D, H = 20, 4, 8, 16
CELLS = {"RNN": (nn.RNN, ft.RNN), "GRU": (nn.GRU, ft.GRU), "LSTM": (nn.LSTM, ft.LSTM)}


class Tagger(nn.Module):
    """A model as users write them: the recurrent layer two containers down, a head on top."""

    def __init__(self, cell, **kwargs):
        super().__init__()
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(D, D), cell(D, H, **kwargs)])})
        dirs = 2 if kwargs.get("bidirectional") else 1
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(dirs * H, 3))

    def forward(self, x, hx=None):
        lin, rnn = self.encoder["layers"]
        out, state = rnn(lin(x), hx)
        return self.head(out), state


def _inputs(cell, layers, dirs, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, D, generator=g, dtype=dtype, requires_grad=True)
    h0 = torch.randn(layers * dirs, B, H, generator=g, dtype=dtype, requires_grad=True)
    if cell == "LSTM":
        c0 = torch.randn(layers * dirs, B, H, generator=g, dtype=dtype, requires_grad=True)
        return x, (h0, c0)
    return x, h0


def _run(model, x, hx):
    """Outputs, state, and the gradients of every parameter, x and hx of one loss."""
    for p in model.parameters():
        p.grad = None
    hx_list = list(hx) if isinstance(hx, tuple) else [hx]
    for t in [x, *hx_list]:
        t.grad = None
    out, state = model(x, hx)
    states = list(state) if isinstance(state, tuple) else [state]
    loss = (out ** 2).sum() + sum((s * s.detach().cos()).sum() for s in states)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), [s.detach() for s in states], grads, x.grad.clone(), [h.grad.clone() for h in hx_list]


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("layers,dirs", [(1, 1), (2, 2), (3, 1)])
def test_converted_tree_computes_torch_nn_outputs_and_gradients(cell, layers, dirs):
    plain, fast = CELLS[cell]
    torch.manual_seed(0)
    kwargs = dict(num_layers=layers, bidirectional=dirs == 2)
    if cell == "RNN":
        kwargs["nonlinearity"] = "relu" if layers == 3 else "tanh"
    model = Tagger(plain, **kwargs).double()
    reference = copy.deepcopy(model)
    x, hx = _inputs(cell, layers, dirs)
    converted = ft.convert(model)
    assert converted is model                                  # the root stays; its child is replaced
    rnn = converted.encoder["layers"][1]
    assert type(rnn) is fast and type(converted.encoder["layers"][0]) is nn.Linear
    assert converted.state_dict().keys() == reference.state_dict().keys()
    got, want = _run(converted, x, hx), _run(reference, x, hx)
    assert rnn.workspaces.made >= 1                            # fastbptt's kernels ran, not torch's code
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=1e-12, msg=name)
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=1e-12)
    for a, b in zip(got[4], want[4]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    back = ft.convert(converted, to="torch")
    assert type(back.encoder["layers"][1]) is plain
    again = _run(back, x, hx)
    torch.testing.assert_close(again[0], want[0], rtol=0, atol=1e-12)
    for name in want[2]:
        torch.testing.assert_close(again[2][name], want[2][name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_a_recurrent_root_is_returned_converted_with_its_parameters_mode_and_flags(cell):
    plain, fast = CELLS[cell]
    torch.manual_seed(1)
    old = plain(D, H, num_layers=2, dropout=0.25, batch_first=True, bias=False).double()
    old.weight_hh_l1.requires_grad_(False)
    old.eval()
    params = dict(old.named_parameters())
    rng = torch.get_rng_state()
    new = ft.convert(old, method="blas")
    assert torch.equal(torch.get_rng_state(), rng)             # nothing drawn from torch's generator
    assert type(new) is fast and new is not old
    assert not new.training and new.batch_first and not new.bias and new.dropout == 0.25
    assert new.num_layers == 2 and new.method == "blas" and new.parallel is False
    for name, p in new.named_parameters():
        assert p is params[name]                               # the same Parameter objects
        assert p.dtype == torch.float64 and p.device.type == "cpu"
    assert not new.weight_hh_l1.requires_grad and new.weight_ih_l0.requires_grad
    back = ft.convert(new, to="torch")
    assert type(back) is plain and not back.training
    assert all(p is params[name] for name, p in back.named_parameters())


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_an_optimizer_built_before_converting_still_trains_the_converted_module(cell):
    plain, _ = CELLS[cell]
    torch.manual_seed(2)
    model = Tagger(plain, num_layers=2).double()
    reference = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, reference)]
    x, hx = _inputs(cell, 2, 1)
    model = ft.convert(model)
    for _ in range(3):
        for m, opt in zip((model, reference), opts):
            opt.zero_grad()
            out, _ = m(x.detach(), hx)
            out.pow(2).mean().backward()
            opt.step()
    assert model.encoder["layers"][1].workspaces.made >= 1
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_a_shared_module_is_converted_once():
    rnn = nn.GRU(D, H)
    tree = nn.ModuleDict({"a": rnn, "b": nn.Sequential(rnn, nn.Identity())})
    out = ft.convert(tree)
    assert type(out["a"]) is ft.GRU and out["a"] is out["b"][0]
    back = ft.convert(out, to="torch")
    assert type(back["a"]) is nn.GRU and back["a"] is back["b"][0]


def test_hooks_and_buffers_carry_over():
    calls = []
    old = nn.LSTM(D, H)
    handle = old.register_forward_hook(lambda m, i, o: calls.append(type(m)))
    old.register_buffer("steps", torch.tensor(3))
    new = ft.convert(old)
    new(torch.randn(T, B, D))
    assert calls == [ft.LSTM] and int(new.steps) == 3 and "steps" in new.state_dict()
    handle.remove()
    new(torch.randn(T, B, D))
    assert calls == [ft.LSTM]


@pytest.mark.parametrize("to", ["fastbptt", "torch"])
def test_full_backward_hooks_carry_over(to):
    calls = []
    old = nn.GRU(D, H)
    old.register_full_backward_hook(lambda m, gi, go: calls.append(type(m)))
    old(torch.randn(T, B, D, requires_grad=True))[0].sum().backward()
    new = ft.convert(old) if to == "fastbptt" else ft.convert(ft.convert(old), to="torch")
    new(torch.randn(T, B, D, requires_grad=True))[0].sum().backward()
    assert calls == [nn.GRU, type(new)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_is_kept_and_other_dtypes_run_torchs_implementation(dtype):
    torch.manual_seed(3)
    old = nn.LSTM(D, H, num_layers=2).to(dtype)
    reference = copy.deepcopy(old)
    new = ft.convert(old)
    assert all(p.dtype == dtype for p in new.parameters())
    x = torch.randn(T, B, D, dtype=dtype)
    with torch.no_grad():
        got, want = new(x)[0], reference(x)[0]
    tol = 1e-5 if dtype == torch.float32 else 0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert (new.workspaces.made >= 1) == (dtype == torch.float32)


def test_modules_it_cannot_take_are_left_with_a_warning():
    from torch.nn.utils import parametrize

    class MyLSTM(nn.LSTM):
        pass

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    proj = nn.LSTM(D, H, proj_size=4)
    sub = MyLSTM(D, H)
    param = nn.GRU(D, H)
    parametrize.register_parametrization(param, "weight_hh_l0", Double())
    tree = nn.ModuleDict({"proj": proj, "sub": sub, "param": param, "ok": nn.RNN(D, H)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ft.convert(tree)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert out["proj"] is proj and out["sub"] is sub and out["param"] is param and type(out["ok"]) is ft.RNN
    assert len(messages) == 3
    assert any("proj" in m and "proj_size=4" in m for m in messages)
    assert any("sub" in m and "MyLSTM" in m for m in messages)
    assert any("param" in m and "parametriz" in m for m in messages)


def test_bad_arguments_are_refused_before_anything_changes():
    tree = nn.Sequential(nn.LSTM(D, H))
    with pytest.raises(ValueError, match="to must be 'fastbptt' or 'torch'"):
        ft.convert(tree, to="onnx")
    with pytest.raises(ValueError, match="method must be"):
        ft.convert(tree, method="fast")
    with pytest.raises(TypeError, match="parallel must be a bool"):
        ft.convert(tree, parallel=1)
    with pytest.raises(ValueError, match="to='fastbptt' only"):
        ft.convert(tree, to="torch", method="blas")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ft.convert(nn.LSTM(D, H).state_dict())
    assert type(tree[0]) is nn.LSTM


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_a_module_on_another_device_is_converted_and_runs_torchs_implementation(cell):
    """The meta device stands in for CUDA/MPS here: the parameters stay where they are."""
    plain, fast = CELLS[cell]
    old = plain(D, H, num_layers=2, device="meta")
    new = ft.convert(old)
    assert type(new) is fast and all(p.device.type == "meta" for p in new.parameters())
    out, _ = new(torch.randn(T, B, D, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (T, B, H) and new.workspaces.made == 0
    assert type(ft.convert(new, to="torch")) is plain
