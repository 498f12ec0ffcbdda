"""Gradient flow: ∂L/∂h_t against the unrolled closed form, vanishing and exploding, spectral radius."""

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import fastbptt
from fastbptt import diagnostics, reference, training
from helpers import assert_close, make_problem


def closed_form(model, dO, carry=None):
    """∂L/∂h_t = Σ_{i=t}^{T} (Π_{j=t+1}^{i} c_j) (W_hhᵀ)^{i-t} W_qhᵀ ∂L/∂o_i  (identity φ), 1-based t.

    In row-vector form (rows are sequences): term_i = (∂L/∂o_i W_qh) W_hh^{i-t}.
    """
    W_hh = model.params["W_hh"].astype(np.float64)
    W_qh = model.params["W_qh"].astype(np.float64)
    T, B, _ = dO.shape
    c = np.ones((T, B)) if carry is None else np.broadcast_to(np.reshape(carry, (T, -1)), (T, B))
    dh = np.zeros((T, B, model.hidden_size))
    for t in range(T):                      # 0-based here: step t+1
        for i in range(t, T):
            weight = np.prod(c[t + 1:i + 1], axis=0)[:, None]
            dh[t] += weight * (dO[i] @ W_qh) @ np.linalg.matrix_power(W_hh, i - t)
    return dh


def linear_model(H=6, D=3, O=4, rho=None, seed=0):
    rng = np.random.default_rng(seed)
    model = fastbptt.RNN(D, H, O, activation="identity", bias=False, dtype=np.float64, seed=seed)
    if rho is not None:                     # ρ times an orthogonal matrix: every |λ| = ρ
        Q, _ = np.linalg.qr(rng.normal(size=(H, H)))
        model.params["W_hh"][...] = rho * Q
    return model


@pytest.mark.parametrize("carry", [None, "T", "TB"])
def test_hidden_grads_match_the_closed_form(carry):
    T, B = 7, 3
    model = linear_model()
    model.params["W_hh"][...] = np.random.default_rng(1).normal(0, 0.5, (6, 6))
    rng = np.random.default_rng(2)
    X = rng.normal(size=(T, B, 3))
    Y = rng.normal(size=(T, B, 4))
    h0 = rng.normal(size=(B, 6))
    c = None if carry is None else rng.choice([0.0, 2.0], size=(T,) if carry == "T" else (T, B))
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, h0, loss="mse", workspace=ws, carry=c)
    _, _, O = reference.forward(dict(model.params), X, h0, "identity")
    _, dO = reference.loss_and_output_grad(O, Y, "mse")
    want = closed_form(model, dO, c)
    assert_close("dL/dh", diagnostics.hidden_grads(model, ws, carry=c), want, np.float64)
    norms = diagnostics.hidden_grad_norms(model, ws, carry=c)
    np.testing.assert_allclose(norms, np.sqrt((want ** 2).sum(axis=(1, 2))), rtol=1e-10)
    per_seq = diagnostics.hidden_grad_norms(model, ws, carry=c, per_sequence=True)
    np.testing.assert_allclose(per_seq, np.linalg.norm(want, axis=2), rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hidden_grads_with_tanh_match_restarting_from_h_t(dtype):
    """For any φ: L over steps 1..T, seen from h_t, is the direct term of step t plus
    (T - t)/T times the mean loss of steps t+1..T run from h_t, whose ∂/∂h_0 loss_and_grad gives."""
    T, B = 6, 2
    model, X, Y, h0 = make_problem(T=T, B=B, inputs="tokens", dtype=dtype)
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws)
    got = diagnostics.hidden_grads(model, ws)
    p = {k: v.astype(np.float64) for k, v in model.params.items()}
    _, hs, O = reference.forward(p, X, h0.astype(np.float64), "tanh")
    _, dO = reference.loss_and_output_grad(O, Y)
    for t in range(1, T + 1):
        want = dO[t - 1] @ p["W_qh"]
        if t < T:
            _, _, _, dh_rest, _ = reference.loss_and_grad(p, X[t:], Y[t:], hs[t], "tanh")
            want = want + (T - t) / T * dh_rest
        assert_close(f"dL/dh_{t}", got[t - 1], want, dtype)


@pytest.mark.parametrize("rho,trend", [(0.6, "vanishes"), (1.4, "explodes")])
def test_gradient_vanishes_or_explodes_as_rho_to_the_power_T_minus_t(rho, trend):
    """Loss at the last step only, identity φ, W_hh = ρQ: ‖∂L/∂h_t‖ = ρ^{T-t} ‖W_qhᵀ ∂L/∂o_T‖."""
    T, B = 25, 2
    model = linear_model(rho=rho)
    assert diagnostics.spectral_radius(model) == pytest.approx(rho, rel=1e-12)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(T, B, 3))
    ws = fastbptt.Workspace(model, T, B)
    fastbptt.forward(model, X, workspace=ws)
    dO = np.zeros((T, B, 4))
    dO[-1] = rng.normal(size=(B, 4))
    fastbptt.backward(model, dO, workspace=ws)
    norms = diagnostics.hidden_grad_norms(model, ws)
    want = rho ** (T - np.arange(1, T + 1)) * np.linalg.norm(dO[-1] @ model.params["W_qh"])
    np.testing.assert_allclose(norms, want, rtol=1e-9)
    assert_close("closed form", diagnostics.hidden_grads(model, ws), closed_form(model, dO), np.float64)
    if trend == "vanishes":
        assert norms[0] < 1e-4 * norms[-1]
    else:
        assert norms[0] > 1e3 * norms[-1]


def test_gradient_flow_runs_loss_and_grad():
    model, X, Y, h0 = make_problem(T=5, B=3)
    loss, norms = diagnostics.gradient_flow(model, X, Y, h0)
    assert loss == fastbptt.loss_and_grad(model, X, Y, h0)[0]
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws)
    np.testing.assert_array_equal(norms, diagnostics.hidden_grad_norms(model, ws))
    assert norms.shape == (5,)
    assert diagnostics.gradient_flow(model, X, Y, h0, workspace=ws, per_sequence=True)[1].shape == (5, 3)


def test_spectral_radius():
    assert diagnostics.spectral_radius(np.array([[0.0, -2.0], [2.0, 0.0]])) == pytest.approx(2.0)
    assert diagnostics.spectral_radius(np.diag([0.5, -3.0, 1.0])) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="square"):
        diagnostics.spectral_radius(np.ones((2, 3)))


def test_diagnostics_bad_input():
    model, X, Y, h0 = make_problem(T=5, B=3)
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.forward(model, X, h0, workspace=ws)
    with pytest.raises(ValueError, match="holds a forward pass"):
        diagnostics.hidden_grads(model, ws)
    with pytest.raises(TypeError, match="workspace must be"):
        diagnostics.hidden_grads(model, None)
    with pytest.raises(ValueError, match="different model"):
        diagnostics.hidden_grads(fastbptt.RNN(4, 7, 5), ws)
    fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws)
    with pytest.raises(ValueError, match="carry must have shape"):
        diagnostics.hidden_grads(model, ws, carry=np.ones(4))


def test_plot_grad_norms():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt
    norms = np.array([1e-3, 1e-2, 1e-1, 1.0])
    ax = diagnostics.plot_grad_norms(norms, label="ρ = 0.1")
    line = ax.get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_array_equal(line.get_ydata(), norms)
    assert ax.get_yscale() == "log"
    ax2 = diagnostics.plot_grad_norms(np.ones((4, 3)), ax=ax, log=False)
    assert ax2 is ax and len(ax.get_lines()) == 4
    plt.close("all")
    with pytest.raises(ValueError, match="norms must have shape"):
        diagnostics.plot_grad_norms(np.ones((2, 2, 2)))


def test_hidden_grads_reads_the_carry_the_workspace_recorded():
    """After a call with carry weights, hidden_grads without them uses the recorded ones."""
    import fastbptt
    from fastbptt import diagnostics
    rng = np.random.default_rng(2)
    model = fastbptt.RNN(5, 6, 5, dtype=np.float64, seed=2)
    X, Y = rng.integers(0, 5, (7, 3)), rng.integers(0, 5, (7, 3))
    carry = rng.choice([0.0, 2.0], size=(7, 3))
    ws = fastbptt.Workspace(model, 7, 3)
    fastbptt.loss_and_grad(model, X, Y, workspace=ws, carry=carry)
    np.testing.assert_array_equal(diagnostics.hidden_grads(model, ws),
                                  diagnostics.hidden_grads(model, ws, carry))
    full = fastbptt.Workspace(model, 7, 3)
    fastbptt.loss_and_grad(model, X, Y, workspace=full)
    assert not np.allclose(diagnostics.hidden_grads(model, ws), diagnostics.hidden_grads(model, full))


@pytest.mark.parametrize("func", [diagnostics.plot_grad_norms, training.random_truncation])
def test_readme_describes_the_signature(func):
    """The README shows each function with its parameters as they are named and defaulted."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    shown = re.findall(r"`" + func.__name__ + r"\(([^`]*)\)`", readme)
    assert shown, f"README does not show {func.__name__}(...)"
    params = inspect.signature(func).parameters.values()
    want = ", ".join(p.name if p.default is inspect.Parameter.empty
                     else f"{p.name}={'np.float64' if p.default is np.float64 else repr(p.default)}"
                     for p in params)
    assert shown == [want] * len(shown), f"README shows {func.__name__}({shown[0]}), the signature is ({want})"


@pytest.mark.parametrize("norms, log", [
    (np.geomspace(1e-3, 2e-3, 30), True),          # minor tick labels 2×10^-3 ...
    (np.geomspace(1e-30, 1.0, 35), True),          # vanishing over 30 decades
    (np.linspace(1e-4, 3e-4, 40), False),          # wide linear tick labels 0.00025
    (np.linspace(12345.0, 123456.0, 40), False),
    (np.geomspace(1.0, 1e12, 40)[:, None] * np.ones(3), True),
])
def test_plot_grad_norms_keeps_its_labels_inside_the_figure(norms, log):
    """A new figure's labels and tick labels lie inside the figure, drawn as shown or saved (Agg)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ax = diagnostics.plot_grad_norms(norms, log=log)
    fig = ax.figure
    try:
        for save in (False, True):
            if save:
                fig.savefig(io.BytesIO(), format="png")       # the layout as written to a file
            else:
                fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            figure = fig.bbox
            # each label, and each axis with the tick labels it draws (major and minor)
            boxes = [ax.yaxis.label.get_window_extent(renderer), ax.xaxis.label.get_window_extent(renderer),
                     ax.yaxis.get_tightbbox(renderer), ax.xaxis.get_tightbbox(renderer)]
            for box in boxes:
                assert box.x0 >= figure.x0 and box.x1 <= figure.x1, (box, figure)
                assert box.y0 >= figure.y0 and box.y1 <= figure.y1, (box, figure)
    finally:
        plt.close(fig)
