"""Clipping and optimizers against plain NumPy formulas; checkpoints and bitwise resumption."""

import copy
import pickle

import numpy as np
import pytest

import fastbptt
from fastbptt import checkpoint, optim
from helpers import make_problem

DTYPES = [np.float64, np.float32]


def rtol(dtype):
    return 1e-13 if dtype == np.float64 else 1e-6


def random_grad(n=50, dtype=np.float64, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=n) * scale).astype(dtype)


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_norm_is_d2l_grad_clipping(dtype):
    """d2l: norm = sqrt(Σ over parameters of Σ g²); if norm > θ, every g *= θ / norm."""
    model, X, Y, h0 = make_problem(T=6, B=3, dtype=dtype)
    ws = fastbptt.Workspace(model, 6, 3)
    fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws)
    per_param = {k: v.astype(np.float64) for k, v in ws.grads.items()}
    norm_d2l = np.sqrt(sum(np.sum(g ** 2) for g in per_param.values()))
    theta = norm_d2l / 3
    norm = optim.clip_grad_norm(ws.grad_flat, theta)
    np.testing.assert_allclose(norm, norm_d2l, rtol=rtol(dtype))
    for k, g in per_param.items():
        np.testing.assert_allclose(ws.grads[k], g * (theta / norm_d2l), rtol=rtol(dtype) * 4, atol=0)
    np.testing.assert_allclose(optim.grad_norm(ws), theta, rtol=rtol(dtype) * 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_norm_leaves_small_gradients_alone(dtype):
    g = random_grad(dtype=dtype)
    before = g.copy()
    norm = optim.clip_grad_norm(g, np.linalg.norm(before.astype(np.float64)) * 1.01)
    np.testing.assert_array_equal(g, before)
    np.testing.assert_allclose(norm, np.linalg.norm(before.astype(np.float64)), rtol=rtol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_value_is_np_clip(dtype):
    g = random_grad(dtype=dtype, scale=8.0)
    want = np.clip(g, -5, 5)
    norm = optim.clip_grad_value(g, 5.0)
    np.testing.assert_array_equal(g, want)
    np.testing.assert_allclose(norm, np.linalg.norm(random_grad(dtype=dtype, scale=8.0).astype(np.float64)),
                               rtol=rtol(dtype))
    assert np.abs(want).max() == 5 and np.abs(g).min() < 5     # some clipped, some not


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-300, 1e-160, 1e160, 1.0])
def test_norm_of_float64_gradients_that_over_or_underflow_when_squared(scale):
    """(1e200)² overflows and (1e-200)² underflows: the norm is still exact to rounding, as LAPACK's nrm2."""
    g = random_grad(n=1001, scale=scale)
    want = scale * np.linalg.norm(g / scale)              # exact scaling by the power of ten, in float64
    np.testing.assert_allclose(optim.grad_norm(g), want, rtol=1e-14)
    for theta in (want * 0.5, 1.0):
        clipped = g.copy()
        norm = optim.clip_grad_norm(clipped, theta)
        np.testing.assert_allclose(norm, want, rtol=1e-14)
        if want > theta:
            np.testing.assert_allclose(clipped, g * (theta / want), rtol=1e-14, atol=0)
            np.testing.assert_allclose(optim.grad_norm(clipped), theta, rtol=1e-14)
        else:
            np.testing.assert_array_equal(clipped, g)
    np.testing.assert_allclose(optim.clip_grad_value(g.copy(), 1.0), want, rtol=1e-14)


def test_clip_a_gradient_whose_norm_overflows_a_float():
    g = np.full(16, 1e308)                                # ‖g‖ = 4e308: not a float
    assert optim.grad_norm(g) == np.inf
    optim.clip_grad_norm(g, 2.0)
    np.testing.assert_allclose(g, 0.5, rtol=1e-15)        # still clipped to norm 2, not zeroed
    assert optim.grad_norm(np.zeros(7)) == 0.0
    assert np.isnan(optim.grad_norm(np.array([np.nan, 1e200])))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: optim.clip_grad_norm(random_grad(), 0.0), ValueError, "max_norm must be > 0"),
    (lambda: optim.clip_grad_norm(random_grad(), float("nan")), ValueError, "max_norm must be finite"),
    (lambda: optim.clip_grad_norm(random_grad(), "1"), TypeError, "max_norm must be a number"),
    (lambda: optim.clip_grad_value(random_grad(), -5), ValueError, "clip_value must be > 0"),
    (lambda: optim.clip_grad_norm([1.0, 2.0], 1.0), TypeError, "grad must be a NumPy array"),
    (lambda: optim.clip_grad_norm(np.ones((2, 2)), 1.0), ValueError, "grad must be 1-D"),
    (lambda: optim.clip_grad_norm(np.ones(4, np.int64), 1.0), TypeError, "float32 or float64"),
    (lambda: optim.clip_grad_norm(np.ones(8)[::2], 1.0), ValueError, "contiguous and writable"),
])
def test_clip_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------- optimizers


def numpy_run(name, p, grads, **h):
    """The update rules of the module docstring, written out in NumPy (float64)."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if name == "sgd":
            p -= h["lr"] * g
        elif name == "momentum":
            m = h["momentum"] * m + g
            p -= h["lr"] * m
        elif name == "adagrad":
            m += g * g
            p -= h["lr"] * g / np.sqrt(m + h["eps"])
        elif name in ("adam", "adamw"):
            b1, b2 = h["betas"]
            if name == "adam":
                g = g + h["weight_decay"] * p
            else:
                p *= 1 - h["lr"] * h["weight_decay"]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p -= h["lr"] * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + h["eps"])
    return p


CASES = [
    ("sgd", optim.SGD, dict(lr=0.3)),
    ("momentum", optim.SGD, dict(lr=0.3, momentum=0.9)),
    ("adagrad", optim.Adagrad, dict(lr=0.1, eps=1e-8)),
    ("adam", optim.Adam, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),
    ("adam", optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adamw", optim.AdamW, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,cls,hyper", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_optimizer_against_numpy(name, cls, hyper, dtype):
    model = fastbptt.RNN(3, 4, 2, dtype=dtype, seed=1)
    start = model.flat.copy()
    grads = [random_grad(model.n_params, dtype, seed=s) for s in range(5)]
    opt = cls(model, **hyper)
    for g in grads:
        opt.step(g)
    assert opt.t == 5
    want = numpy_run(name, start, grads, **hyper)
    moved = np.abs(want - start.astype(np.float64)).max()
    assert moved > 1e-3                                   # the test can see a wrong update
    np.testing.assert_allclose(model.flat, want, rtol=0, atol=rtol(dtype) * max(1.0, np.abs(want).max()))


def test_step_accepts_a_workspace_and_leaves_the_gradient_alone():
    model, X, Y, h0 = make_problem()
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws)
    g = ws.grad_flat.copy()
    want = model.flat - 0.5 * g
    optim.SGD(model, lr=0.5).step(ws)
    np.testing.assert_array_equal(ws.grad_flat, g)
    np.testing.assert_allclose(model.flat, want, rtol=1e-15)


def test_make_optimizer():
    model = fastbptt.RNN(2, 3, 2)
    assert isinstance(optim.make_optimizer("adamw", model, 1e-3), optim.AdamW)
    mom = optim.make_optimizer("momentum", model, 0.1)
    assert isinstance(mom, optim.SGD) and mom.hyper["momentum"] == 0.9
    with pytest.raises(ValueError, match="optimizer must be one of"):
        optim.make_optimizer("rmsprop", model, 0.1)


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: optim.SGD(m, lr=0), ValueError, "lr must be > 0, got 0"),
    (lambda m: optim.SGD(m, lr=-1), ValueError, "lr must be > 0"),
    (lambda m: optim.Adam(m, lr=float("inf")), ValueError, "lr must be finite"),
    (lambda m: optim.SGD(m, lr=None), TypeError, "lr must be a number"),
    (lambda m: optim.SGD(m, lr=0.1, momentum=1.0), ValueError, "momentum must be < 1"),
    (lambda m: optim.Adagrad(m, eps=0), ValueError, "eps must be > 0"),
    (lambda m: optim.Adam(m, betas=(0.9,)), TypeError, "betas must be a pair"),
    (lambda m: optim.Adam(m, betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be < 1"),
    (lambda m: optim.AdamW(m, weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
    (lambda m: optim.SGD("model", lr=0.1), TypeError, "model must be a fastbptt.RNN"),
    (lambda m: optim.SGD(m, lr=0.1).step(np.ones(3)), ValueError, "grad must have shape"),
    (lambda m: optim.SGD(m, lr=0.1).step(np.ones(m.n_params)), ValueError, "dtype float32"),
])
def test_optimizer_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(fastbptt.RNN(2, 3, 2))


def test_lr_can_be_changed_but_not_to_nonsense():
    opt = optim.SGD(fastbptt.RNN(2, 3, 2), lr=1.0)
    opt.lr = 0.5
    assert opt.lr == 0.5
    with pytest.raises(ValueError, match="lr must be > 0"):
        opt.lr = 0.0


# ----------------------------------------------------------------------------- checkpoints


def make_batches(n, T=6, B=3, D=5, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, D, (T, B)), rng.integers(0, D, (T, B))) for _ in range(n)]


def run(model, opt, batches, clip=1.0):
    ws = fastbptt.Workspace(model, 6, 3)
    h = None
    for X, Y in batches:
        _, _, h = fastbptt.loss_and_grad(model, X, Y, h, workspace=ws)
        optim.clip_grad_norm(ws.grad_flat, clip)
        opt.step(ws.grad_flat)
    return h.copy()


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam", "adamw"])
def test_resuming_from_a_checkpoint_is_bitwise_identical(name, tmp_path):
    batches = make_batches(10)
    model = fastbptt.RNN(5, 8, 5, dtype=np.float32, seed=3)
    opt = optim.make_optimizer(name, model, 0.05)
    run(model, opt, batches[:4])
    checkpoint.save(tmp_path / "ck.npz", model, opt, extra={"step": 4})
    run(model, opt, batches[4:])                          # the uninterrupted run

    resumed = checkpoint.load(tmp_path / "ck.npz")
    assert resumed.extra == {"step": 4} and resumed.optimizer.t == 4
    assert type(resumed.optimizer) is type(opt) and resumed.optimizer.hyper == opt.hyper
    run(resumed.model, resumed.optimizer, batches[4:])
    np.testing.assert_array_equal(resumed.model.flat, model.flat)
    for k in opt.state:
        np.testing.assert_array_equal(resumed.optimizer.state[k], opt.state[k])
    # and the continuation did move: a checkpoint of the start would not match
    assert not np.array_equal(checkpoint.load(tmp_path / "ck.npz").model.flat, model.flat)


def test_load_into_an_existing_model(tmp_path):
    model = fastbptt.RNN(5, 8, 5, seed=1)
    checkpoint.save(tmp_path / "m.npz", model)
    other = fastbptt.RNN(5, 8, 5, seed=2)
    got = checkpoint.load(tmp_path / "m.npz", other)
    assert got.model is other and got.optimizer is None and got.extra == {}
    np.testing.assert_array_equal(other.flat, model.flat)
    assert (tmp_path / "m.npz").is_file() and not list(tmp_path.glob(".fastbptt-*"))


@pytest.mark.parametrize("other,diff", [
    (lambda: fastbptt.RNN(5, 16, 5), "hidden_size=16"),
    (lambda: fastbptt.RNN(5, 8, 5, dtype=np.float64), "dtype=float64"),
    (lambda: fastbptt.RNN(5, 8, 5, activation="relu"), "activation='relu'"),
    (lambda: fastbptt.RNN(5, 8, 5, bias=False), "bias=False"),
])
def test_loading_a_checkpoint_of_a_different_model_is_refused(other, diff, tmp_path):
    model = fastbptt.RNN(5, 8, 5)
    checkpoint.save(tmp_path / "m.npz", model, optim.Adam(model))
    target = other()
    before = target.flat.copy()
    with pytest.raises(ValueError, match=r"holds RNN\(input_size=5, hidden_size=8.*but the model is RNN.*" + diff):
        checkpoint.load(tmp_path / "m.npz", target)
    np.testing.assert_array_equal(target.flat, before)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="is not a fastbptt checkpoint"):
        checkpoint.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="is not a fastbptt checkpoint"):
        checkpoint.load(tmp_path / "other.npz")
    model = fastbptt.RNN(2, 3, 2)
    with pytest.raises(TypeError, match="JSON-serializable"):
        checkpoint.save(tmp_path / "x.npz", model, extra={"f": object()})
    with pytest.raises(ValueError, match="different model"):
        checkpoint.save(tmp_path / "x.npz", model, optim.SGD(fastbptt.RNN(2, 3, 2), lr=1.0))


@pytest.mark.parametrize("change,match", [
    (dict(t=-1), "the step count t must be an int"),
    (dict(t=2 ** 70), "the step count t must be an int"),
    (dict(t=1.5), "the step count t must be an int"),
    (dict(t="3"), "the step count t must be an int"),
    (dict(t=True), "the step count t must be an int"),
    (dict(hyper=[0.1]), "hyper must be a dict"),
    (dict(hyper={"lr": 0.1, "rho": 2}), "do not fit Adam"),
    (dict(hyper={"lr": -1.0}), "lr must be > 0"),
    (dict(state={"exp_avg": np.zeros(3, np.float32)}), "state must hold"),
])
def test_a_tampered_optimizer_state_is_refused_and_changes_nothing(change, match):
    model = fastbptt.RNN(2, 3, 2)
    opt = optim.Adam(model)
    opt.step(np.ones(model.n_params, np.float32))
    before = opt.state_dict()
    sd = dict(opt.state_dict(), **change)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match=match):
        optim.optimizer_from_state_dict(model, sd)
    after = opt.state_dict()
    assert after["t"] == before["t"] == 1 and after["hyper"] == before["hyper"]


def copy_with_pickle(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("copy_fn", [copy.deepcopy, copy_with_pickle], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam", "adamw"])
def test_a_copied_optimizer_updates_the_copied_model(name, copy_fn):
    """Keep-the-best-model: copy (model, optimizer) together; each pair then trains on its own."""
    model = fastbptt.RNN(3, 4, 3, seed=0)
    opt = optim.make_optimizer(name, model, 0.05)
    grads = [random_grad(model.n_params, np.float32, seed=s) for s in range(4)]
    opt.step(grads[0])
    model2, opt2 = copy_fn((model, opt))
    assert opt2.model is model2 and model2 is not model
    assert opt2.t == 1 and opt2.hyper == opt.hyper
    for k in opt.state:
        assert not np.shares_memory(opt2.state[k], opt.state[k])
        np.testing.assert_array_equal(opt2.state[k], opt.state[k])
    frozen = model.flat.copy(), {k: v.copy() for k, v in opt.state.items()}
    for g in grads[1:]:
        opt2.step(g)
    np.testing.assert_array_equal(model.flat, frozen[0])          # the original pair is untouched
    for k in opt.state:
        np.testing.assert_array_equal(opt.state[k], frozen[1][k])
    assert opt.t == 1 and opt2.t == 4
    for g in grads[1:]:                                           # the same steps give the same bits
        opt.step(g)
    np.testing.assert_array_equal(model.flat, model2.flat)
    alone = copy_fn(opt)                                          # an optimizer alone brings its own model
    alone.step(grads[0])
    assert alone.model is not model
    np.testing.assert_array_equal(model.flat, model2.flat)


def test_optimizer_state_of_another_kind_is_refused():
    model = fastbptt.RNN(2, 3, 2)
    sd = optim.Adam(model).state_dict()
    with pytest.raises(ValueError, match="state is for optimizer 'adam', not 'sgd'"):
        optim.SGD(model, lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD(model, lr=0.1).load_state_dict(optim.SGD(model, lr=0.1, momentum=0.5).state_dict())
