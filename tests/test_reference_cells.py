"""The GRU and LSTM references against central finite differences, and against PyTorch's
nn.GRU / nn.LSTM as an independent oracle (weights in the same layout), saturating gates
included."""

import numpy as np
import pytest

from fastbptt import reference_cells as rc
from test_reference import numerical_grad

CELLS = {"gru": 3, "lstm": 4}


def make(cell, T=4, B=3, D=5, H=4, O=3, scale=0.6, inputs="dense", loss="cross_entropy", seed=0):
    """float64 params, X, Y and a random initial state; ``scale`` 3 saturates the gates."""
    rng = np.random.default_rng(seed)
    G = CELLS[cell]
    params = {"W_ih": rng.normal(0, scale, (G * H, D)), "W_hh": rng.normal(0, scale, (G * H, H)),
              "b_ih": rng.normal(0, scale, G * H), "b_hh": rng.normal(0, scale, G * H),
              "W_qh": rng.normal(0, 0.6, (O, H)), "b_q": rng.normal(0, 0.6, O)}
    X = rng.normal(size=(T, B, D)) if inputs == "dense" else rng.integers(0, D, size=(T, B))
    Y = rng.integers(0, O, size=(T, B)) if loss == "cross_entropy" else rng.normal(size=(T, B, O))
    h0 = rng.normal(size=(B, H))
    state0 = h0 if cell == "gru" else (h0, rng.normal(size=(B, H)))
    return params, X, Y, state0


def _state_arrays(state):
    return [state] if isinstance(state, np.ndarray) else list(state)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scale", [0.6, 3.0])
@pytest.mark.parametrize("inputs,loss", [("dense", "cross_entropy"), ("tokens", "mse"), ("dense", "mse")])
def test_reference_against_finite_differences(cell, scale, inputs, loss):
    params, X, Y, state0 = make(cell, scale=scale, inputs=inputs, loss=loss)
    L, grads, _, dstate0, dX = rc.loss_and_grad(params, X, Y, state0, cell, loss)

    def f():
        return rc.loss_and_grad(params, X, Y, state0, cell, loss)[0]

    for name, p in params.items():
        np.testing.assert_allclose(grads[name], numerical_grad(f, p), rtol=1e-6, atol=1e-8, err_msg=name)
    for i, s in enumerate(_state_arrays(state0)):
        np.testing.assert_allclose(_state_arrays(dstate0)[i], numerical_grad(f, s), rtol=1e-6, atol=1e-8,
                                   err_msg=f"state0[{i}]")
    if inputs == "dense":
        np.testing.assert_allclose(dX, numerical_grad(f, X), rtol=1e-6, atol=1e-8, err_msg="X")


def _torch_module(cell, params, D, H):
    torch = pytest.importorskip("torch")
    rnn = (torch.nn.GRU if cell == "gru" else torch.nn.LSTM)(D, H, dtype=torch.float64)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.tensor(params["W_ih"]))
        rnn.weight_hh_l0.copy_(torch.tensor(params["W_hh"]))
        rnn.bias_ih_l0.copy_(torch.tensor(params["b_ih"]))
        rnn.bias_hh_l0.copy_(torch.tensor(params["b_hh"]))
    return torch, rnn


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("scale", [0.6, 3.0])
def test_reference_against_pytorch(cell, scale):
    T, B, D, H, O = 7, 3, 5, 6, 4
    params, X, Y, state0 = make(cell, T, B, D, H, O, scale=scale)
    torch, rnn = _torch_module(cell, params, D, H)
    W_qh = torch.tensor(params["W_qh"], requires_grad=True)
    b_q = torch.tensor(params["b_q"], requires_grad=True)
    x = torch.tensor(X, requires_grad=True)
    states = [torch.tensor(s[None], requires_grad=True) for s in _state_arrays(state0)]
    out, last = rnn(x, states[0] if cell == "gru" else tuple(states))
    logits = out @ W_qh.T + b_q
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, O), torch.tensor(Y).reshape(-1))
    loss.backward()

    L, grads, state_T, dstate0, dX = rc.loss_and_grad(params, X, Y, state0, cell)
    assert abs(L - loss.item()) <= 1e-12
    want = {"W_ih": rnn.weight_ih_l0.grad, "W_hh": rnn.weight_hh_l0.grad, "b_ih": rnn.bias_ih_l0.grad,
            "b_hh": rnn.bias_hh_l0.grad, "W_qh": W_qh.grad, "b_q": b_q.grad}
    for name, g in want.items():
        np.testing.assert_allclose(grads[name], g.numpy(), rtol=1e-10, atol=1e-13, err_msg=name)
    np.testing.assert_allclose(dX, x.grad.numpy(), rtol=1e-10, atol=1e-13, err_msg="dX")
    torch_last = [last] if cell == "gru" else list(last)
    for mine, theirs, d, s in zip(_state_arrays(state_T), torch_last, _state_arrays(dstate0), states):
        np.testing.assert_allclose(mine, theirs.detach().numpy()[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(d, s.grad.numpy()[0], rtol=1e-10, atol=1e-13, err_msg="dstate0")


@pytest.mark.parametrize("cell", CELLS)
def test_a_zero_carry_weight_detaches_the_state_there(cell):
    """carry[k] = 0 gives the gradient of a graph cut before step k (PyTorch with .detach())."""
    T, B, D, H, O, k = 6, 2, 3, 4, 3, 3
    params, X, Y, state0 = make(cell, T, B, D, H, O)
    torch, rnn = _torch_module(cell, params, D, H)
    W_qh, b_q = torch.tensor(params["W_qh"]), torch.tensor(params["b_q"])
    state = tuple(torch.tensor(s[None]) for s in _state_arrays(state0))
    logits = []
    for t in range(T):
        if t == k:
            state = tuple(s.detach() for s in state)
        out, state = rnn(torch.tensor(X[t:t + 1]), state[0] if cell == "gru" else state)
        state = (state,) if cell == "gru" else state
        logits.append(out[0] @ W_qh.T + b_q)
    loss = torch.nn.functional.cross_entropy(torch.cat(logits), torch.tensor(Y).reshape(-1))
    loss.backward()
    carry = np.ones(T)
    carry[k] = 0.0
    _, grads, *_ = rc.loss_and_grad(params, X, Y, state0, cell, carry=carry)
    np.testing.assert_allclose(grads["W_hh"], rnn.weight_hh_l0.grad.numpy(), rtol=1e-10, atol=1e-13)
    full = rc.loss_and_grad(params, X, Y, state0, cell)[1]["W_hh"]
    assert not np.allclose(grads["W_hh"], full)


def test_unknown_cell():
    params, X, Y, _ = make("gru")
    with pytest.raises(ValueError, match="unknown cell"):
        rc.loss_and_grad(params, X, Y, None, "elman")
