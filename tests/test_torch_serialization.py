"""fastbptt.torch modules through torch.save/torch.load (weights_only=True, PyTorch's default, and False),
copy.deepcopy and state_dict: the workspace cache is not state, the classes load as torch.nn's do."""

import copy
import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import textwrap
import zipfile
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
from torch import nn

import fastbptt
import fastbptt.torch as ft
from fastbptt.torch import modules as ft_modules

T, B, D, H = 25, 4, 8, 16
CELLS = {"RNN": (nn.RNN, ft.RNN), "GRU": (nn.GRU, ft.GRU), "LSTM": (nn.LSTM, ft.LSTM)}
# the torch.nn classes of the parent, allowlisted as PyTorch's word_language_model example does
TORCH_GLOBALS = [nn.ModuleDict, nn.Linear]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastbptt.__file__)))


def _model(cell, training, seed=0):
    """A parent module holding a fastbptt module (2 layers, both directions, dropout) after a forward and
    backward (its workspace cache populated)."""
    torch.manual_seed(seed)
    rnn = CELLS[cell][1](D, H, num_layers=2, bidirectional=True, dropout=0.3, method="blas")
    rnn.workspaces.max_count = 3
    model = nn.ModuleDict({"rnn": rnn, "head": nn.Linear(2 * H, 2)}).double()
    model.train(training)
    out, _ = model["rnn"](torch.randn(T, B, D, dtype=torch.float64))
    model["head"](out).sum().backward()
    assert len(rnn.workspaces) == 1
    return model


def _x(seed=5):
    return torch.randn(T, B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _step(model):
    """Output and parameter gradients of one eval-mode call (no dropout: the same in every process)."""
    was = model.training
    model.eval()
    model.zero_grad()
    x = _x()
    out, _ = model["rnn"](x)
    loss = model["head"](out).pow(2).sum()
    loss.backward()
    model.train(was)
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _globals(data):
    """The globals (classes, functions) a torch.save file's pickle names."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}


def _saved(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    return buf.getvalue()


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("weights_only", [True, False])
def test_a_saved_module_loads_back_as_fastbptts_and_computes_the_same(cell, training, weights_only):
    model = _model(cell, training)
    want_out, want_grads = _step(model)
    data = _saved(model)
    assert {g for g in _globals(data) if "fastbptt" in g} == {f"fastbptt.torch.modules {cell}"}  # no cache
    with torch.serialization.safe_globals(TORCH_GLOBALS):
        loaded = torch.load(io.BytesIO(data), weights_only=weights_only)
    rnn = loaded["rnn"]
    assert type(rnn) is CELLS[cell][1] and loaded.training is training and rnn.training is training
    assert rnn.method == "blas" and rnn.parallel is False and rnn.dropout == 0.3
    assert isinstance(rnn.workspaces, ft.WorkspaceCache) and rnn.workspaces is not model["rnn"].workspaces
    assert len(rnn.workspaces) == 0 and rnn.workspaces.made == 0 and rnn.workspaces.max_count == 3
    got_out, got_grads = _step(loaded)
    assert rnn.workspaces.made == 1                             # fastbptt's kernels ran, not PyTorch's code
    assert torch.equal(got_out, want_out)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert torch.equal(got_grads[name], want_grads[name]), name
    if training:                                                # and it trains on (dropout drawn anew)
        out, _ = rnn(_x(6))
        out.sum().backward()
        assert all(p.grad is not None for p in rnn.parameters())


def test_pickled_state_holds_no_workspace_cache_and_keeps_its_bounds():
    model = _model("LSTM", True)
    model["rnn"].workspaces.max_bytes = 12345
    data = pickle.dumps(model)
    assert b"WorkspaceCache" not in data and b"Workspace" not in data
    back = pickle.loads(data)
    cache = back["rnn"].workspaces
    assert (cache.max_count, cache.max_bytes, len(cache)) == (3, 12345, 0)


def test_a_file_written_with_the_cache_in_it_still_loads_with_weights_only():
    """Files saved before the cache was dropped from the state hold a WorkspaceCache: they load too."""
    model = _model("GRU", False)
    want_out, _ = _step(model)
    base = ft_modules._FastRNNBase.__getstate__

    def old_getstate(self):
        state = base(self)
        state.pop("_workspace_bounds")
        state["_workspaces"] = self.workspaces
        return state

    with mock.patch.object(ft_modules._FastRNNBase, "__getstate__", old_getstate):
        data = _saved(model)
    assert "fastbptt.torch.modules WorkspaceCache" in _globals(data)
    with torch.serialization.safe_globals(TORCH_GLOBALS):
        loaded = torch.load(io.BytesIO(data))
    assert loaded["rnn"].workspaces.max_count == 3 and len(loaded["rnn"].workspaces) == 0
    assert torch.equal(_step(loaded)[0], want_out)


def test_a_safe_globals_block_naming_fastbptts_class_leaves_the_registration():
    data = _saved(_model("RNN", False))
    with torch.serialization.safe_globals(TORCH_GLOBALS + [ft.RNN]):
        torch.load(io.BytesIO(data))
    with torch.serialization.safe_globals(TORCH_GLOBALS):
        assert type(torch.load(io.BytesIO(data))["rnn"]) is ft.RNN


def test_a_crafted_method_in_a_file_is_refused_on_loading():
    model = _model("LSTM", False)
    model["rnn"].__dict__["_method"] = "rm -rf"
    data = _saved(model)
    with torch.serialization.safe_globals(TORCH_GLOBALS), pytest.raises(Exception, match="method must be"):
        torch.load(io.BytesIO(data))


def test_loading_in_a_process_that_has_not_imported_fastbptt(tmp_path):
    """weights_only=False imports fastbptt itself and gives fastbptt's modules; weights_only=True names the
    class to allowlist (as for any class outside torch) and loads once fastbptt.torch is imported."""
    want = {}
    for cell in sorted(CELLS):
        model = _model(cell, cell == "GRU")
        (tmp_path / f"{cell}.pt").write_bytes(_saved(model))
        out, grads = _step(model)
        want[cell] = (out, grads)
    script = textwrap.dedent("""
        import json, sys
        import torch
        from torch import nn
        results = {}
        for cell in ("GRU", "LSTM", "RNN"):
            path = sys.argv[1] + "/" + cell + ".pt"
            with torch.serialization.safe_globals([nn.ModuleDict, nn.Linear]):
                try:
                    torch.load(path)
                    first = "loaded"
                except Exception as e:
                    first = type(e).__name__ + ": " + str(e)
            assert "fastbptt" not in sys.modules, "torch.load(weights_only=True) imported fastbptt"
            results[cell] = {"weights_only_before_import": first}
        for cell in ("GRU", "LSTM", "RNN"):
            path = sys.argv[1] + "/" + cell + ".pt"
            model = torch.load(path, weights_only=False)
            rnn = model["rnn"]
            results[cell]["class"] = type(rnn).__module__ + "." + type(rnn).__name__
            results[cell]["training"] = rnn.training
            import fastbptt.torch                       # noqa: F401  (already imported by the load)
            with torch.serialization.safe_globals([nn.ModuleDict, nn.Linear]):
                again = torch.load(path)
            results[cell]["class_weights_only"] = type(again["rnn"]).__name__
            again.eval()
            x = torch.randn(%d, %d, %d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
            out, _ = again["rnn"](x)
            again["head"](out).pow(2).sum().backward()
            torch.save({"out": out.detach(), "grads": {n: p.grad for n, p in again.named_parameters()},
                        "made": again["rnn"].workspaces.made}, sys.argv[1] + "/" + cell + ".out")
        print(json.dumps(results))
    """ % (T, B, D))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for cell in sorted(CELLS):
        r = results[cell]
        assert "UnpicklingError" in r["weights_only_before_import"]
        assert f"fastbptt.torch.modules.{cell}" in r["weights_only_before_import"]
        assert r["class"] == f"fastbptt.torch.modules.{cell}" and r["class_weights_only"] == cell
        assert r["training"] is (cell == "GRU")
        got = torch.load(tmp_path / f"{cell}.out")
        assert got["made"] == 1
        assert torch.equal(got["out"], want[cell][0])
        for name, g in want[cell][1].items():
            assert torch.equal(got["grads"][name], g), (cell, name)


def test_deepcopy_after_a_forward_is_an_independent_fast_module():
    model = _model("LSTM", True)
    want_out, want_grads = _step(model)
    twin = copy.deepcopy(model)
    rnn = twin["rnn"]
    assert type(rnn) is ft.LSTM and rnn.workspaces is not model["rnn"].workspaces
    assert len(rnn.workspaces) == 0 and rnn.workspaces.max_count == 3 and rnn.training
    got_out, got_grads = _step(twin)
    assert rnn.workspaces.made == 1
    assert torch.equal(got_out, want_out)
    for name in want_grads:
        assert torch.equal(got_grads[name], want_grads[name]), name
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(1.0)
    assert torch.equal(_step(model)[0], want_out)               # the original's weights are its own


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_state_dict_round_trips_between_fastbptt_and_torch_nn(cell):
    plain, fast = CELLS[cell]
    torch.manual_seed(4)
    source = fast(D, H, num_layers=2, bidirectional=True).double()
    source(_x())
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()))             # weights_only=True: plain tensors
    into_torch = plain(D, H, num_layers=2, bidirectional=True).double()
    into_fast = fast(D, H, num_layers=2, bidirectional=True).double()
    into_torch.load_state_dict(state)
    into_fast.load_state_dict(into_torch.state_dict())
    x = _x()
    want = into_torch(x)[0]
    assert torch.equal(into_fast(x)[0], source(x)[0])
    torch.testing.assert_close(into_fast(x)[0], want, rtol=0, atol=1e-12)
    assert into_fast.workspaces.made >= 1
