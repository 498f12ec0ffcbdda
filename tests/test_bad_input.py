"""Bad input: a clear ValueError or TypeError naming the argument, before any kernel runs,
and every array of the caller left as it was."""

import numpy as np
import pytest

import fastbptt
from fastbptt import kernels
from helpers import make_problem


@pytest.fixture(autouse=True)
def no_kernel_may_run(monkeypatch, request):
    """Replace every compiled kernel by a stub that fails the test if it is called."""
    if "kernels_allowed" in request.keywords:
        return

    def forbidden(*args, **kwargs):
        raise AssertionError("a compiled kernel ran on invalid input")

    for module in (kernels.sweep, kernels.losses):
        for name in dir(module):
            if hasattr(getattr(module, name), "py_func"):
                monkeypatch.setattr(module, name, forbidden)


@pytest.fixture
def problem():
    model, X, Y, h0 = make_problem(T=4, B=3, D=5, H=6, O=4, dtype=np.float32)
    return model, X, Y, h0


def call_unchanged(match, exc, model, X, Y, h0=None, **kw):
    """Call loss_and_grad expecting ``exc`` matching ``match``; check nothing of the caller changed."""
    arrays = [a for a in (X, Y, h0, model.flat) if isinstance(a, np.ndarray)]
    before = [a.copy() for a in arrays]
    with pytest.raises(exc, match=match):
        fastbptt.loss_and_grad(model, X, Y, h0, **kw)
    for a, b in zip(arrays, before):
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), "an input array was changed"


def test_X_wrong_rank(problem):
    model, X, Y, h0 = problem
    call_unchanged(r"X must have shape \(T, B, D=5\)", ValueError, model, X[..., None], Y, h0)


def test_X_wrong_feature_size(problem):
    model, X, Y, h0 = problem
    call_unchanged(r"X must have shape \(4, 3, 5\)", ValueError, model, X[..., :3], Y, h0)


def test_Y_wrong_shape(problem):
    model, X, Y, h0 = problem
    call_unchanged(r"Y must have shape \(4, 3\)", ValueError, model, X, Y[:2], h0)


def test_Y_wrong_shape_for_mse(problem):
    model, X, _, h0 = problem
    Y = np.zeros((4, 3, 3), np.float32)
    call_unchanged(r"Y must have shape \(4, 3, 4\)", ValueError, model, X, Y, h0, loss="mse")


def test_h0_wrong_shape(problem):
    model, X, Y, h0 = problem
    call_unchanged(r"h0 must have shape \(3, 6\)", ValueError, model, X, Y, h0[:2])


def test_parameter_wrong_shape(problem):
    model, *_ = problem
    params = {k: v.copy() for k, v in model.params.items()}
    params["W_hh"] = np.zeros((6, 5), np.float32)
    before = model.flat.copy()
    with pytest.raises(ValueError, match=r"params\['W_hh'\] must have shape \(6, 6\)"):
        model.load_params(params)
    assert np.array_equal(model.flat, before)


def test_parameter_missing(problem):
    model, *_ = problem
    params = {k: v for k, v in model.params.items() if k != "b_q"}
    with pytest.raises(ValueError, match=r"missing \['b_q'\]"):
        model.load_params(params)


def test_parameter_wrong_dtype(problem):
    model, *_ = problem
    params = {k: v.astype(np.float64) for k, v in model.params.items()}
    with pytest.raises(TypeError, match=r"params\['W_hx'\] must have the model's dtype float32"):
        model.load_params(params)


def test_X_mismatched_dtype(problem):
    model, X, Y, h0 = problem
    call_unchanged("X has dtype float64 but the model is float32", TypeError,
                   model, X.astype(np.float64), Y, h0)


def test_h0_mismatched_dtype(problem):
    model, X, Y, h0 = problem
    call_unchanged("h0 has dtype float64 but the model is float32", TypeError,
                   model, X, Y, h0.astype(np.float64))


def test_Y_mismatched_dtype_for_mse(problem):
    model, X, _, h0 = problem
    call_unchanged("Y has dtype float64", TypeError, model, X, np.zeros((4, 3, 4)), h0, loss="mse")


def test_X_integer_dense(problem):
    model, X, Y, h0 = problem
    call_unchanged("X must hold floats", TypeError, model, X.astype(np.int32), Y, h0)


def test_X_complex(problem):
    model, X, Y, h0 = problem
    call_unchanged("X must hold floats", TypeError, model, X.astype(np.complex64), Y, h0)


def test_X_object(problem):
    model, X, Y, h0 = problem
    call_unchanged("X must hold floats", TypeError, model, X.astype(object), Y, h0)


def test_X_float_rank_2(problem):
    model, X, Y, h0 = problem
    call_unchanged("X of rank 2 must hold integer token ids", TypeError, model, X[:, :, 0], Y, h0)


def test_X_bool_tokens(problem):
    model, X, Y, h0 = problem
    call_unchanged("X of rank 2 must hold integer token ids", TypeError,
                   model, np.zeros((4, 3), bool), Y, h0)


def test_float_class_labels(problem):
    model, X, Y, h0 = problem
    call_unchanged("Y must hold integer class labels, got floats", TypeError,
                   model, X, Y.astype(np.float32), h0)


def test_mse_targets_integer(problem):
    model, X, _, h0 = problem
    call_unchanged("Y must hold floats", TypeError,
                   model, X, np.zeros((4, 3, 4), np.int64), h0, loss="mse")


def test_negative_token_id(problem):
    model, _, Y, h0 = problem
    tokens = np.zeros((4, 3), np.int64)
    tokens[2, 1] = -1
    call_unchanged(r"X must hold token ids in \[0, 5\), got -1 at index \(2, 1\)", ValueError,
                   model, tokens, Y, h0)


def test_token_id_too_large(problem):
    model, _, Y, h0 = problem
    tokens = np.zeros((4, 3), np.uint8)
    tokens[3, 0] = 5
    call_unchanged(r"X must hold token ids in \[0, 5\), got 5 at index \(3, 0\)", ValueError,
                   model, tokens, Y, h0)


def test_huge_token_id(problem):
    model, _, Y, h0 = problem
    tokens = np.zeros((4, 3), np.uint64)
    tokens[0, 0] = 2**63 + 7
    call_unchanged(r"X must hold token ids in \[0, 5\)", ValueError, model, tokens, Y, h0)


def test_negative_class_label(problem):
    model, X, Y, h0 = problem
    Y = Y.copy()
    Y[1, 2] = -3
    call_unchanged(r"Y must hold class labels in \[0, 4\), got -3 at index \(1, 2\)", ValueError,
                   model, X, Y, h0)


def test_class_label_too_large(problem):
    model, X, Y, h0 = problem
    Y = Y.copy()
    Y[0, 0] = 4
    call_unchanged(r"Y must hold class labels in \[0, 4\), got 4", ValueError, model, X, Y, h0)


def test_zero_time_steps(problem):
    model, X, Y, _ = problem
    call_unchanged("X must have T >= 1 time steps", ValueError, model, X[:0], Y[:0])


def test_zero_sequences(problem):
    model, X, Y, _ = problem
    # loss_and_grad over no sequences: a mean over no positions (forward/backward take B = 0:
    # tests/test_empty_batch.py)
    call_unchanged("B=0 sequences .*mean over no positions", ValueError, model, X[:, :0], Y[:, :0])


def test_workspace_wrong_size(problem):
    model, X, Y, h0 = problem
    ws = fastbptt.Workspace(model, 5, 3)
    call_unchanged(r"workspace was made for T=5, B=3 but the inputs have T=4, B=3", ValueError,
                   model, X, Y, h0, workspace=ws)


def test_workspace_wrong_dtype(problem):
    model, X, Y, h0 = problem
    other = fastbptt.RNN(5, 6, 4, dtype=np.float64)
    ws = fastbptt.Workspace(other, 4, 3)
    call_unchanged("workspace was made for a model with", ValueError, model, X, Y, h0, workspace=ws)


def test_workspace_wrong_type(problem):
    model, X, Y, h0 = problem
    call_unchanged("workspace must be a fastbptt.Workspace", TypeError,
                   model, X, Y, h0, workspace={"hs": None})


def test_nan_in_X(problem):
    model, X, Y, h0 = problem
    X = X.copy()
    X[1, 1, 1] = np.nan
    call_unchanged("X contains NaN or Inf", ValueError, model, X, Y, h0)


def test_inf_in_h0(problem):
    model, X, Y, h0 = problem
    h0 = h0.copy()
    h0[0, 0] = -np.inf
    call_unchanged("h0 contains NaN or Inf", ValueError, model, X, Y, h0)


def test_nan_in_mse_targets(problem):
    model, X, _, h0 = problem
    Y = np.zeros((4, 3, 4), np.float32)
    Y[0, 0, 0] = np.nan
    call_unchanged("Y contains NaN or Inf", ValueError, model, X, Y, h0, loss="mse")


def test_inf_in_weights(problem):
    model, X, Y, h0 = problem
    model.params["W_hh"][2, 3] = np.inf
    call_unchanged(r"model parameters \['W_hh'\] contain NaN or Inf", ValueError, model, X, Y, h0)


@pytest.mark.kernels_allowed
def test_nan_propagates_when_not_checked(problem):
    model, X, Y, h0 = problem
    X = X.copy()
    X[0, 0, 0] = np.nan
    L, grads, hT = fastbptt.loss_and_grad(model, X, Y, h0, check_finite=False)
    assert np.isnan(L) and np.isnan(hT[0]).all() and np.isnan(grads["W_hh"]).any()


@pytest.mark.kernels_allowed
def test_non_contiguous_inputs_are_copied(problem):
    model, X, Y, h0 = problem
    Xf = np.asfortranarray(X)
    Yt = np.ascontiguousarray(Y.T).T             # a transposed view
    h0f = np.asfortranarray(h0)
    assert not Xf.flags.c_contiguous and not Yt.flags.c_contiguous
    a = fastbptt.loss_and_grad(model, X, Y, h0)
    a = (a[0], {k: v.copy() for k, v in a[1].items()})
    b = fastbptt.loss_and_grad(model, Xf, Yt, h0f)
    assert a[0] == b[0]
    for name in a[1]:
        np.testing.assert_array_equal(a[1][name], b[1][name])


def test_unknown_loss(problem):
    model, X, Y, h0 = problem
    call_unchanged("loss must be one of", ValueError, model, X, Y, h0, loss="hinge")


def test_not_a_model(problem):
    _, X, Y, h0 = problem
    with pytest.raises(TypeError, match="model must be a fastbptt.RNN"):
        fastbptt.loss_and_grad({"W_hh": 1}, X, Y, h0)


def test_parallel_not_a_bool(problem):
    model, X, Y, h0 = problem
    call_unchanged("parallel must be True or False", TypeError, model, X, Y, h0, parallel="yes")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(input_size=0), ValueError, "input_size must be a positive int"),
    (dict(hidden_size=2.5), TypeError, "hidden_size must be a positive int"),
    (dict(activation="sigmoid"), ValueError, "activation must be one of"),
    (dict(dtype=np.float16), TypeError, "dtype must be float32 or float64"),
    (dict(dtype=np.int32), TypeError, "dtype must be float32 or float64"),
    (dict(init="xavier"), ValueError, "init must be 'uniform' or 'normal'"),
    (dict(bias=1), TypeError, "bias must be a bool"),
    (dict(activation=np.array(["tanh"])), ValueError, "activation must be one of"),
    (dict(seed=-1), ValueError, r"seed must be an int >= 0 \(or None"),
    (dict(seed="7"), TypeError, "seed must be None, an int >= 0"),
    (dict(scale="x"), TypeError, "scale must be a real number"),
    (dict(scale=np.nan), ValueError, "scale must be a finite number"),
    (dict(dtype=None), TypeError, "dtype must be np.float32 or np.float64, got None"),
    (dict(scale=1e39), ValueError, r"scale=1e\+39 draws weights up to .* beyond the largest float32"),
])
def test_bad_model_arguments(kwargs, exc, match):
    args = dict(input_size=3, hidden_size=4, output_size=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fastbptt.RNN(**args)


def test_bad_workspace_sizes(problem):
    model, *_ = problem
    with pytest.raises(ValueError, match="T must be a positive int"):
        fastbptt.Workspace(model, 0, 3)
    with pytest.raises(TypeError, match="B must be an int >= 0"):
        fastbptt.Workspace(model, 4, 3.0)
    with pytest.raises(ValueError, match="B must be an int >= 0"):
        fastbptt.Workspace(model, 4, -1)


def test_backward_without_forward(problem):
    model, X, *_ = problem
    ws = fastbptt.Workspace(model, 4, 3)
    with pytest.raises(ValueError, match="workspace holds no forward pass"):
        fastbptt.backward(model, np.zeros((4, 3, 4), np.float32), workspace=ws)


@pytest.mark.kernels_allowed
def test_backward_dO_wrong_shape(problem):
    model, X, _, h0 = problem
    ws = fastbptt.Workspace(model, 4, 3)
    fastbptt.forward(model, X, h0, workspace=ws)
    with pytest.raises(ValueError, match=r"dO must have shape \(4, 3, 4\)"):
        fastbptt.backward(model, np.zeros((4, 3, 3), np.float32), workspace=ws)


# ----------------------------------------------------------------------------- masked arrays
# A masked array's min()/max() skip the masked entries, so a hidden out-of-range id or a NaN
# used to pass the checks and reach the kernels (a segfault, or silent garbage). Masks are
# refused, whatever they hide, with a message that says how to pass the values.

def _masked(a, hide):
    m = np.ma.masked_array(a.copy(), mask=np.zeros(a.shape, bool))
    m.mask.flat[0] = True
    m.data.flat[0] = hide
    return m


def test_masked_token_ids(problem):
    model, _, Y, h0 = problem
    X = _masked(np.zeros((4, 3), np.int64), 10 ** 9)
    call_unchanged(r"X is a masked array.*X\.filled", TypeError, model, X, Y, h0)


def test_masked_class_labels(problem):
    model, X, Y, h0 = problem
    call_unchanged(r"Y is a masked array.*Y\.filled", TypeError, model, X, _masked(Y, -5), h0)


def test_masked_dense_inputs(problem):
    model, X, Y, h0 = problem
    call_unchanged(r"X is a masked array", TypeError, model, _masked(X, np.nan), Y, h0)


def test_masked_h0(problem):
    model, X, Y, h0 = problem
    call_unchanged(r"h0 is a masked array", TypeError, model, X, Y, _masked(h0, np.inf))


def test_masked_carry(problem):
    model, X, Y, h0 = problem
    carry = _masked(np.ones(4, np.float32), np.nan)
    call_unchanged(r"carry is a masked array", TypeError, model, X, Y, h0, carry=carry)


@pytest.mark.kernels_allowed
def test_masked_dO_in_backward(problem):
    model, X, _, h0 = problem
    ws = fastbptt.Workspace(model, 4, 3)
    fastbptt.forward(model, X, h0, workspace=ws)
    with pytest.raises(TypeError, match=r"dO is a masked array"):
        fastbptt.backward(model, _masked(np.zeros((4, 3, 4), np.float32), np.nan), workspace=ws)


def test_masked_hidden_id_does_not_crash_the_process(tmp_path):
    """The old code segfaulted here; run it in a child so a crash fails the test instead of pytest."""
    import subprocess
    import sys
    script = tmp_path / "masked.py"
    script.write_text(
        "import numpy as np, fastbptt\n"
        "m = fastbptt.RNN(5, 8, 5)\n"
        "X = np.ma.masked_array(np.zeros((20, 4), np.int64), mask=np.zeros((20, 4), bool))\n"
        "X.data[3, 2] = 10 ** 12; X.mask[3, 2] = True\n"
        "try:\n"
        "    fastbptt.loss_and_grad(m, X, np.zeros((20, 4), np.int64))\n"
        "except TypeError as e:\n"
        "    print('refused:', e)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused: X is a masked array" in done.stdout


# ----------------------------------------------------------------------------- arguments by hand

@pytest.mark.parametrize("name", ["method", "loss"])
def test_array_as_a_string_option(problem, name):
    model, X, Y, h0 = problem
    call_unchanged(rf"{name} must be one of", ValueError, model, X, Y, h0,
                   **{name: np.array(["fused", "blas"])})


def test_carry_that_overflows_the_model_dtype(problem):
    model, X, Y, h0 = problem
    carry = np.ones(4)          # float64, for a float32 model
    carry[2] = 1e300
    call_unchanged(r"carry holds 1e\+300, which the model's float32 cannot represent", ValueError,
                   model, X, Y, h0, carry=carry)


def test_read_only_parameters(problem):
    model, X, Y, h0 = problem
    model.flat.flags.writeable = False
    call_unchanged(r"model\.flat is read-only.*writeable = True", ValueError, model, X, Y, h0)


def test_workspace_in_use_by_another_call(problem):
    model, X, Y, h0 = problem
    ws = fastbptt.Workspace(model, 4, 3)
    ws._busy.acquire()           # as another thread's call would hold it
    try:
        call_unchanged(r"workspace is in use.*its own fastbptt\.Workspace", RuntimeError,
                       model, X, Y, h0, workspace=ws)
    finally:
        ws._busy.release()
