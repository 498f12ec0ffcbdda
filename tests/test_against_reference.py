"""The compiled path against fastbptt.reference: loss, h_T, every gradient, ∂L/∂h0, ∂L/∂X."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbptt
from helpers import assert_close, make_problem, reference_result

COMBOS = list(itertools.product(
    ["identity", "tanh", "relu"], [True, False], ["cross_entropy", "mse"],
    ["dense", "tokens"], [np.float64, np.float32], [False, True], ["fused", "blas"]))


def check_against_reference(model, X, Y, h0, loss, parallel=False, workspace=None, method="auto"):
    """Run both paths and compare every output; return the largest error of each, by name."""
    dtype = model.dtype
    L, grads, hT, dh0, dX = fastbptt.loss_and_grad(
        model, X, Y, h0, loss=loss, parallel=parallel, workspace=workspace,
        return_dh0=True, return_dX=True, method=method)
    L_ref, g_ref, hT_ref, dh0_ref, dX_ref = reference_result(model, X, Y, h0, loss)
    errors = {"loss": assert_close("loss", L, L_ref, dtype),
              "h_T": assert_close("h_T", hT, hT_ref, dtype)}
    assert set(grads) == set(g_ref)
    for name in g_ref:
        assert grads[name].dtype == dtype, f"{name} has dtype {grads[name].dtype}"
        errors[name] = assert_close(f"grad {name}", grads[name], g_ref[name], dtype)
    errors["dh0"] = assert_close("dh0", dh0, dh0_ref, dtype)
    errors["dX"] = assert_close("dX", dX, dX_ref, dtype)
    assert hT.dtype == dh0.dtype == dX.dtype == dtype
    return errors


@pytest.mark.parametrize("activation,bias,loss,inputs,dtype,parallel,method", COMBOS)
def test_every_combination(activation, bias, loss, inputs, dtype, parallel, method):
    model, X, Y, h0 = make_problem(T=7, B=3, D=5, H=11, O=4, activation=activation, bias=bias,
                                   loss=loss, inputs=inputs, dtype=dtype, seed=1)
    errors = check_against_reference(model, X, Y, h0, loss, parallel, method=method)
    print(" ".join(f"{k}={v:.1e}" for k, v in errors.items()))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_default_h0_is_zeros(dtype):
    model, X, Y, _ = make_problem(dtype=dtype, h0=False)
    check_against_reference(model, X, Y, None, "cross_entropy")
    zeros = np.zeros((X.shape[1], model.hidden_size), dtype)
    a = fastbptt.loss_and_grad(model, X, Y)
    a = (a[0], {k: v.copy() for k, v in a[1].items()})
    b = fastbptt.loss_and_grad(model, X, Y, zeros)
    assert a[0] == b[0]
    for name in a[1]:
        np.testing.assert_array_equal(a[1][name], b[1][name])


@pytest.mark.parametrize("sizes", [
    dict(T=1), dict(B=1), dict(H=1), dict(D=1), dict(O=1),
    dict(T=1, B=1, D=1, H=1, O=1), dict(T=40, B=2, H=3)])
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
def test_edge_sizes(sizes, inputs):
    for loss in ("cross_entropy", "mse"):
        model, X, Y, h0 = make_problem(loss=loss, inputs=inputs, **sizes)
        check_against_reference(model, X, Y, h0, loss)
        check_against_reference(model, X, Y, h0, loss, parallel=True)
        check_against_reference(model, X, Y, h0, loss, method="blas")


def test_large_logits_are_stable():
    model, X, Y, h0 = make_problem(O=6)
    model.params["W_qh"][...] *= 1e3       # logits in the thousands
    L, grads, *_ = fastbptt.loss_and_grad(model, X, Y, h0)
    assert np.isfinite(L) and all(np.isfinite(g).all() for g in grads.values())
    check_against_reference(model, X, Y, h0, "cross_entropy")


def test_tokens_equal_one_hot_dense_inputs():
    model, tokens, Y, h0 = make_problem(inputs="tokens", D=7)
    one_hot = np.eye(7)[tokens]
    a = fastbptt.loss_and_grad(model, tokens, Y, h0, return_dh0=True, return_dX=True)
    a = [a[0], {k: v.copy() for k, v in a[1].items()}, a[2].copy(), a[3].copy(), a[4].copy()]
    b = fastbptt.loss_and_grad(model, one_hot, Y, h0, return_dh0=True, return_dX=True)
    assert_close("loss", a[0], b[0], np.float64)
    for name in b[1]:
        assert_close(name, a[1][name], b[1][name], np.float64)
    for name, i in (("h_T", 2), ("dh0", 3), ("dX", 4)):
        assert_close(name, a[i], b[i], np.float64)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
def test_forward_then_backward_with_caller_supplied_output_grad(loss, inputs):
    model, X, Y, h0 = make_problem(loss=loss, inputs=inputs)
    ws = fastbptt.Workspace(model, *X.shape[:2])
    O, hT = fastbptt.forward(model, X, h0, workspace=ws)
    _, _, O_ref = fastbptt.reference.forward(dict(model.params), X, h0, model.activation)
    assert_close("O", O, O_ref, np.float64)
    L_ref, dO = fastbptt.reference.loss_and_output_grad(O_ref, Y, loss)
    grads, dh0, dX = fastbptt.backward(model, dO, workspace=ws, return_dh0=True, return_dX=True)
    _, g_ref, _, dh0_ref, dX_ref = reference_result(model, X, Y, h0, loss)
    for name in g_ref:
        assert_close(name, grads[name], g_ref[name], np.float64)
    assert_close("dh0", dh0, dh0_ref, np.float64)
    assert_close("dX", dX, dX_ref, np.float64)


def test_backward_with_a_custom_loss():
    """Any loss works through backward(): here L = sum of o³ / 3, so ∂L/∂o = o²."""
    model, X, _, h0 = make_problem()
    ws = fastbptt.Workspace(model, *X.shape[:2])
    O, _ = fastbptt.forward(model, X, h0, workspace=ws)
    grads = fastbptt.backward(model, O ** 2, workspace=ws)
    zs, hs, O_ref = fastbptt.reference.forward(dict(model.params), X, h0, model.activation)
    g_ref, _, _ = fastbptt.reference.backward(dict(model.params), X, zs, hs, O_ref ** 2,
                                              model.activation)
    for name in g_ref:
        assert_close(name, grads[name], g_ref[name], np.float64)


def test_workspace_reuse_gives_the_same_results():
    model, X, Y, h0 = make_problem(inputs="tokens")
    ws = fastbptt.Workspace(model, *X.shape[:2])
    first = check_against_reference(model, X, Y, h0, "cross_entropy", workspace=ws)
    other_model, X2, Y2, h2 = make_problem(inputs="tokens", seed=5)
    check_against_reference(model, X2, Y2, h2, "cross_entropy", workspace=ws)
    again = check_against_reference(model, X, Y, h0, "cross_entropy", workspace=ws)
    assert first == again


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 6), B=st.integers(1, 4), D=st.integers(1, 5), H=st.integers(1, 6),
       O=st.integers(1, 5), activation=st.sampled_from(["identity", "tanh", "relu"]),
       bias=st.booleans(), loss=st.sampled_from(["cross_entropy", "mse"]),
       inputs=st.sampled_from(["dense", "tokens"]), dtype=st.sampled_from([np.float64, np.float32]),
       parallel=st.booleans(), method=st.sampled_from(["fused", "blas"]),
       seed=st.integers(0, 2**31), h0=st.booleans())
def test_property_random_shapes_and_values(T, B, D, H, O, activation, bias, loss, inputs, dtype,
                                           parallel, method, seed, h0):
    model, X, Y, h = make_problem(T=T, B=B, D=D, H=H, O=O, activation=activation, bias=bias,
                                  loss=loss, inputs=inputs, dtype=dtype, seed=seed, h0=h0)
    check_against_reference(model, X, Y, h, loss, parallel, method=method)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_larger_sizes_both_methods(dtype):
    """Sizes where the unrolled inner loops run many full passes, and "auto" picks "blas"."""
    model, X, Y, h0 = make_problem(T=6, B=16, D=9, H=260, O=13, dtype=dtype, inputs="tokens")
    model.flat[...] *= 0.1
    assert fastbptt.api.choose_method(16, 260) == "blas"
    for method in ("fused", "blas", "auto"):
        check_against_reference(model, X, Y, h0, "cross_entropy", method=method)


# ----------------------------------------------------------------------------- relu' at the kink


def zero_preactivation_problem(which, inputs, dtype):
    """A relu model whose pre-activations are exactly 0: at every unit ("all": zero inputs,
    zero h0, zero b_h) or at a few units only ("some": their rows of W_hx, W_hh and b_h
    are zero, while the other units run normally)."""
    model, X, Y, h0 = make_problem(T=6, B=3, D=5, H=9, O=4, activation="relu", inputs=inputs,
                                   dtype=dtype, seed=21)
    p = model.params
    if which == "all":
        p["b_h"][...] = 0
        h0 = np.zeros_like(h0)
        if inputs == "dense":
            X = np.zeros_like(X)
        else:
            p["W_hx"][...] = 0          # one-hot inputs: W_hx x_t = 0 needs W_hx = 0
    else:
        dead = [1, 4, 8]
        for name in ("W_hx", "W_hh", "b_h"):
            p[name][dead] = 0
    return model, X, Y, h0


@pytest.mark.parametrize("which", ["all", "some"])
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["fused", "blas"])
@pytest.mark.parametrize("parallel", [False, True])
def test_relu_derivative_at_exactly_zero(which, inputs, dtype, method, parallel):
    """relu'(0) = 0 (as PyTorch and the reference): a unit at exactly z = 0 passes no gradient."""
    model, X, Y, h0 = zero_preactivation_problem(which, inputs, dtype)
    check_against_reference(model, X, Y, h0, "cross_entropy", parallel, method=method)
    _, grads, hT, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, parallel=parallel, method=method,
                                               return_dh0=True)
    if which == "all":
        assert not hT.any()
        for name in ("W_hx", "W_hh", "b_h"):
            assert not grads[name].any(), f"{name}: relu'(0) must be 0, so no gradient reaches it"
        assert not dh0.any()
        assert grads["b_q"].any()       # the readout still learns: the test is not vacuous
    else:
        dead = [1, 4, 8]
        assert not hT[:, dead].any()
        assert not grads["W_hh"][dead].any() and not grads["b_h"][dead].any()
        assert grads["W_hh"].any() and grads["b_h"].any()


def test_relu_derivative_at_zero_against_torch():
    """The convention pinned against PyTorch's autograd on the same zero pre-activations."""
    torch = pytest.importorskip("torch")
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    torch.relu(z).sum().backward()
    assert not z.grad.any()                     # PyTorch: relu'(0) = 0
    for which in ("all", "some"):
        model, X, Y, h0 = zero_preactivation_problem(which, "dense", np.float64)
        L, grads, _, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, return_dh0=True)
        p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
        h = torch.tensor(h0, requires_grad=True)
        logits = []
        for x in torch.tensor(X):
            h_prev = h if not logits else h_t
            h_t = torch.relu(x @ p["W_hx"].T + h_prev @ p["W_hh"].T + p["b_h"])
            logits.append(h_t @ p["W_qh"].T + p["b_q"])
        out = torch.stack(logits).reshape(-1, model.output_size)
        loss = torch.nn.functional.cross_entropy(out, torch.tensor(Y).reshape(-1))
        loss.backward()
        assert_close("loss", L, loss.item(), np.float64)
        for name in grads:
            assert_close(f"{which} {name}", grads[name], p[name].grad.numpy(), np.float64)
        assert_close(f"{which} dh0", dh0, h.grad.numpy(), np.float64)
