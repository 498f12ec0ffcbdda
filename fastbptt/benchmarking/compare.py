"""The same training step in fastbptt, the NumPy reference, PyTorch and JAX, for benchmarks.

One step is: forward over T steps, softmax cross-entropy averaged over the T·B
positions, and the gradient of every parameter, from h_0 = 0, on dense inputs
X (T, B, D) and integer classes Y (T, B). Every ``make_*_step`` below takes a
``fastbptt.RNN`` (whose weights the others copy) and the batch, does its set-up
(copies, tensors, tracing) outside, and returns a callable with no arguments that
runs one whole step and returns ``(loss, grads)``: a float and a dict keyed like
``model.params`` (``W_hx``, ``W_hh``, ``b_h``, ``W_qh``, ``b_q``) of arrays or
array-likes (``numpy.asarray`` them). Gradients never accumulate across calls.

PyTorch and JAX are optional: they are imported inside the functions that need
them, so importing this module needs only NumPy and Numba. ``available()`` says
which of them can be imported.

Shared by ``bench/`` (the pytest-benchmark suite) and ``python -m fastbptt bench``.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ..core import reference
from ..core.api import loss_and_grad
from ..core.model import RNN
from ..core.workspace import Workspace

#: All implementations, in the order the benchmarks show them. "fastbptt-parallel" is
#: fastbptt with ``parallel=True`` (the B sequences spread over Numba's threads).
IMPLEMENTATIONS = ("fastbptt", "fastbptt-parallel", "reference", "torch", "jax")

#: The flop count of one step, as text (see ``step_flops``).
FLOP_FORMULA = "2·T·B·(2·D·H + 3·H·H + 3·H·O)"


def step_flops(T, B, D, H, O):
    """Floating-point operations of the matrix products of one training step.

    A multiply-add counts 2. Forward: the input projection (D·H per position), the
    recurrence (H·H) and the readout (H·O), so 2·T·B·(D·H + H·H + H·O). Backward:
    ∂L/∂W_qh (H·O), ∂L/∂h from the readout (H·O), ∂L/∂h from the recurrence (H·H),
    ∂L/∂W_hh (H·H) and ∂L/∂W_hx (D·H); ∂L/∂X is not computed by any implementation.
    In all 2·T·B·(2·D·H + 3·H·H + 3·H·O). Biases, φ and the softmax are not counted.
    (The common convention "training = 3 × forward" counts one D·H more.)
    """
    return 2 * T * B * (2 * D * H + 3 * H * H + 3 * H * O)


def parse_name(name):
    """Split an implementation name into (base, options).

    ``"fastbptt:fused"`` is fastbptt called with ``method="fused"`` (likewise
    ``"fastbptt-parallel:blas"``); any other name has no options.
    """
    base, sep, method = name.partition(":")
    if sep and base in ("fastbptt", "fastbptt-parallel") and method:
        return base, {"method": method}
    if sep:
        raise ValueError(f"unknown implementation {name!r}: only fastbptt and fastbptt-parallel take "
                         f"a method, as in 'fastbptt:fused'")
    return base, {}


def available(name):
    """Whether implementation ``name`` can run here (``torch``/``jax`` need their package)."""
    name, _ = parse_name(name)
    if name in ("fastbptt", "fastbptt-parallel", "reference"):
        return True
    if name in ("torch", "jax"):
        return importlib.util.find_spec(name) is not None
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS}")


def supports(name, activation):
    """Whether implementation ``name`` has ``activation`` (``torch.nn.RNN`` has no identity)."""
    name, _ = parse_name(name)
    return not (name == "torch" and activation not in ("tanh", "relu"))


def version(name):
    """The version string of the library behind implementation ``name`` (None if absent)."""
    name, _ = parse_name(name)
    if name in ("fastbptt", "fastbptt-parallel", "reference"):
        from .. import __version__
        return __version__
    if not available(name):
        return None
    return importlib.import_module(name).__version__


def default_threads():
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_problem(T, B, D, H, O, dtype=np.float32, activation="tanh", bias=True, seed=0):
    """A model initialized like ``torch.nn.RNN`` (U(-1/√H, 1/√H)), X ~ N(0, 1) and random classes.

    Returns
    -------
    model : fastbptt.RNN
    X : ndarray (T, B, D) of ``dtype``
    Y : ndarray (T, B) of int64 in [0, O)
    """
    rng = np.random.default_rng(seed)
    model = RNN(D, H, O, activation=activation, bias=bias, dtype=dtype, seed=seed)
    X = rng.standard_normal((T, B, D)).astype(model.dtype)
    Y = rng.integers(0, O, size=(T, B)).astype(np.int64)
    return model, X, Y


def _check_dense(model, X, Y):
    X = np.asarray(X)
    if X.ndim != 3 or X.dtype != model.dtype:
        raise ValueError(f"the comparison steps take dense inputs X (T, B, D) of dtype {model.dtype}, "
                         f"got shape {X.shape} dtype {X.dtype}")
    Y = np.asarray(Y)
    if Y.shape != X.shape[:2] or Y.dtype.kind not in "iu":
        raise ValueError(f"Y must hold integer classes of shape {X.shape[:2]}, got {Y.shape} {Y.dtype}")
    return np.ascontiguousarray(X), np.ascontiguousarray(Y, dtype=np.int64)


# ----------------------------------------------------------------------------- NumPy


def make_fastbptt_step(model, X, Y, parallel=False, **options):
    """fastbptt.loss_and_grad with a workspace made here; ``options`` go to loss_and_grad."""
    X, Y = _check_dense(model, X, Y)
    T, B, _ = X.shape
    ws = Workspace(model, T, B)

    def step():
        loss, grads, _ = loss_and_grad(model, X, Y, workspace=ws, parallel=parallel, **options)
        return float(loss), grads

    return step


def make_reference_step(model, X, Y, dtype=None):
    """fastbptt.reference.loss_and_grad on copies of the weights, in ``dtype`` (default the model's)."""
    X, Y = _check_dense(model, X, Y)
    dtype = model.dtype if dtype is None else np.dtype(dtype)
    params = {name: np.array(p, dtype=dtype) for name, p in model.params.items()}
    X = X.astype(dtype, copy=False)
    activation = model.activation

    def step():
        loss, grads, _, _, _ = reference.loss_and_grad(params, X, Y, None, activation, "cross_entropy")
        return float(loss), grads

    return step


# ----------------------------------------------------------------------------- PyTorch


def make_torch_step(model, X, Y, threads=None):
    """``torch.nn.RNN`` (seq-first) + ``nn.Linear`` + ``F.cross_entropy`` on the flattened logits.

    The weights are copied from ``model``: ``weight_ih_l0`` = W_hx, ``weight_hh_l0`` = W_hh,
    ``bias_ih_l0`` = b_h and ``bias_hh_l0`` = 0 (nn.RNN has two biases whose sum is b_h;
    its gradient, equal to that of ``bias_ih_l0``, is computed and not returned), the
    readout's weight and bias = W_qh and b_q. Each call sets the gradients to None,
    then runs forward, loss and ``backward()``, as a training loop with
    ``zero_grad(set_to_none=True)`` does. ``threads`` (default: every core this process
    may use) goes to ``torch.set_num_threads``, which is global to the process.
    """
    import torch
    import torch.nn.functional as F

    if not supports("torch", model.activation):
        raise ValueError(f"torch.nn.RNN has no activation {model.activation!r} (only tanh and relu)")
    X, Y = _check_dense(model, X, Y)
    T, B, D = X.shape
    torch.set_num_threads(default_threads() if threads is None else int(threads))
    tdtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[model.dtype]
    rnn = torch.nn.RNN(D, model.hidden_size, num_layers=1, nonlinearity=model.activation,
                       bias=model.bias, batch_first=False).to(tdtype)
    readout = torch.nn.Linear(model.hidden_size, model.output_size, bias=model.bias).to(tdtype)
    p = model.params
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.from_numpy(np.array(p["W_hx"])))
        rnn.weight_hh_l0.copy_(torch.from_numpy(np.array(p["W_hh"])))
        readout.weight.copy_(torch.from_numpy(np.array(p["W_qh"])))
        if model.bias:
            rnn.bias_ih_l0.copy_(torch.from_numpy(np.array(p["b_h"])))
            rnn.bias_hh_l0.zero_()
            readout.bias.copy_(torch.from_numpy(np.array(p["b_q"])))
    named = {"W_hx": rnn.weight_ih_l0, "W_hh": rnn.weight_hh_l0, "W_qh": readout.weight}
    if model.bias:
        named.update(b_h=rnn.bias_ih_l0, b_q=readout.bias)
    params = list(rnn.parameters()) + list(readout.parameters())
    x = torch.from_numpy(X)
    y = torch.from_numpy(Y.reshape(T * B))
    O = model.output_size

    def step():
        for q in params:
            q.grad = None
        hs, _ = rnn(x)                                   # (T, B, H), h_0 = 0
        logits = readout(hs).reshape(T * B, O)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss.item(), {name: q.grad.numpy() for name, q in named.items()}

    return step


# ----------------------------------------------------------------------------- JAX


def make_jax_step(model, X, Y):
    """``jax.jit(jax.value_and_grad(loss))`` with the recurrence in ``jax.lax.scan``.

    The input projection X W_hxᵀ + b_h of all T·B positions is one matrix product
    before the scan and the readout one after it (as a careful JAX user writes it);
    the scan carries h_t = φ(xw_t + h_{t-1} W_hhᵀ). The loss is the mean of
    ``-log_softmax`` at the targets. The function is traced and compiled on the first
    call of the returned step (call it once before timing). float64 models switch on
    ``jax_enable_x64``, which is global to the process. Each call blocks until the
    results are ready.
    """
    import jax
    import jax.numpy as jnp

    X, Y = _check_dense(model, X, Y)
    if model.dtype == np.float64 and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    T, B, D = X.shape
    H = model.hidden_size
    phi = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}[model.activation]
    bias = model.bias
    dtype = model.dtype

    def loss_fn(params, x, y):
        xw = (x.reshape(T * B, D) @ params["W_hx"].T).reshape(T, B, H)
        if bias:
            xw = xw + params["b_h"]

        def cell(h, xw_t):
            h = phi(xw_t + h @ params["W_hh"].T)
            return h, h

        _, hs = jax.lax.scan(cell, jnp.zeros((B, H), dtype), xw)
        logits = hs.reshape(T * B, H) @ params["W_qh"].T
        if bias:
            logits = logits + params["b_q"]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    params = {name: jnp.asarray(np.array(p)) for name, p in model.params.items()}
    x = jnp.asarray(X)
    y = jnp.asarray(Y.reshape(T * B).astype(np.int32))

    def step():
        loss, grads = value_and_grad(params, x, y)
        jax.block_until_ready(grads)
        return float(loss), grads

    return step


def make_fastbptt_parallel_step(model, X, Y, **options):
    """``make_fastbptt_step`` with ``parallel=True``."""
    return make_fastbptt_step(model, X, Y, parallel=True, **options)


MAKERS = {"fastbptt": make_fastbptt_step, "fastbptt-parallel": make_fastbptt_parallel_step,
          "reference": make_reference_step,
          "torch": make_torch_step, "jax": make_jax_step}


def make_step(name, model, X, Y, **options):
    """The step of implementation ``name``: one of ``IMPLEMENTATIONS``, or ``"fastbptt:METHOD"``."""
    base, extra = parse_name(name)
    if base not in MAKERS:
        raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS}")
    return MAKERS[base](model, X, Y, **extra, **options)


# ----------------------------------------------------------------------------- checking


def oracle(model, X, Y):
    """The reference's loss and gradients computed in float64 from the model's weights."""
    loss, grads = make_reference_step(model, X, Y, dtype=np.float64)()
    return loss, grads


def tolerance(dtype):
    """Largest relative error ``compare_to_oracle`` accepts for ``dtype``.

    float32 products summed in different orders over up to a thousand steps differ
    from a float64 oracle by about 1e-6 relative (float64: about 1e-15); 1e-4 and
    1e-10 leave a wide margin and still catch any wrong term (a missing bias, a
    transposed weight, a step off by one).
    """
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-4


def compare_to_oracle(result, expected):
    """Errors of ``result`` = (loss, grads) against ``expected`` = ``oracle(...)``.

    Each gradient's error is max |g - g_ref|, and its relative error that divided by
    max(max |g_ref|, 1e-3) (the floor keeps exact zeros, such as every gradient of a
    one-class cross-entropy, from asking for an exact zero).

    Returns
    -------
    dict with ``loss_error`` (relative to max(|loss|, 1e-3)), ``max_grad_error`` (the
    largest relative gradient error), ``max_grad_abs_error``, ``worst`` (its name) and
    ``grad_errors`` (name -> relative error).
    """
    loss, grads = result
    ref_loss, ref_grads = expected
    if set(grads) != set(ref_grads):
        raise ValueError(f"gradients {sorted(grads)} do not match the reference's {sorted(ref_grads)}")
    errors, abs_errors = {}, {}
    for name, want in ref_grads.items():
        got = np.asarray(grads[name], dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            raise ValueError(f"gradient {name} has shape {got.shape}, expected {want.shape}")
        err = float(np.max(np.abs(got - want), initial=0.0))
        abs_errors[name] = err
        errors[name] = err / max(float(np.max(np.abs(want), initial=0.0)), 1e-3)
    worst = max(errors, key=errors.get)
    return {"loss_error": abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-3),
            "max_grad_error": errors[worst], "max_grad_abs_error": abs_errors[worst],
            "worst": worst, "grad_errors": errors}


def check(result, expected, dtype):
    """``compare_to_oracle`` plus ``ok``: loss and every gradient within ``tolerance(dtype)``."""
    errors = compare_to_oracle(result, expected)
    tol = tolerance(dtype)
    errors["ok"] = bool(errors["loss_error"] <= tol and errors["max_grad_error"] <= tol)
    errors["tolerance"] = tol
    return errors
