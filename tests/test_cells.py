"""The test matrix of every cell (issue 8), written once over the registry in cells_registry.py.

Every cell (Elman ``fastbptt.RNN``, ``fastbptt.GRU``, ``fastbptt.LSTM``) against its plain
NumPy reference (float64 to 1e-10 relative, float32 to its tolerance) over inputs, losses,
bias, h0, carry and method; forward/backward with a caller's ∂L/∂o; the layer API
(``layer_forward`` / ``layer_backward``) with ∂L/∂H and ∂L/∂state_T; parallel bitwise equal
to serial at realistic sizes and 1, 2, 3 threads; zero allocations with a workspace; the
references against central finite differences, saturating gates included; PyTorch's
nn.RNN / nn.GRU / nn.LSTM as a second oracle when installed; bad input; the caller's
arrays left alone; optimizers, copies, checkpoints, gradient-flow diagnostics, predict.
"""

import copy
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastbptt
from helpers import no_growth
from cells_registry import (BY_ID, CELLS, SATURATING, SCALE, assert_fd_close, assert_grads_close,
                            assert_state_close, copy_state, h_of, halves, make_carry, make_problem,
                            numerical_grad, state_arrays, torch)
from fastbptt import checkpoint, diagnostics, optim, reference
from helpers import assert_close

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

per_cell = pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
PAIRS = [(a, b) for a in CELLS for b in CELLS if a is not b]
per_pair = pytest.mark.parametrize("cell,other", PAIRS, ids=[f"{a.id}-vs-{b.id}" for a, b in PAIRS])


@pytest.fixture
def torch_mod():
    if torch is None:
        pytest.skip("torch not installed")
    return torch


def results(cell, out, names=("loss", "grads", "state_T", "dstate0", "dX")):
    """A call's results as {name: array copy}, the halves of paired states apart."""
    flat = {}
    for name, value in zip(names, out):
        if name == "grads":
            flat.update({f"grads[{k}]": np.array(v, copy=True) for k, v in value.items()})
        elif name in ("state_T", "dstate0"):
            for i, a in enumerate(state_arrays(cell, value, name)):
                flat[f"{name}[{i}]"] = np.array(a, copy=True)
        elif value is None:
            flat[name] = None
        else:
            flat[name] = np.array(value, copy=True)
    return flat


def differing_bits(a, b):
    """Names whose arrays are not bitwise equal (dtype, NaNs and signed zeros included)."""
    out = []
    for name, want in a.items():
        got = b[name]
        if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
            gap = np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)), initial=0.0)
            out.append(f"{name}: max |difference| {gap:.3e}")
    return out


def pointers(cell, out, names=("loss", "grads", "state_T", "dstate0", "dX")):
    """The data pointer of every array a call returned."""
    ptr = {}
    for name, value in zip(names, out):
        if name == "grads":
            ptr.update({f"grads[{k}]": v.ctypes.data for k, v in value.items()})
        elif name in ("state_T", "dstate0"):
            ptr.update({f"{name}[{i}]": a.ctypes.data for i, a in enumerate(state_arrays(cell, value, name))})
        elif isinstance(value, np.ndarray):
            ptr[name] = value.ctypes.data
    return ptr


# ----------------------------------------------------------------------------- the models


@per_cell
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_the_model_declares_its_cell_and_layout(cell, bias):
    D, H, O = 3, 5, 4
    model = cell.cls(D, H, O, bias=bias, dtype=np.float64, seed=0)
    assert model.cell == cell.id
    assert fastbptt.CELLS[cell.id] is cell.cls
    assert [(name, tuple(p.shape)) for name, p in model.params.items()] == cell.layout(D, H, O, bias)
    assert [(name, tuple(shape)) for name, shape in model.layout] == cell.layout(D, H, O, bias)
    assert model.n_params == model.flat.size == sum(int(np.prod(s)) for _, s in cell.layout(D, H, O, bias))
    for p in model.params.values():
        assert np.shares_memory(p, model.flat)


# ----------------------------------------------------------------------------- against the reference


@per_cell
@dtypes
@pytest.mark.parametrize("inputs,loss", [("dense", "cross_entropy"), ("tokens", "cross_entropy"),
                                         ("dense", "mse"), ("tokens", "mse")])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "h0_none"])
@pytest.mark.parametrize("carry", [None, "T", "TB"], ids=["carry_none", "carry_T", "carry_TB"])
@pytest.mark.parametrize("method", ["fused", "blas", "auto"])
def test_loss_and_grad_against_the_reference(cell, dtype, inputs, loss, bias, h0, carry, method):
    T, B = 5, 3
    model, X, Y, state0 = make_problem(cell, T=T, B=B, D=4, H=6, O=5, bias=bias, loss=loss,
                                       inputs=inputs, dtype=dtype, seed=2, h0=h0)
    c = make_carry(carry, T, B, dtype)
    L, grads, state_T, dstate0, dX = fastbptt.loss_and_grad(
        model, X, Y, state0, loss, carry=c, method=method, return_dh0=True, return_dX=True)
    want_L, want_grads, want_state, want_dstate0, want_dX = cell.reference(model, X, Y, state0, loss, c)
    assert set(grads) == set(model.params)
    assert_close("loss", L, want_L, dtype)
    assert_grads_close(grads, want_grads, dtype)
    assert_state_close(cell, "state_T", state_T, want_state, dtype)
    assert_state_close(cell, "dstate0", dstate0, want_dstate0, dtype)
    assert_close("dX", dX, want_dX, dtype)
    for a in [*grads.values(), *state_arrays(cell, state_T), *state_arrays(cell, dstate0), dX]:
        assert a.dtype == dtype


@per_cell
@dtypes
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_saturating_gates_against_the_reference(cell, dtype, method):
    """Weights x3: gates at 0 or 1 and tanh at ±1, where derivative mistakes hide."""
    T, B = 8, 3
    model, X, Y, state0 = make_problem(cell, T=T, B=B, D=4, H=6, O=5, dtype=dtype, seed=4, saturating=True)
    assert cell.saturation(model, X, state0) > 0.2
    c = make_carry("TB", T, B, dtype)
    L, grads, state_T, dstate0, dX = fastbptt.loss_and_grad(
        model, X, Y, state0, carry=c, method=method, return_dh0=True, return_dX=True)
    want_L, want_grads, want_state, want_dstate0, want_dX = cell.reference(model, X, Y, state0, carry=c)
    assert_close("loss", L, want_L, dtype)
    assert_grads_close(grads, want_grads, dtype)
    assert_state_close(cell, "state_T", state_T, want_state, dtype)
    assert_state_close(cell, "dstate0", dstate0, want_dstate0, dtype)
    assert_close("dX", dX, want_dX, dtype)


@per_cell
def test_results_come_in_the_documented_order(cell):
    """(loss, grads, state_T) then ∂L/∂state_0 if asked (a pair for the LSTM), then ∂L/∂X if asked."""
    T, B, D, H = 4, 2, 3, 5
    model, X, Y, state0 = make_problem(cell, T=T, B=B, D=D, H=H, O=4, seed=1)
    full = results(cell, fastbptt.loss_and_grad(model, X, Y, state0, return_dh0=True, return_dX=True))
    out = fastbptt.loss_and_grad(model, X, Y, state0)
    assert len(out) == 3
    assert not differing_bits({k: v for k, v in full.items() if not k.startswith(("dstate0", "dX"))},
                              results(cell, out))
    out = fastbptt.loss_and_grad(model, X, Y, state0, return_dh0=True)
    assert len(out) == 4
    assert not differing_bits({k: v for k, v in full.items() if k.startswith("dstate0")},
                              results(cell, out[3:], ("dstate0",)))
    out = fastbptt.loss_and_grad(model, X, Y, state0, return_dX=True)
    assert len(out) == 4 and out[3].shape == (T, B, D)
    assert not differing_bits({"dX": full["dX"]}, results(cell, out[3:], ("dX",)))


# ----------------------------------------------------------------------------- forward / backward


@per_cell
@dtypes
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_forward_then_backward_with_a_callers_dO(cell, dtype, inputs, method):
    """forward() gives the reference's outputs and state; backward() with any ∂L/∂o gives the
    reference's gradients for it (through the mse targets that have that gradient)."""
    T, B = 5, 3
    model, X, _, state0 = make_problem(cell, T=T, B=B, D=4, H=6, O=5, inputs=inputs, dtype=dtype, seed=3)
    ws = fastbptt.Workspace(model, T, B)
    O, state_T = fastbptt.forward(model, X, state0, workspace=ws, method=method)
    assert_close("O", O, cell.outputs(model, X, state0), dtype)
    assert_state_close(cell, "state_T", state_T, cell.hidden(model, X, state0)[1], dtype)
    dO = np.random.default_rng(5).normal(size=O.shape).astype(dtype)
    c = make_carry("TB", T, B, dtype)
    grads, dstate0, dX = fastbptt.backward(model, dO, workspace=ws, carry=c, method=method,
                                           return_dh0=True, return_dX=True)
    _, want_grads, _, want_dstate0, want_dX = cell.reference_with_dO(model, X, state0, dO, c)
    assert_grads_close(grads, want_grads, dtype)
    assert_state_close(cell, "dstate0", dstate0, want_dstate0, dtype)
    assert_close("dX", dX, want_dX, dtype)


@per_cell
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_backward_of_the_loss_gradient_is_loss_and_grad(cell, loss, method):
    T, B = 6, 2
    model, X, Y, state0 = make_problem(cell, T=T, B=B, loss=loss, inputs="tokens", seed=6)
    ws = fastbptt.Workspace(model, T, B)
    O, _ = fastbptt.forward(model, X, state0, workspace=ws, method=method)
    _, dO = reference.loss_and_output_grad(np.array(O), Y, loss)
    grads, dstate0 = fastbptt.backward(model, dO, workspace=ws, method=method, return_dh0=True)
    grads, dstate0 = {k: v.copy() for k, v in grads.items()}, copy_state(dstate0)
    _, want, _, want_dstate0 = fastbptt.loss_and_grad(model, X, Y, state0, loss, method=method, return_dh0=True)
    assert_grads_close(grads, want, np.float64)
    assert_state_close(cell, "dstate0", dstate0, want_dstate0, np.float64)


# ----------------------------------------------------------------------------- the layer API


@per_cell
@dtypes
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
@pytest.mark.parametrize("method", ["fused", "blas", "auto"])
@pytest.mark.parametrize("carry", [None, "TB"], ids=["carry_none", "carry_TB"])
def test_layer_forward_and_backward_against_the_reference(cell, dtype, inputs, method, carry):
    """H_all is the reference's hidden states; layer_backward with the readout's ∂L/∂H = ∂L/∂O W_qh
    gives loss_and_grad's recurrent gradients, ∂L/∂X and ∂L/∂state_0; the readout's stay zero."""
    T, B = 5, 3
    model, X, Y, state0 = make_problem(cell, T=T, B=B, D=4, H=6, O=5, inputs=inputs, dtype=dtype, seed=7)
    c = make_carry(carry, T, B, dtype)
    ws = fastbptt.Workspace(model, T, B)
    H_all, state_T = fastbptt.layer_forward(model, X, state0, workspace=ws, method=method)
    want_H, want_state = cell.hidden(model, X, state0)
    assert_close("H_all", H_all, want_H, dtype)
    assert_state_close(cell, "state_T", state_T, want_state, dtype)

    _, dO = reference.loss_and_output_grad(cell.outputs(model, X, state0), Y)
    dH = (dO @ cell.params64(model)["W_qh"]).astype(dtype)
    grads, dX, dstate0 = fastbptt.layer_backward(model, dH, workspace=ws, method=method, carry=c)
    _, want_grads, _, want_dstate0, want_dX = cell.reference(model, X, Y, state0, carry=c)
    assert set(grads) == set(model.params)
    assert_grads_close(grads, want_grads, dtype, names=cell.recurrent(model))
    for name in ("W_qh", "b_q"):
        assert not grads[name].any(), f"layer_backward left a gradient in the readout's {name}"
    assert_close("dX", dX, want_dX, dtype)
    assert_state_close(cell, "dstate0", dstate0, want_dstate0, dtype)

    fastbptt.layer_forward(model, X, state0, workspace=ws, method=method)
    out = fastbptt.layer_backward(model, dH, workspace=ws, method=method, carry=c, return_dX=False)
    assert out[1] is None
    assert_grads_close(out[0], want_grads, dtype, names=cell.recurrent(model))


@per_cell
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_layer_backward_with_dstate_T_against_finite_differences(cell, method):
    """layer_backward(dH, dstate_T) is the gradient of <dH, H_all> + <dstate_T, state_T>
    (for the LSTM dstate_T = (∂/∂h_T, ∂/∂c_T), both nonzero)."""
    T, B, D, H = 3, 2, 3, 3
    model, X, _, state0 = make_problem(cell, T=T, B=B, D=D, H=H, O=2, seed=8)
    rng = np.random.default_rng(9)
    dH = rng.normal(size=(T, B, H))
    dstate_T = cell.random_state(rng, B, H)
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.layer_forward(model, X, state0, workspace=ws, method=method)
    grads, dX, dstate0 = fastbptt.layer_backward(model, dH, dstate_T, workspace=ws, method=method)

    def f():        # reads X, state0 and the parameters, which numerical_grad changes in place
        H_all, state_T = cell.hidden(model, X, state0)
        return float(np.sum(dH * H_all) + sum(np.sum(d * s) for d, s in zip(halves(dstate_T), halves(state_T))))

    for name in cell.recurrent(model):
        assert_fd_close(name, grads[name], numerical_grad(f, model.params[name]))
    assert_fd_close("dX", dX, numerical_grad(f, X))
    for i, (got, s) in enumerate(zip(state_arrays(cell, dstate0, "dstate0"), halves(state0))):
        assert_fd_close(f"dstate0[{i}]", got, numerical_grad(f, s))
    # and dstate_T reaches the result: without it the gradients differ
    fastbptt.layer_forward(model, X, state0, workspace=ws, method=method)
    without = fastbptt.layer_backward(model, dH, workspace=ws, method=method)[0]
    assert not np.allclose(without["W_hh"], numerical_grad(f, model.params["W_hh"]))


@per_cell
def test_layer_parallel_is_bitwise_serial(cell):
    T, B, D, H = 50, 13, 11, 37
    model, X, _, state0 = make_problem(cell, T=T, B=B, D=D, H=H, O=3, dtype=np.float32, seed=10)
    model.flat[...] *= 0.5
    rng = np.random.default_rng(11)
    dH = rng.normal(size=(T, B, H)).astype(np.float32)
    dstate_T = cell.random_state(rng, B, H, np.float32)
    c = make_carry("TB", T, B, np.float32)
    differ = []
    for method in ("fused", "blas"):
        runs = []
        for parallel in (False, True):
            ws = fastbptt.Workspace(model, T, B)
            H_all, state_T = fastbptt.layer_forward(model, X, state0, workspace=ws, parallel=parallel,
                                                    method=method)
            fwd = results(cell, (H_all, state_T), ("H_all", "state_T"))
            out = fastbptt.layer_backward(model, dH, dstate_T, workspace=ws, parallel=parallel,
                                          method=method, carry=c)
            runs.append({**fwd, **results(cell, out, ("grads", "dX", "dstate0"))})
        differ += [f"{method} {d}" for d in differing_bits(*runs)]
    assert not differ, "parallel=True is not bitwise serial:\n" + "\n".join(differ)


# ----------------------------------------------------------------------------- threads


THREADS_SCRIPT = r"""
import json, traceback
import numba
import numpy as np
import fastbptt
from cells_registry import CELLS, make_carry, make_problem, state_arrays

T, B, D, H, O = 50, 13, 11, 37, 9          # T·B = 650; B a multiple of no thread count
report = {}
for cell in CELLS:
    entry = report[cell.id] = {"threads_seen": [], "checked": 0, "mismatches": [], "error": None}
    try:
        for threads in (1, 2, 3):
            numba.set_num_threads(threads)
            entry["threads_seen"].append(numba.get_num_threads())
            for method in ("fused", "blas"):
                for inputs, loss in (("tokens", "cross_entropy"), ("dense", "mse")):
                    for dtype in (np.float32, np.float64):
                        model, X, Y, state0 = make_problem(cell, T=T, B=B, D=D, H=H, O=O, loss=loss,
                                                           inputs=inputs, dtype=dtype, seed=threads)
                        model.flat[...] *= 0.5
                        carry = make_carry("TB", T, B, dtype, seed=threads)
                        runs = []
                        for parallel in (False, True):
                            L, grads, sT, ds0, dX = fastbptt.loss_and_grad(
                                model, X, Y, state0, loss, carry=carry, parallel=parallel, method=method,
                                return_dh0=True, return_dX=True)
                            out = {"loss": np.float64(L), "dX": dX, **grads}
                            out.update({f"state_T[{i}]": a for i, a in enumerate(state_arrays(cell, sT))})
                            out.update({f"dstate0[{i}]": a for i, a in enumerate(state_arrays(cell, ds0))})
                            runs.append({k: (np.asarray(v).dtype.str, np.asarray(v).tobytes())
                                         for k, v in out.items()})
                        entry["checked"] += 1
                        for name in runs[0]:
                            if runs[0][name] != runs[1][name]:
                                entry["mismatches"].append(f"{name}: threads={threads} {method} {inputs} "
                                                           f"{loss} {np.dtype(dtype).name}")
    except Exception:
        entry["error"] = traceback.format_exc()[-3000:]
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def thread_report():
    """One subprocess with NUMBA_NUM_THREADS=3 runs every cell (Numba cannot go above the
    thread count it started with, and this machine may have fewer cores)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="3")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


@per_cell
def test_parallel_is_bitwise_serial_at_1_2_3_threads(cell, thread_report):
    """T=50, B=13 (a multiple of no thread count), both methods, both dtypes, tokens and dense,
    carry weights: loss, every gradient, state_T, ∂L/∂state_0 and ∂L/∂X, bit for bit."""
    entry = thread_report[cell.id]
    assert entry["error"] is None, entry["error"]
    assert entry["threads_seen"] == [1, 2, 3]
    assert entry["checked"] == 3 * 2 * 2 * 2
    assert not entry["mismatches"], "\n".join(entry["mismatches"][:40])


# ----------------------------------------------------------------------------- workspaces


@per_cell
def test_state_T_fed_back_as_h0_carries_the_state(cell):
    """Two chunks through one workspace, the first's state_T (a view into it) fed back as h0,
    end in the reference's state after both."""
    T, B = 6, 2
    model, X, Y, state0 = make_problem(cell, T=T, B=B, inputs="tokens", seed=12)
    ws = fastbptt.Workspace(model, 3, B)
    _, _, state = fastbptt.loss_and_grad(model, X[:3], Y[:3], state0, workspace=ws)
    _, _, state = fastbptt.loss_and_grad(model, X[3:], Y[3:], state, workspace=ws)
    assert_state_close(cell, "state_T", state, cell.hidden(model, X, state0)[1], np.float64)


@per_cell
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_steady_state_allocates_nothing(cell, inputs, parallel, method):
    T, B, H = 50, 32, 64
    model, X, Y, state0 = make_problem(cell, T=T, B=B, D=20, H=H, O=20, inputs=inputs, dtype=np.float32)
    ws = fastbptt.Workspace(model, T, B)
    kwargs = dict(workspace=ws, parallel=parallel, return_dh0=True, return_dX=True, method=method)
    first = pointers(cell, fastbptt.loss_and_grad(model, X, Y, state0, **kwargs))
    second = pointers(cell, fastbptt.loss_and_grad(model, X, Y, state0, **kwargs))
    assert first == second, "a second call returned arrays in other memory"
    no_growth(lambda: fastbptt.loss_and_grad(model, X, Y, state0, **kwargs), B * H * 4)


@per_cell
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_layer_steady_state_allocates_nothing(cell, method):
    T, B, H = 50, 32, 64
    model, X, _, state0 = make_problem(cell, T=T, B=B, D=20, H=H, O=20, dtype=np.float32)
    rng = np.random.default_rng(0)
    dH = rng.normal(size=(T, B, H)).astype(np.float32)
    dstate_T = cell.random_state(rng, B, H, np.float32)
    ws = fastbptt.Workspace(model, T, B)

    def call():
        fwd = fastbptt.layer_forward(model, X, state0, workspace=ws, method=method)
        bwd = fastbptt.layer_backward(model, dH, dstate_T, workspace=ws, method=method)
        return {**pointers(cell, fwd, ("H_all", "state_T")), **pointers(cell, bwd, ("grads", "dX", "dstate0"))}

    assert call() == call(), "a second call returned arrays in other memory"
    no_growth(call, B * H * 4)


# ----------------------------------------------------------------------------- the references


@per_cell
@pytest.mark.parametrize("saturating", [False, True], ids=["normal", "saturating"])
@pytest.mark.parametrize("inputs,loss", [("dense", "cross_entropy"), ("tokens", "mse")])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_reference_against_finite_differences(cell, saturating, inputs, loss, bias):
    T, B = 4, 2
    model, X, Y, state0 = make_problem(cell, T=T, B=B, D=3, H=3, O=3, bias=bias, loss=loss, inputs=inputs,
                                       seed=13, saturating=saturating)
    if saturating:
        assert cell.saturation(model, X, state0) > 0.2
    L, grads, _, dstate0, dX = cell.reference(model, X, Y, state0, loss)

    def f():
        return cell.reference(model, X, Y, state0, loss)[0]

    for name, p in model.params.items():           # float64 views: changed in place by numerical_grad
        assert_fd_close(name, grads[name], numerical_grad(f, p))
    for i, (want, s) in enumerate(zip(halves(dstate0), halves(state0))):
        assert_fd_close(f"dstate0[{i}]", want, numerical_grad(f, s))
    if inputs == "dense":
        assert_fd_close("dX", dX, numerical_grad(f, X))


# ----------------------------------------------------------------------------- PyTorch


def _scale_grad(t, w):
    """t in the forward pass; its gradient times w in the backward pass (the carry weights)."""
    return t * w + (t * (1 - w)).detach()


@per_cell
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("saturating", [False, True], ids=["normal", "saturating"])
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
@pytest.mark.parametrize("carry", [None, "TB"], ids=["carry_none", "carry_TB"])
@pytest.mark.parametrize("method", ["fused", "blas"])
def test_against_pytorch(torch_mod, cell, bias, saturating, inputs, carry, method):
    """nn.RNN / nn.GRU / nn.LSTM + a linear readout + F.cross_entropy (mean over T·B), in float64,
    weights copied one to one into model.params: loss, final state, every gradient, ∂L/∂X and
    ∂L/∂state_0 to 1e-10 relative. With carry weights, the sequence runs step by step with each
    step's incoming state's gradient scaled."""
    T, B, D, H, O = 6, 3, 4, 5, 4
    rng = np.random.default_rng(14)
    layer = cell.torch_layer(D, H, bias, rng, SCALE * (SATURATING if saturating else 1.0))
    model = cell.cls(D, H, O, bias=bias, dtype=np.float64, seed=0)
    cell.load_from_torch(model, layer)
    model.params["W_qh"][...] = rng.normal(0, SCALE, (O, H))
    if bias:
        model.params["b_q"][...] = rng.normal(0, SCALE, O)
    X = rng.normal(size=(T, B, D)) if inputs == "dense" else rng.integers(0, D, size=(T, B))
    Y = rng.integers(0, O, size=(T, B))
    state0 = cell.random_state(rng, B, H)
    c = make_carry(carry, T, B)

    W_qh = torch_mod.tensor(model.params["W_qh"], requires_grad=True)
    b_q = torch_mod.tensor(model.params["b_q"], requires_grad=True) if bias else None
    x = torch_mod.tensor(X if inputs == "dense" else np.eye(D)[X], requires_grad=True)
    leaves = [torch_mod.tensor(s, requires_grad=True) for s in halves(state0)]

    def pack(states):
        s = [t[None] for t in states]
        return tuple(s) if cell.paired else s[0]

    def unpack(last):
        return [t[0] for t in (last if cell.paired else (last,))]

    if c is None:
        out, last = layer(x, pack(leaves))
        last = unpack(last)
    else:
        w = torch_mod.tensor(c[..., None])
        last, outs = leaves, []
        for t in range(T):
            o, new = layer(x[t:t + 1], pack([_scale_grad(s, w[t]) for s in last]))
            outs.append(o[0])
            last = unpack(new)
        out = torch_mod.stack(outs)
    logits = out @ W_qh.T + (b_q if bias else 0)
    loss = torch_mod.nn.functional.cross_entropy(logits.reshape(-1, O), torch_mod.tensor(Y).reshape(-1))
    loss.backward()

    L, grads, state_T, dstate0, dX = fastbptt.loss_and_grad(model, X, Y, state0, carry=c, method=method,
                                                            return_dh0=True, return_dX=True)
    want = cell.torch_grads(layer)
    want["W_qh"] = W_qh.grad.numpy()
    if bias:
        want["b_q"] = b_q.grad.numpy()
    assert set(want) == set(model.params)
    assert_close("loss", L, loss.item(), np.float64)
    assert_grads_close(grads, want, np.float64)
    assert_state_close(cell, "state_T", state_T, [t.detach().numpy() for t in last], np.float64)
    assert_state_close(cell, "dstate0", dstate0, [t.grad.numpy() for t in leaves], np.float64)
    assert_close("dX", dX, x.grad.numpy(), np.float64)


# ----------------------------------------------------------------------------- diagnostics


@per_cell
@dtypes
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_hidden_grad_norms_against_the_reference(cell, dtype, loss):
    """‖∂L/∂h_t‖ for t = 1..T after loss_and_grad: (T,) finite, positive, equal to the norms of the
    reference's ∂L/∂h_t (for the LSTM, with c_t held: it includes every path through c)."""
    T, B = 6, 2
    model, X, Y, state0 = make_problem(cell, T=T, B=B, loss=loss, dtype=dtype, seed=15)
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, state0, loss, workspace=ws)
    norms = diagnostics.hidden_grad_norms(model, ws)
    assert norms.shape == (T,) and np.all(np.isfinite(norms)) and np.all(norms > 0)
    want = cell.hidden_grads(model, X, Y, state0, loss)
    assert_close("‖dL/dh_t‖", norms, np.sqrt((want ** 2).sum(axis=(1, 2))), dtype)
    per_seq = diagnostics.hidden_grad_norms(model, ws, per_sequence=True)
    assert per_seq.shape == (T, B)
    assert_close("‖dL/dh_t‖ per sequence", per_seq, np.linalg.norm(want, axis=2), dtype)


@per_cell
def test_hidden_grad_norms_against_pytorch(torch_mod, cell):
    """The same against autograd: nn.RNNCell/GRUCell/LSTMCell step by step, retain_grad on each h_t."""
    T, B, O = 7, 3, 5
    model, X, Y, state0 = make_problem(cell, T=T, B=B, O=O, seed=16)
    step = cell.torch_cell(model)
    W_qh, b_q = torch_mod.tensor(model.params["W_qh"]), torch_mod.tensor(model.params["b_q"])
    x = torch_mod.tensor(X)
    state = [torch_mod.tensor(s) for s in halves(state0)]
    hs, logits = [], []
    for t in range(T):
        state = list(step(x[t], tuple(state))) if cell.paired else [step(x[t], state[0])]
        state[0].retain_grad()
        hs.append(state[0])
        logits.append(state[0] @ W_qh.T + b_q)
    loss = torch_mod.nn.functional.cross_entropy(torch_mod.cat(logits), torch_mod.tensor(Y).reshape(-1))
    loss.backward()
    want = np.stack([h.grad.numpy() for h in hs])
    assert_close("the registry's dL/dh_t", cell.hidden_grads(model, X, Y, state0), want, np.float64)
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, state0, workspace=ws)
    assert_close("‖dL/dh_t‖", diagnostics.hidden_grad_norms(model, ws),
                 np.sqrt((want ** 2).sum(axis=(1, 2))), np.float64)


# ----------------------------------------------------------------------------- bad input


@per_cell
@pytest.mark.parametrize("api", ["loss_and_grad", "forward", "layer_forward"])
def test_a_state_of_the_wrong_form_is_refused_naming_h0(cell, api):
    T, B, H = 3, 2, 4
    model, X, Y, _ = make_problem(cell, T=T, B=B, H=H, seed=17)
    rng = np.random.default_rng(0)
    h, c = rng.normal(size=(B, H)), rng.normal(size=(B, H))
    if cell.paired:
        bad = [h, (h,), (h, c, c), (h, c[:, :-1]), (h[:-1], c), (h, c.astype(np.float32)),
               (h, np.ones((B, H), np.int64))]
    else:
        bad = [(h, c), h[:, :-1], h[None]]
    call = {"loss_and_grad": lambda s: fastbptt.loss_and_grad(model, X, Y, s),
            "forward": lambda s: fastbptt.forward(model, X, s),
            "layer_forward": lambda s: fastbptt.layer_forward(model, X, s)}[api]
    for state in bad:
        with pytest.raises((ValueError, TypeError), match="h0"):
            call(state)


@per_cell
@pytest.mark.parametrize("where", ["X", "Y", "h0", "carry", "dO"])
def test_masked_arrays_are_refused(cell, where):
    T, B = 3, 2
    model, X, Y, state0 = make_problem(cell, T=T, B=B, seed=18)
    carry = make_carry("TB", T, B)
    ws = fastbptt.Workspace(model, T, B)
    if where == "dO":
        O, _ = fastbptt.forward(model, X, state0, workspace=ws)
        with pytest.raises(TypeError, match="masked"):
            fastbptt.backward(model, np.ma.array(np.array(O)), workspace=ws)
        return
    if where == "h0":
        variants = [np.ma.array(state0)] if not cell.paired else [
            (np.ma.array(state0[0]), state0[1]), (state0[0], np.ma.array(state0[1]))]
    else:
        variants = [None]
    for masked_state in variants:
        args = {"X": X, "Y": Y, "h0": state0, "carry": carry}
        if where == "h0":
            args["h0"] = masked_state
        else:
            args[where] = np.ma.array(args[where])
        with pytest.raises(TypeError, match="masked"):
            fastbptt.loss_and_grad(model, args["X"], args["Y"], args["h0"], carry=args["carry"], workspace=ws)


@per_cell
def test_layer_backward_bad_input(cell):
    T, B, H = 3, 2, 4
    model, X, _, state0 = make_problem(cell, T=T, B=B, H=H, seed=19)
    rng = np.random.default_rng(1)
    dH = rng.normal(size=(T, B, H))
    dstate_T = cell.random_state(rng, B, H)
    fresh = fastbptt.Workspace(model, T, B)
    with pytest.raises(ValueError):                       # no layer_forward on this workspace
        fastbptt.layer_backward(model, dH, workspace=fresh)
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.layer_forward(model, X, state0, workspace=ws)
    with pytest.raises(ValueError, match="dH"):
        fastbptt.layer_backward(model, dH[:, :, :-1], workspace=ws)
    with pytest.raises(TypeError, match="dH"):
        fastbptt.layer_backward(model, dH.astype(np.float32), workspace=ws)
    with pytest.raises(TypeError, match="masked"):
        fastbptt.layer_backward(model, np.ma.array(dH), workspace=ws)
    parts = halves(dstate_T)
    wrong = [[h[:, :-1] for h in parts]]
    wrong.append([np.stack(parts)] if cell.paired else [dstate_T, dstate_T])     # the other form
    masked = [[np.ma.array(h) if j == i else h for j, h in enumerate(parts)] for i in range(len(parts))]
    for parts in wrong + masked:
        value = tuple(parts) if len(parts) > 1 else parts[0]
        with pytest.raises((ValueError, TypeError), match="dstate_T|masked"):
            fastbptt.layer_backward(model, dH, value, workspace=ws)
    # nothing refused ran: the workspace still holds the forward pass
    grads, _, _ = fastbptt.layer_backward(model, dH, dstate_T, workspace=ws)
    assert np.any(grads["W_hh"])


@per_pair
def test_a_workspace_of_another_cell_is_refused(cell, other):
    """Same sizes, bias and dtype, another cell: its buffers do not fit."""
    T, B = 3, 2
    model, X, Y, state0 = make_problem(cell, T=T, B=B, seed=20)
    foreign = fastbptt.Workspace(other.build(4, 6, 5, seed=1), T, B)
    with pytest.raises(ValueError):
        fastbptt.loss_and_grad(model, X, Y, state0, workspace=foreign)
    with pytest.raises(ValueError):
        fastbptt.forward(model, X, state0, workspace=foreign)
    with pytest.raises(ValueError):
        fastbptt.layer_forward(model, X, state0, workspace=foreign)


@per_cell
def test_the_callers_arrays_are_never_modified(cell):
    T, B = 4, 3
    for inputs, loss in (("dense", "mse"), ("tokens", "cross_entropy")):
        model, X, Y, state0 = make_problem(cell, T=T, B=B, loss=loss, inputs=inputs, seed=21)
        carry = make_carry("TB", T, B)
        dO = np.random.default_rng(2).normal(size=(T, B, 5))
        arrays = {"X": X, "Y": Y, "carry": carry, "dO": dO}
        arrays.update({f"h0[{i}]": s for i, s in enumerate(halves(state0))})
        before = {k: v.copy() for k, v in arrays.items()}
        for method in ("fused", "blas"):
            for parallel in (False, True):
                fastbptt.loss_and_grad(model, X, Y, state0, loss, carry=carry, method=method, parallel=parallel,
                                       return_dh0=True, return_dX=True)
                ws = fastbptt.Workspace(model, T, B)
                fastbptt.forward(model, X, state0, workspace=ws, method=method, parallel=parallel)
                fastbptt.backward(model, dO, workspace=ws, carry=carry, method=method, parallel=parallel,
                                  return_dh0=True, return_dX=True)
        assert not differing_bits(before, arrays), f"{inputs}: the caller's arrays changed"


@per_cell
def test_the_layer_api_leaves_the_callers_arrays_alone(cell):
    T, B, H = 4, 3, 6
    model, X, _, state0 = make_problem(cell, T=T, B=B, H=H, seed=22)
    rng = np.random.default_rng(3)
    dH = rng.normal(size=(T, B, H))
    dstate_T = cell.random_state(rng, B, H)
    carry = make_carry("T", T, B)
    arrays = {"X": X, "dH": dH, "carry": carry}
    arrays.update({f"h0[{i}]": s for i, s in enumerate(halves(state0))})
    arrays.update({f"dstate_T[{i}]": s for i, s in enumerate(halves(dstate_T))})
    before = {k: v.copy() for k, v in arrays.items()}
    for method in ("fused", "blas"):
        for parallel in (False, True):
            ws = fastbptt.Workspace(model, T, B)
            fastbptt.layer_forward(model, X, state0, workspace=ws, method=method, parallel=parallel)
            fastbptt.layer_backward(model, dH, dstate_T, workspace=ws, method=method, parallel=parallel,
                                    carry=carry)
    assert not differing_bits(before, arrays), "the caller's arrays changed"


# ----------------------------------------------------------------------------- training tools


def _fixed_batch(V=6, T=8, B=4, seed=0):
    """Token ids and their successors (mod V): learnable from the current token alone."""
    X = np.random.default_rng(seed).integers(0, V, size=(T, B))
    return X, (X + 1) % V


@per_cell
def test_adam_reduces_the_loss(cell):
    V, H = 6, 12
    X, Y = _fixed_batch(V)
    model = cell.cls(V, H, V, dtype=np.float32, seed=0)
    opt = optim.Adam(model, lr=0.05)
    ws = fastbptt.Workspace(model, *X.shape)
    losses = []
    for _ in range(30):
        losses.append(fastbptt.loss_and_grad(model, X, Y, workspace=ws)[0])
        opt.step(ws.grad_flat)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} after 30 Adam steps"


@per_cell
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_a_copied_model_is_the_same_model(cell, how, bias):
    model, X, Y, state0 = make_problem(cell, bias=bias, dtype=np.float32, seed=23)
    clone = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
    assert type(clone) is type(model)
    assert getattr(clone, "cell", None) == getattr(model, "cell", None)
    assert clone.dtype == model.dtype and clone.bias == model.bias
    assert (clone.input_size, clone.hidden_size, clone.output_size) == (
        model.input_size, model.hidden_size, model.output_size)
    assert list(clone.params) == list(model.params)
    assert clone.flat.tobytes() == model.flat.tobytes()
    assert not np.shares_memory(clone.flat, model.flat)
    for p in clone.params.values():
        assert np.shares_memory(p, clone.flat)
    a = results(cell, fastbptt.loss_and_grad(model, X, Y, state0), ("loss", "grads", "state_T"))
    b = results(cell, fastbptt.loss_and_grad(clone, X, Y, state0), ("loss", "grads", "state_T"))
    assert not differing_bits(a, b)


def _train(model, opt, batches):
    ws = fastbptt.Workspace(model, *batches[0][0].shape)
    state = None
    for X, Y in batches:
        _, _, state = fastbptt.loss_and_grad(model, X, Y, state, workspace=ws)
        state = copy_state(state)
        optim.clip_grad_norm(ws.grad_flat, 1.0)
        opt.step(ws.grad_flat)
    return state


@per_cell
def test_resuming_from_a_checkpoint_is_bitwise(cell, tmp_path):
    batches = [_fixed_batch(5, T=6, B=3, seed=s) for s in range(8)]
    model = cell.cls(5, 8, 5, dtype=np.float32, seed=3)
    opt = optim.Adam(model, lr=0.05)
    _train(model, opt, batches[:3])
    checkpoint.save(tmp_path / "ck.npz", model, opt, extra={"step": 3})
    _train(model, opt, batches[3:])                      # the uninterrupted run

    resumed = checkpoint.load(tmp_path / "ck.npz")
    assert type(resumed.model) is type(model)
    assert getattr(resumed.model, "cell", None) == getattr(model, "cell", None)
    assert resumed.extra == {"step": 3} and resumed.optimizer.t == 3
    _train(resumed.model, resumed.optimizer, batches[3:])
    assert resumed.model.flat.tobytes() == model.flat.tobytes()
    for k in opt.state:
        assert resumed.optimizer.state[k].tobytes() == opt.state[k].tobytes()
    assert checkpoint.load(tmp_path / "ck.npz").model.flat.tobytes() != model.flat.tobytes()


@per_pair
def test_a_checkpoint_of_another_cell_is_refused(cell, other, tmp_path):
    model = cell.cls(5, 8, 5, dtype=np.float32, seed=3)
    checkpoint.save(tmp_path / "m.npz", model)
    target = other.cls(5, 8, 5, dtype=np.float32, seed=4)
    before = target.flat.copy()
    with pytest.raises(ValueError):
        checkpoint.load(tmp_path / "m.npz", target)
    assert target.flat.tobytes() == before.tobytes()
    assert type(checkpoint.load(tmp_path / "m.npz").model) is cell.cls


@per_cell
def test_predict(cell):
    """Greedy predict continues the prefix with the argmax of the reference's outputs, step by step."""
    text = "the time machine by h g wells "
    vocab = fastbptt.data.Vocab(list(text))
    V = len(vocab)
    model = cell.build(V, 8, V, dtype=np.float64, seed=24)
    prefix, n = "time ", 12
    got = fastbptt.predict(model, vocab, prefix, n)
    ids = list(vocab[list(prefix)])
    for _ in range(n):
        O = cell.outputs(model, np.array(ids)[:, None])
        ids.append(int(np.argmax(O[-1, 0])))
    assert got == prefix + "".join(vocab.to_tokens(ids[len(prefix):]))
    sampled = fastbptt.predict(model, vocab, prefix, n, temperature=1.0, rng=5)
    assert sampled == fastbptt.predict(model, vocab, prefix, n, temperature=1.0, rng=5)
    tokens = sampled.replace("<unk>", "?")            # the unknown token may be drawn: one token
    assert sampled.startswith(prefix) and len(tokens) == len(prefix) + n


def test_the_registry_covers_every_cell():
    """One entry per cell id, in order (a new cell gets a registry entry, and the whole matrix)."""
    assert [c.id for c in CELLS] == ["rnn", "gru", "lstm"] and set(BY_ID) == {"rnn", "gru", "lstm"}
    assert [c.gates for c in CELLS] == [1, 3, 4] and [c.paired for c in CELLS] == [False, False, True]
    assert h_of((np.zeros(1), np.ones(1)))[0] == 0
