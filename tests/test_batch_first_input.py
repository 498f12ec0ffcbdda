"""Batch-first arrays, (B, T, ...) where fastbptt takes (T, B, ...): the error names the argument
whose shape is off (X when lengths or h0 say it is batch-first, not the Y that then looks wrong),
says it looks batch-first and how to transpose it, at every entry point that takes X, Y, dO or dH."""

import numpy as np
import pytest

import fastbptt

T, B, D, H, O = 20, 4, 6, 8, 5


def model_of(cell="gru", L=1, bidirectional=False):
    return fastbptt.CELLS[cell](D, H, O, dtype=np.float64, num_layers=L, bidirectional=bidirectional)


rng = np.random.default_rng(0)
X_tb = rng.normal(size=(T, B, D))
X_bt = np.ascontiguousarray(X_tb.transpose(1, 0, 2))
Y_tb = rng.integers(0, O, (T, B))


def test_the_issues_case_blames_x_not_y():
    """X batch-first, Y time-major: it said 'Y must have shape (4, 20)'."""
    with pytest.raises(ValueError) as e:
        fastbptt.loss_and_grad(model_of(), X_bt, Y_tb)
    msg = str(e.value)
    assert msg.startswith(f"X has shape {X_bt.shape}, which fastbptt reads as time-major (T, B, D): T={B} steps "
                          f"of B={T} sequences, but Y has shape {Y_tb.shape}")
    assert "one of them is batch-first" in msg and "X.transpose(1, 0, 2)" in msg and "batch_first" in msg


@pytest.mark.parametrize("Y, y_how", [(Y_tb, "Y.T"), (rng.normal(size=(T, B, O)), "Y.transpose(1, 0, 2)")],
                         ids=["ids", "mse"])
def test_x_against_y_says_how_to_transpose_either(Y, y_how):
    loss = "mse" if Y.ndim == 3 else "cross_entropy"
    with pytest.raises(ValueError) as e:
        fastbptt.loss_and_grad(model_of(), X_bt, Y, loss=loss)
    assert str(e.value).endswith(f"if X is batch-first (B, T, D), pass X.transpose(1, 0, 2); if Y is, pass {y_how}")

@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("L, bidirectional", [(1, False), (2, True)])
def test_lengths_or_h0_say_x_is_batch_first(cell, L, bidirectional):
    model = model_of(cell, L, bidirectional)
    shape = (B, H) if model.n_states == 1 else (model.n_states, B, H)
    h0 = (np.zeros(shape), np.zeros(shape)) if cell == "lstm" else np.zeros(shape)
    lengths = np.full(B, T)
    for kw, why in (({"lengths": lengths}, rf"lengths has {B} entries"), ({"h0": h0}, r"h0 has shape")):
        for call in (lambda: fastbptt.loss_and_grad(model, X_bt, Y_tb, **kw),
                     lambda: fastbptt.loss_and_grad(model, X_bt, Y_tb.T, **kw),   # both batch-first
                     lambda: fastbptt.forward(model, X_bt, **kw),
                     lambda: fastbptt.layer_forward(model, X_bt, **kw)):
            with pytest.raises(ValueError, match=rf"^X has shape \({B}, {T}, {D}\).*{why}.*X looks batch-first "
                                                 rf"\(B, T, D\).*pass X.transpose\(1, 0, 2\)"):
                call()


def test_batch_first_token_ids():
    ids = rng.integers(0, D, (B, T))
    with pytest.raises(ValueError, match=r"^X has shape \(4, 20\).*lengths has 4 entries.*pass X.T"):
        fastbptt.loss_and_grad(model_of(), ids, Y_tb, lengths=np.full(B, T))


def test_a_batch_first_y_is_blamed_when_h0_sides_with_x():
    with pytest.raises(ValueError, match=rf"^Y must have shape \({T}, {B}\), got \({B}, {T}\): Y looks "
                                         rf"batch-first \(B, T\).*pass Y.T"):
        fastbptt.loss_and_grad(model_of(), X_tb, Y_tb.T, h0=np.zeros((B, H)))
    Ymse = rng.normal(size=(B, T, O))
    with pytest.raises(ValueError, match=r"^Y must have shape .*Y looks batch-first \(B, T, ...\).*"
                                         r"Y.transpose\(1, 0, 2\)"):
        fastbptt.loss_and_grad(model_of(), X_tb, Ymse, loss="mse", lengths=np.full(B, T))


def test_batch_first_gradients_are_named():
    model = model_of("lstm", 2, True)
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.forward(model, X_tb, workspace=ws)
    with pytest.raises(ValueError, match=r"^dO must have shape \(20, 4, 5\), got \(4, 20, 5\): dO looks "
                                         r"batch-first.*dO.transpose\(1, 0, 2\)"):
        fastbptt.backward(model, np.zeros((B, T, O)), workspace=ws)
    fastbptt.layer_forward(model, X_tb, workspace=ws)
    with pytest.raises(ValueError, match=r"^dH must have shape \(20, 4, 16\), got \(4, 20, 16\): dH looks "
                                         r"batch-first"):
        fastbptt.layer_backward(model, np.zeros((B, T, 2 * H)), workspace=ws)
    with pytest.raises(ValueError, match=r"^loss_weights must have shape .*loss_weights looks batch-first.*"
                                         r"pass loss_weights.T"):
        fastbptt.loss_and_grad(model, X_tb, Y_tb, loss_weights=np.ones((B, T)))
    with pytest.raises(ValueError, match=r"^carry must have shape .*carry looks batch-first.*pass carry.T"):
        fastbptt.backward(model, np.zeros((T, B, O)), workspace=ws, carry=np.ones((B, T)))


def test_a_plain_mismatch_names_its_argument_without_a_batch_first_hint():
    with pytest.raises(ValueError) as e:
        fastbptt.loss_and_grad(model_of(), X_tb, Y_tb[:, :3])
    assert str(e.value) == f"Y must have shape ({T}, {B}), got ({T}, 3)"
    with pytest.raises(ValueError, match=r"^lengths must have shape \(B,\) = \(4,\)"):
        fastbptt.loss_and_grad(model_of(), X_tb, Y_tb, lengths=np.full(3, 2))
    square = rng.normal(size=(B, B, D))                            # T = B: nothing tells the layout
    fastbptt.loss_and_grad(model_of(), square, Y_tb[:B])
