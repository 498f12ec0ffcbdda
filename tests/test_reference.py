"""fastbptt.reference against central finite differences and the textbook's closed form."""

import numpy as np
import pytest

import fastbptt
from fastbptt import reference
from helpers import assert_close, make_problem


def numerical_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of x (changed in place and restored)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        plus = f()
        x[i] = old - eps
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize("activation", ["identity", "tanh", "relu"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
def test_reference_matches_finite_differences(activation, loss, inputs):
    model, X, Y, h0 = make_problem(T=4, B=2, D=3, H=4, O=3, activation=activation, loss=loss,
                                   inputs=inputs, seed=3)
    params = {k: v.copy() for k, v in model.params.items()}

    def L():
        return reference.loss_and_grad(params, X, Y, h0, activation, loss)[0]

    _, grads, _, dh0, dX = reference.loss_and_grad(params, X, Y, h0, activation, loss)
    worst = {}
    for name in params:
        num = numerical_grad(L, params[name])
        np.testing.assert_allclose(grads[name], num, rtol=1e-6, atol=1e-8, err_msg=name)
        worst[name] = np.abs(grads[name] - num).max()
    np.testing.assert_allclose(dh0, numerical_grad(L, h0), rtol=1e-6, atol=1e-8, err_msg="dh0")
    if inputs == "dense":
        np.testing.assert_allclose(dX, numerical_grad(L, X), rtol=1e-6, atol=1e-8, err_msg="dX")
    print(worst)


def test_reference_loss_matches_its_definition():
    """Cross-entropy is -mean log softmax[y]; mse is the mean of squared errors."""
    rng = np.random.default_rng(0)
    O = rng.normal(size=(3, 2, 4))
    Y = rng.integers(0, 4, size=(3, 2))
    L, _ = reference.loss_and_output_grad(O, Y, "cross_entropy")
    p = np.exp(O) / np.exp(O).sum(axis=-1, keepdims=True)
    expected = -np.mean([np.log(p[t, b, Y[t, b]]) for t in range(3) for b in range(2)])
    assert abs(L - expected) < 1e-12
    Yf = rng.normal(size=O.shape)
    L, _ = reference.loss_and_output_grad(O, Yf, "mse")
    assert abs(L - ((O - Yf) ** 2).sum() / O.size) < 1e-12


def test_linear_model_closed_form():
    """identity φ, no biases, B = 1: the textbook's unrolled gradients.

    ∂L/∂h_t = Σ_{i=t..T} (W_hhᵀ)^{i-t} W_qhᵀ ∂L/∂o_i,  ∂L/∂W_hh = Σ_t ∂L/∂h_t h_{t-1}ᵀ,
    ∂L/∂W_hx = Σ_t ∂L/∂h_t x_tᵀ,  ∂L/∂W_qh = Σ_t ∂L/∂o_t h_tᵀ.
    """
    T, D, H, O = 8, 3, 4, 2
    model, X, Y, h0 = make_problem(T=T, B=1, D=D, H=H, O=O, activation="identity", bias=False,
                                   loss="mse", seed=7)
    W_hx, W_hh, W_qh = (model.params[k] for k in ("W_hx", "W_hh", "W_qh"))
    x = [X[t, 0] for t in range(T)]
    h = [h0[0]]
    for t in range(T):
        h.append(W_hx @ x[t] + W_hh @ h[-1])          # h_1 .. h_T, h[t] is h_t
    o = [W_qh @ h[t] for t in range(1, T + 1)]        # o[t-1] is o_t
    dL_do = [2 * (o[t] - Y[t, 0]) / (T * O) for t in range(T)]
    P = np.linalg.matrix_power
    dL_dh = [sum(P(W_hh.T, i - t) @ W_qh.T @ dL_do[i - 1] for i in range(t, T + 1))
             for t in range(1, T + 1)]                # dL_dh[t-1] is ∂L/∂h_t
    expected = {
        "W_qh": sum(np.outer(dL_do[t - 1], h[t]) for t in range(1, T + 1)),
        "W_hh": sum(np.outer(dL_dh[t - 1], h[t - 1]) for t in range(1, T + 1)),
        "W_hx": sum(np.outer(dL_dh[t - 1], x[t - 1]) for t in range(1, T + 1)),
    }
    ws = fastbptt.Workspace(model, T, 1)
    _, grads, _, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, loss="mse", workspace=ws,
                                              return_dh0=True)
    _, ref_grads, _, ref_dh0, _ = reference.loss_and_grad(dict(model.params), X, Y, h0,
                                                          "identity", "mse")
    for name, value in expected.items():
        assert_close(f"fast {name}", grads[name], value, np.float64)
        assert_close(f"reference {name}", ref_grads[name], value, np.float64)
    for t in range(1, T + 1):                          # with φ = identity, ∂L/∂z_t = ∂L/∂h_t
        assert_close(f"dL/dh_{t}", ws.dz[t - 1, 0], dL_dh[t - 1], np.float64)
    assert_close("dh0", dh0[0], W_hh.T @ dL_dh[0], np.float64)
    assert_close("reference dh0", ref_dh0[0], W_hh.T @ dL_dh[0], np.float64)
