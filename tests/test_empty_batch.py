"""The ends of the batch and time ranges, as torch.nn has them: B = 0 sequences give empty
outputs and states and zero gradients at forward/backward/layer_forward/layer_backward (no
compiled code runs); T = 0 steps is refused at every entry point, as torch.nn.RNN refuses it;
loss_and_grad over B = 0 (a mean over no positions) is a clear error."""

import numpy as np
import pytest

import fastbptt

CELLS = ["rnn", "gru", "lstm"]
T, D, H, O = 15, 6, 16, 5
STACKS = [(1, False), (2, True), (3, False)]


def make(cell, L, bidirectional):
    return fastbptt.CELLS[cell](D, H, O, dtype=np.float64, num_layers=L, bidirectional=bidirectional)


def state_shape(model, B):
    return (B, H) if model.n_states == 1 else (model.n_states, B, H)


def shapes(state):
    return tuple(a.shape for a in state) if isinstance(state, tuple) else state.shape


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("L, bidirectional", STACKS)
@pytest.mark.parametrize("inputs", ["dense", "tokens"])
def test_an_empty_batch_gives_empty_results_and_zero_gradients(cell, L, bidirectional, inputs):
    model = make(cell, L, bidirectional)
    X = np.zeros((T, 0, D)) if inputs == "dense" else np.zeros((T, 0), np.int64)
    S = state_shape(model, 0)
    h0 = (np.zeros(S), np.zeros(S)) if cell == "lstm" else np.zeros(S)
    want_state = (S, S) if cell == "lstm" else S
    top = model.num_directions * H
    for kw in ({}, {"h0": h0}, {"lengths": np.zeros(0, np.int64)}):
        ws = fastbptt.Workspace(model, T, 0)
        ws.grad_flat[...] = 1.0                                     # a previous call's gradients
        out, state = fastbptt.forward(model, X, workspace=ws, **kw)
        assert out.shape == (T, 0, O) and shapes(state) == want_state
        grads, dh0, dX = fastbptt.backward(model, np.zeros((T, 0, O)), workspace=ws, return_dh0=True,
                                           return_dX=True)
        assert not np.any(ws.grad_flat) and set(grads) == set(model.params)
        assert dX.shape == (T, 0, D) and shapes(dh0) == want_state
        Hout, state = fastbptt.layer_forward(model, X, workspace=ws, **kw)
        assert Hout.shape == (T, 0, top) and shapes(state) == want_state
        ws.grad_flat[...] = 1.0
        dstate = (np.zeros(S), np.zeros(S)) if cell == "lstm" else np.zeros(S)
        grads, dX, d0 = fastbptt.layer_backward(model, np.zeros((T, 0, top)), dstate, workspace=ws)
        assert not np.any(ws.grad_flat) and dX.shape == (T, 0, D) and shapes(d0) == want_state


def test_an_empty_batch_gets_its_own_workspace_when_none_is_given():
    model = make("lstm", 2, True)
    out, (h, c) = fastbptt.forward(model, np.zeros((T, 0, D)))
    assert out.shape == (T, 0, O) and h.shape == c.shape == (4, 0, H)
    ws = fastbptt.Workspace(model, T, 0)
    assert ws.B == 0 and "B=0" in repr(ws)
    with pytest.raises(ValueError, match="B must be an int >= 0"):
        fastbptt.Workspace(model, T, -1)


@pytest.mark.parametrize("cell", CELLS)
def test_an_empty_batch_has_the_shapes_torch_nn_gives(cell):
    torch = pytest.importorskip("torch")
    cls = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
    mod = cls(D, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.zeros(T, 0, D, dtype=torch.float64, requires_grad=True)
    out, state = mod(x)
    out.sum().backward()
    model = make(cell, 2, True)
    ws = fastbptt.Workspace(model, T, 0)
    Hout, mine = fastbptt.layer_forward(model, x.detach().numpy(), workspace=ws)
    assert Hout.shape == tuple(out.shape)
    assert shapes(mine) == (tuple(s.shape for s in state) if cell == "lstm" else tuple(state.shape))
    grads, dX, _ = fastbptt.layer_backward(model, np.zeros(Hout.shape), workspace=ws)
    assert dX.shape == tuple(x.grad.shape)
    assert not any(np.any(g) for g in grads.values())
    assert all(float(p.grad.abs().sum()) == 0.0 for p in mod.parameters())


def test_loss_and_grad_over_an_empty_batch_is_a_clear_error():
    model = make("gru", 2, False)
    with pytest.raises(ValueError, match=r"X has B=0 sequences .*mean over no positions.*skip empty batches"):
        fastbptt.loss_and_grad(model, np.zeros((T, 0, D)), np.zeros((T, 0), np.int64))
    with pytest.raises(ValueError, match="B=0"):
        fastbptt.loss_and_grad(model, np.zeros((T, 0), np.int64), np.zeros((T, 0, O)), loss="mse")


@pytest.mark.parametrize("cell", CELLS)
def test_no_time_steps_is_refused_at_every_entry_point(cell):
    model = make(cell, 2, True)
    for X in (np.zeros((0, 4, D)), np.zeros((0, 4), np.int64), np.zeros((0, 0, D))):
        for call in (lambda: fastbptt.loss_and_grad(model, X, np.zeros((0, 4), np.int64)),
                     lambda: fastbptt.forward(model, X),
                     lambda: fastbptt.layer_forward(model, X)):
            with pytest.raises(ValueError, match=r"X must have T >= 1 time steps .*torch.nn.RNN"):
                call()
    with pytest.raises(ValueError, match="T must be a positive int"):
        fastbptt.Workspace(model, 0, 4)


def test_torch_nn_refuses_no_time_steps_too():
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError, match="sequence length"):
        torch.nn.GRU(D, H)(torch.zeros(0, 4, D))
