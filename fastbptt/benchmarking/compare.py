"""The same training step in fastbptt, the NumPy reference, PyTorch and JAX, for benchmarks.

One step is: forward over T steps, softmax cross-entropy averaged over the T·B
positions, and the gradient of every parameter, from h_0 = 0 (and c_0 = 0 for the
LSTM), on dense inputs X (T, B, D) and integer classes Y (T, B). Every
``make_*_step`` below takes a model -- ``fastbptt.RNN`` (Elman), ``fastbptt.GRU`` or
``fastbptt.LSTM``, whose weights the others copy -- and the batch, does its set-up
(copies, tensors, tracing) outside, and returns a callable with no arguments that
runs one whole step and returns ``(loss, grads)``: a float and a dict keyed like
``model.params`` (``W_hx``, ``W_hh``, ``b_h``, ``W_qh``, ``b_q`` for the Elman cell;
``W_ih``, ``W_hh``, ``b_ih``, ``b_hh``, ``W_qh``, ``b_q`` for the gated cells) of
arrays or array-likes (``numpy.asarray`` them). Gradients never accumulate across calls.

Stacks and lengths: a model with ``num_layers=L`` (``make_problem(..., num_layers=L)``)
is timed against ``torch.nn.RNN``/``GRU``/``LSTM(num_layers=L)`` with every layer's weights
copied (and in the reference, ``fastbptt.core.reference_layers``). With ``lengths``
(B,) (``make_lengths``), sequence b uses its first lengths[b] steps and the loss is the
mean over the Σ lengths valid positions; ``"torch-packed"`` runs PyTorch on
``pack_padded_sequence(..., enforce_sorted=False)`` (packing X and Y is part of its step,
as in a training loop), ``"torch-padded"`` on the whole padded batch with the loss
masked to the valid positions, and ``"fastbptt-full"`` is fastbptt on the same batch
with every length T (the time the lengths save; its loss is the full one).

The gated cells are PyTorch's: ``torch.nn.GRU`` / ``torch.nn.LSTM`` get the weights
one to one (same layout, gates stacked in PyTorch's order), and the JAX step writes
the same equations (the GRU's reset gate applied after the product, r ⊙ (W_hn h + b_hn)).

PyTorch and JAX are optional: they are imported inside the functions that need
them, so importing this module needs only NumPy and Numba. ``available()`` says
which of them can be imported.

Shared by ``bench/`` (the pytest-benchmark suite) and ``python -m fastbptt bench``.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ..core import reference, reference_cells
from ..core.api import loss_and_grad
from ..core.model import CELLS
from ..core.workspace import Workspace

#: All implementations, in the order the benchmarks show them. "fastbptt-parallel" is
#: fastbptt with ``parallel=True`` (the B sequences spread over Numba's threads).
#: "fastbptt-full" is fastbptt ignoring the batch's lengths (every sequence T long);
#: "torch-packed" and "torch-padded" are PyTorch on sequences of different lengths (see above).
IMPLEMENTATIONS = ("fastbptt", "fastbptt-parallel", "fastbptt-full", "reference", "torch", "torch-packed",
                   "torch-padded", "jax")

#: The fastbptt variants (each may take a method, as in "fastbptt-full:blas").
FASTBPTT = ("fastbptt", "fastbptt-parallel", "fastbptt-full")

#: PyTorch's variants: the whole batch, packed sequences, the padded batch with a masked loss.
TORCH = ("torch", "torch-packed", "torch-padded")

#: The cells, in the order the benchmarks show them, and G, the number of gates of each:
#: its input and recurrent products are G·H wide.
CELL_NAMES = ("rnn", "gru", "lstm")
GATES = {"rnn": 1, "gru": 3, "lstm": 4}

#: The flop count of one step, as text (see ``step_flops``).
FLOP_FORMULA = "2·T·B·(2·G·D·H + 3·G·H·H + 3·H·O), G = 1 rnn, 3 gru, 4 lstm"

#: The same for a stack of L layers over the P = Σ lengths valid positions (P = T·B without lengths).
STACK_FLOP_FORMULA = "2·P·(2·G·D·H + 3·G·H·H + 3·H·O + 6·(L−1)·G·H·H), P = Σ lengths"


def step_flops(T, B, D, H, O, cell="rnn", num_layers=1, positions=None):
    """Floating-point operations of the matrix products of one training step.

    A multiply-add counts 2; G is the cell's number of gates (1 Elman, 3 GRU, 4 LSTM),
    so its input and recurrent products are G·H wide. Forward: the input projection
    (D·G·H per position), the recurrence (H·G·H) and the readout (H·O), so
    2·T·B·(G·D·H + G·H·H + H·O). Backward: ∂L/∂W_qh (H·O), ∂L/∂h from the readout
    (H·O), ∂L/∂h from the recurrence (G·H·H), ∂L/∂W_hh (G·H·H) and ∂L/∂W_ih (G·D·H);
    ∂L/∂X is not computed by any implementation. In all

        flops = 2·T·B·(2·G·D·H + 3·G·H·H + 3·H·O)

    Biases, the pointwise gate math (σ, tanh, the products with the gates) and the
    softmax are not counted. (The common convention "training = 3 × forward" counts
    one G·D·H more.)

    Each layer k ≥ 1 of a stack (``num_layers``) takes the H-wide output of the one below:
    forward G·H·H (input) + G·H·H (recurrence); backward ∂L/∂W_ih (G·H·H), ∂L/∂(its input),
    which the layer below needs (G·H·H), and the recurrence's two (2·G·H·H): 6·G·H·H per
    position in all (``STACK_FLOP_FORMULA``). ``positions`` (default T·B) counts the
    positions that do work: Σ lengths for sequences of different lengths, so that a
    step's GFLOP/s count useful work only.
    """
    if cell not in GATES:
        raise ValueError(f"unknown cell {cell!r}; choose from {', '.join(CELL_NAMES)}")
    if int(num_layers) < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    G = GATES[cell]
    P = T * B if positions is None else int(positions)
    return 2 * P * (2 * G * D * H + 3 * G * H * H + 3 * H * O + 6 * (int(num_layers) - 1) * G * H * H)


def parse_name(name):
    """Split an implementation name into (base, options).

    ``"fastbptt:fused"`` is fastbptt called with ``method="fused"`` (likewise
    ``"fastbptt-parallel:blas"``); any other name has no options.
    """
    base, sep, method = name.partition(":")
    if sep and base in FASTBPTT and method:
        return base, {"method": method}
    if sep:
        raise ValueError(f"unknown implementation {name!r}: only {', '.join(FASTBPTT)} take "
                         f"a method, as in 'fastbptt:fused'")
    return base, {}


def available(name):
    """Whether implementation ``name`` can run here (``torch``/``jax`` need their package)."""
    name, _ = parse_name(name)
    if name in FASTBPTT or name == "reference":
        return True
    if name in TORCH:
        return importlib.util.find_spec("torch") is not None
    if name == "jax":
        return importlib.util.find_spec(name) is not None
    raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS}")


def unsupported(name, activation, cell="rnn", num_layers=1, variable_lengths=False):
    """Why implementation ``name`` cannot run this step, or None when it can.

    ``torch.nn.RNN`` has no identity activation (the gated cells have no activation to
    choose); the JAX step has one layer and no lengths; plain ``"torch"`` runs every
    sequence to T, so with ``variable_lengths`` it is ``"torch-packed"`` or
    ``"torch-padded"`` that is timed.
    """
    name, _ = parse_name(name)
    if name in TORCH and cell == "rnn" and activation not in ("tanh", "relu"):
        return f"{name} has no activation {activation}"
    if name == "jax" and num_layers > 1:
        return "the JAX step has one layer"
    if name == "jax" and variable_lengths:
        return "the JAX step has no lengths"
    if name == "torch" and variable_lengths:
        return "torch runs every sequence to T: see torch-packed and torch-padded"
    return None


def supports(name, activation, cell="rnn", num_layers=1, variable_lengths=False):
    """Whether implementation ``name`` can run this step (see ``unsupported``)."""
    return unsupported(name, activation, cell, num_layers, variable_lengths) is None


def version(name):
    """The version string of the library behind implementation ``name`` (None if absent)."""
    name, _ = parse_name(name)
    if name in FASTBPTT or name == "reference":
        from .. import __version__
        return __version__
    if not available(name):
        return None
    return importlib.import_module("torch" if name in TORCH else name).__version__


def default_threads():
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_problem(T, B, D, H, O, dtype=np.float32, activation="tanh", bias=True, seed=0, cell="rnn",
                 num_layers=1):
    """A model initialized like PyTorch's (U(-1/√H, 1/√H)), X ~ N(0, 1) and random classes.

    ``cell`` is ``"rnn"`` (Elman, with ``activation``), ``"gru"`` or ``"lstm"`` (which
    ignore ``activation``); ``num_layers`` stacks that many layers (no dropout).

    Returns
    -------
    model : fastbptt.RNN, GRU or LSTM
    X : ndarray (T, B, D) of ``dtype``
    Y : ndarray (T, B) of int64 in [0, O)
    """
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose from {', '.join(CELL_NAMES)}")
    rng = np.random.default_rng(seed)
    stack = {} if num_layers == 1 else {"num_layers": num_layers}     # works with a one-layer fastbptt
    if cell == "rnn":
        model = CELLS[cell](D, H, O, activation=activation, bias=bias, dtype=dtype, seed=seed, **stack)
    else:
        model = CELLS[cell](D, H, O, bias=bias, dtype=dtype, seed=seed, **stack)
    X = rng.standard_normal((T, B, D)).astype(model.dtype)
    Y = rng.integers(0, O, size=(T, B)).astype(np.int64)
    return model, X, Y


#: How ``make_lengths`` draws the lengths: "full" (every sequence T long) or "uniform".
LENGTHS = ("full", "uniform")


def make_lengths(T, B, kind="uniform", seed=0):
    """Sequence lengths for a batch: None for ``"full"``; for ``"uniform"``, (B,) int64 in [1, T].

    A stratified draw from the uniform distribution on 1..T: [0, T) is cut into B equal
    bins, one length is drawn in each (floor of a uniform point, plus one) and the lengths
    are shuffled, so that every batch, even a small one, has a mean length close to
    (T + 1) / 2 (independent draws give 0.65·T or 0.35·T at B = 8 often enough to move a
    benchmark's ratios). The longest is then set to T: the batch is really T long (padded
    PyTorch and ``fastbptt-full`` run T steps, not fewer).
    """
    if kind not in LENGTHS:
        raise ValueError(f"unknown lengths {kind!r}; choose from {', '.join(LENGTHS)}")
    if kind == "full":
        return None
    rng = np.random.default_rng(seed + 1)
    edges = np.linspace(0.0, T, B + 1)
    points = edges[:-1] + rng.random(B) * (edges[1:] - edges[:-1])
    lengths = np.minimum(np.floor(points).astype(np.int64) + 1, T)[rng.permutation(B)]
    lengths[np.argmax(lengths)] = T
    return lengths


def zero_padding(X, Y, lengths):
    """Copies of X (T, B, D) and Y (T, B) with zeros past each sequence's end, as a padding helper makes them."""
    X, Y = np.array(X), np.array(Y)
    if lengths is not None:
        pad = np.arange(X.shape[0])[:, None] >= np.asarray(lengths)[None, :]
        X[pad] = 0
        Y[pad] = 0
    return X, Y


def _check_lengths(lengths, T, B):
    """``lengths`` as (B,) int64 in [1, T], or None."""
    if lengths is None:
        return None
    lengths = np.asarray(lengths)
    if lengths.shape != (B,) or lengths.dtype.kind not in "iu" or lengths.min() < 1 or lengths.max() > T:
        raise ValueError(f"lengths must be (B,) = ({B},) integers in [1, T={T}], got {lengths!r}")
    return lengths.astype(np.int64)


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


def make_fastbptt_step(model, X, Y, parallel=False, lengths=None, **options):
    """fastbptt.loss_and_grad with a workspace made here; ``options`` go to loss_and_grad.

    ``lengths`` (B,) is passed on when given (without it the call is the one a one-layer
    fastbptt without lengths also takes).
    """
    X, Y = _check_dense(model, X, Y)
    T, B, _ = X.shape
    lengths = _check_lengths(lengths, T, B)
    if lengths is not None:
        options["lengths"] = lengths
    ws = Workspace(model, T, B)

    def step():
        loss, grads, _ = loss_and_grad(model, X, Y, workspace=ws, parallel=parallel, **options)
        return float(loss), grads

    return step


def make_fastbptt_full_step(model, X, Y, lengths=None, **options):
    """``make_fastbptt_step`` on every sequence's T steps: ``lengths`` is ignored (the full-length time)."""
    return make_fastbptt_step(model, X, Y, **options)


def make_reference_step(model, X, Y, dtype=None, lengths=None):
    """The plain NumPy reference on copies of the weights, in ``dtype`` (default the model's).

    ``fastbptt.reference.loss_and_grad`` for the Elman cell,
    ``fastbptt.reference_cells.loss_and_grad`` for the GRU and the LSTM (which always
    have biases: a model without them gets zero biases there, whose gradients are dropped);
    for a stack or with ``lengths``, ``fastbptt.core.reference_layers.loss_and_grad``
    (every sequence run alone, in Python loops: slow).
    """
    X, Y = _check_dense(model, X, Y)
    dtype = model.dtype if dtype is None else np.dtype(dtype)
    params = {name: np.array(p, dtype=dtype) for name, p in model.params.items()}
    X = X.astype(dtype, copy=False)
    cell, activation = model.cell, model.activation
    lengths = _check_lengths(lengths, *X.shape[:2])
    layers = getattr(model, "num_layers", 1)
    if layers > 1 or lengths is not None:
        from ..core import reference_layers

        def stacked():
            loss, grads, _, _, _ = reference_layers.loss_and_grad(
                params, X, Y, cell=cell, num_layers=layers, lengths=lengths,
                activation=activation if cell == "rnn" else "tanh")
            return float(loss), {name: grads[name] for name in params}

        return stacked
    if cell != "rnn" and not model.bias:
        GH = model.params["W_hh"].shape[0]
        params.update(b_ih=np.zeros(GH, dtype), b_hh=np.zeros(GH, dtype), b_q=np.zeros(model.output_size, dtype))
    names = list(model.params)

    def step():
        if cell == "rnn":
            loss, grads, _, _, _ = reference.loss_and_grad(params, X, Y, None, activation, "cross_entropy")
        else:
            loss, grads, _, _, _ = reference_cells.loss_and_grad(params, X, Y, None, cell, "cross_entropy")
        return float(loss), {name: grads[name] for name in names}

    return step


# ----------------------------------------------------------------------------- PyTorch


def torch_weights(model):
    """What ``make_torch_step`` copies into PyTorch: ``{module: {torch name: (fastbptt name, array)}}``.

    ``module`` is ``"rnn"`` (the ``torch.nn.RNN`` / ``GRU`` / ``LSTM``) or ``"readout"``
    (the ``nn.Linear``). The gated cells copy one to one (``weight_ih_l0`` = W_ih,
    ``weight_hh_l0`` = W_hh, ``bias_ih_l0`` = b_ih, ``bias_hh_l0`` = b_hh: the same
    layout). The Elman cell's single bias b_h goes to ``bias_ih_l0`` and
    ``bias_hh_l0`` = 0 (nn.RNN has two biases whose sum is b_h; the gradient of
    ``bias_hh_l0``, equal to that of ``bias_ih_l0``, is computed and not returned:
    its fastbptt name is None). The arrays are copies. A stack of L layers copies each
    layer k the same way (``weight_ih_l{k}`` = W_ih_l{k}, ...; ``model.layer_names(k, 0)``).
    """
    p = {name: np.array(value) for name, value in model.params.items()}
    rnn = {}
    for k in range(getattr(model, "num_layers", 1)):
        names = _layer_names(model, k)
        rnn[f"weight_ih_l{k}"] = (names["W_ih"], p[names["W_ih"]])
        rnn[f"weight_hh_l{k}"] = (names["W_hh"], p[names["W_hh"]])
        if not model.bias:
            continue
        if model.cell == "rnn":
            b = names["b_hh"]                       # the Elman cell's one bias, b_h
            rnn[f"bias_ih_l{k}"] = (b, p[b])
            rnn[f"bias_hh_l{k}"] = (None, np.zeros_like(p[b]))
        else:
            rnn[f"bias_ih_l{k}"] = (names["b_ih"], p[names["b_ih"]])
            rnn[f"bias_hh_l{k}"] = (names["b_hh"], p[names["b_hh"]])
    readout = {"weight": ("W_qh", p["W_qh"])}
    if model.bias:
        readout["bias"] = ("b_q", p["b_q"])
    return {"rnn": rnn, "readout": readout}


def _layer_names(model, k):
    """Layer k's (forward direction's) parameter names: ``model.layer_names`` or, in a fastbptt
    without stacks, the one layer's plain names."""
    if hasattr(model, "layer_names"):
        return model.layer_names(k, 0)
    if model.cell == "rnn":
        return {"W_ih": "W_hx", "W_hh": "W_hh", "b_ih": None, "b_hh": "b_h" if model.bias else None}
    bias = model.bias
    return {"W_ih": "W_ih", "W_hh": "W_hh", "b_ih": "b_ih" if bias else None, "b_hh": "b_hh" if bias else None}


def make_torch_step(model, X, Y, threads=None, lengths=None, mode="full"):
    """PyTorch's layer (seq-first) + ``nn.Linear`` + ``F.cross_entropy`` on the flattened logits.

    The layer is ``torch.nn.RNN`` for the Elman cell, ``torch.nn.GRU`` or
    ``torch.nn.LSTM`` for the gated ones, with ``num_layers`` = the model's and the
    weights of ``model`` copied as ``torch_weights`` says. Each call sets the gradients
    to None, then runs forward (from a zero state), loss and ``backward()``, as a training
    loop with ``zero_grad(set_to_none=True)`` does. ``threads`` (default: every core this
    process may use) goes to ``torch.set_num_threads``, which is global to the process.

    ``mode`` says what is done with ``lengths`` (B,) (every sequence T long when None):

    - ``"full"``: no lengths (refused when given); the loss is the mean over all T·B positions.
    - ``"packed"``: each call packs X and Y with ``pack_padded_sequence(...,
      enforce_sorted=False)`` (as a training loop does for each batch), runs the layer on
      the packed X, the readout on its packed output (the Σ lengths valid positions) and
      the cross-entropy against the packed Y.
    - ``"padded"``: the layer and readout run over every position of the padded batch and
      the per-position cross-entropy is masked to the valid positions: Σ mask·ℓ / Σ mask.

    All three compute fastbptt's loss for the same lengths (the states past a sequence's
    end in the padded run reach no valid position: the layers run forward in time).
    """
    import torch
    import torch.nn.functional as F

    if mode not in ("full", "packed", "padded"):
        raise ValueError(f"unknown mode {mode!r}; choose from full, packed, padded")
    why = unsupported("torch", model.activation, model.cell)
    if why:
        raise ValueError(f"torch.nn.RNN has no activation {model.activation!r} (only tanh and relu)")
    X, Y = _check_dense(model, X, Y)
    T, B, D = X.shape
    lengths = _check_lengths(lengths, T, B)
    if mode == "full" and lengths is not None:
        raise ValueError("plain torch runs every sequence to T: time torch-packed or torch-padded with lengths")
    if lengths is None:
        lengths = np.full(B, T, np.int64)
    torch.set_num_threads(default_threads() if threads is None else int(threads))
    tdtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[model.dtype]
    H, L = model.hidden_size, getattr(model, "num_layers", 1)
    if model.cell == "rnn":
        rnn = torch.nn.RNN(D, H, num_layers=L, nonlinearity=model.activation, bias=model.bias,
                           batch_first=False)
    else:
        layer = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[model.cell]
        rnn = layer(D, H, num_layers=L, bias=model.bias, batch_first=False)
    rnn = rnn.to(tdtype)
    readout = torch.nn.Linear(H, model.output_size, bias=model.bias).to(tdtype)
    named, weights = {}, torch_weights(model)
    with torch.no_grad():
        for module, copies in ((rnn, weights["rnn"]), (readout, weights["readout"])):
            for attr, (name, value) in copies.items():
                q = getattr(module, attr)
                if tuple(q.shape) != value.shape:
                    raise ValueError(f"cannot copy {name} {value.shape} into {attr} {tuple(q.shape)}")
                q.copy_(torch.from_numpy(value))
                if name is not None:
                    named[name] = q
    params = list(rnn.parameters()) + list(readout.parameters())
    x = torch.from_numpy(X)
    y = torch.from_numpy(Y.reshape(T * B))
    O = model.output_size
    pack = torch.nn.utils.rnn.pack_padded_sequence
    lens = torch.from_numpy(lengths)
    y_tb = torch.from_numpy(Y)
    mask = torch.from_numpy((np.arange(T)[:, None] < lengths[None, :]).reshape(T * B).astype(model.dtype))
    count = float(lengths.sum())

    def loss_of():
        if mode == "packed":
            out, _ = rnn(pack(x, lens, enforce_sorted=False))   # zero initial state
            return F.cross_entropy(readout(out.data), pack(y_tb, lens, enforce_sorted=False).data)
        hs, _ = rnn(x)                                   # (T, B, H), zero initial state
        logits = readout(hs).reshape(T * B, O)
        if mode == "full":
            return F.cross_entropy(logits, y)
        return (F.cross_entropy(logits, y, reduction="none") * mask).sum() / count

    def step():
        for q in params:
            q.grad = None
        loss = loss_of()
        loss.backward()
        return loss.item(), {name: q.grad.numpy() for name, q in named.items()}

    return step


def make_torch_packed_step(model, X, Y, lengths=None, **options):
    """``make_torch_step`` on packed sequences (``mode="packed"``)."""
    return make_torch_step(model, X, Y, lengths=lengths, mode="packed", **options)


def make_torch_padded_step(model, X, Y, lengths=None, **options):
    """``make_torch_step`` on the padded batch with the loss masked (``mode="padded"``)."""
    return make_torch_step(model, X, Y, lengths=lengths, mode="padded", **options)


# ----------------------------------------------------------------------------- JAX


def make_jax_step(model, X, Y, lengths=None):
    """``jax.jit(jax.value_and_grad(loss))`` with the recurrence in ``jax.lax.scan``.

    The input projection X W_ihᵀ + b_ih (X W_hxᵀ + b_h for the Elman cell) of all T·B
    positions is one matrix product before the scan and the readout one after it (as
    a careful JAX user writes it); the scan carries the state and does one product
    h_{t-1} W_hhᵀ per step, then the cell's pointwise math in PyTorch's formulation::

        rnn    h = φ(xw + h W_hhᵀ)
        gru    a = h W_hhᵀ + b_hh;  r, z = σ(xw_r + a_r), σ(xw_z + a_z);
               n = tanh(xw_n + r ⊙ a_n);  h = (1 − z) ⊙ n + z ⊙ h
        lstm   a = xw + h W_hhᵀ + b_hh;  i, f, g, o = σ, σ, tanh, σ of its four blocks;
               c = f ⊙ c + i ⊙ g;  h = o ⊙ tanh(c)

    The loss is the mean of ``-log_softmax`` at the targets. The function is traced and
    compiled on the first call of the returned step (call it once before timing).
    float64 models switch on ``jax_enable_x64``, which is global to the process. Each
    call blocks until the results are ready.
    """
    why = unsupported("jax", model.activation, model.cell, getattr(model, "num_layers", 1), lengths is not None)
    if why:
        raise ValueError(f"{why}: time it against fastbptt and PyTorch")
    import jax
    import jax.numpy as jnp

    X, Y = _check_dense(model, X, Y)
    if model.dtype == np.float64 and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    T, B, D = X.shape
    H = model.hidden_size
    bias, dtype, cell = model.bias, model.dtype, model.cell
    w_in, b_in = ("W_hx", "b_h") if cell == "rnn" else ("W_ih", "b_ih")
    GH = model.params[w_in].shape[0]
    sigmoid = jax.nn.sigmoid

    if cell == "rnn":
        phi = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}[model.activation]

        def make_cell(params):
            def step(h, xw_t):
                h = phi(xw_t + h @ params["W_hh"].T)
                return h, h
            return step, jnp.zeros((B, H), dtype)
    elif cell == "gru":
        def make_cell(params):
            def step(h, xw_t):
                a = h @ params["W_hh"].T
                if bias:
                    a = a + params["b_hh"]
                r = sigmoid(xw_t[:, :H] + a[:, :H])
                z = sigmoid(xw_t[:, H:2 * H] + a[:, H:2 * H])
                n = jnp.tanh(xw_t[:, 2 * H:] + r * a[:, 2 * H:])
                h = (1 - z) * n + z * h
                return h, h
            return step, jnp.zeros((B, H), dtype)
    else:
        def make_cell(params):
            def step(state, xw_t):
                h, c = state
                a = xw_t + h @ params["W_hh"].T
                if bias:
                    a = a + params["b_hh"]
                i, f = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H])
                g, o = jnp.tanh(a[:, 2 * H:3 * H]), sigmoid(a[:, 3 * H:])
                c = f * c + i * g
                h = o * jnp.tanh(c)
                return (h, c), h
            zeros = jnp.zeros((B, H), dtype)
            return step, (zeros, zeros)

    def loss_fn(params, x, y):
        xw = (x.reshape(T * B, D) @ params[w_in].T).reshape(T, B, GH)
        if bias:
            xw = xw + params[b_in]
        step, state0 = make_cell(params)
        _, hs = jax.lax.scan(step, state0, xw)
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
          "fastbptt-full": make_fastbptt_full_step, "reference": make_reference_step,
          "torch": make_torch_step, "torch-packed": make_torch_packed_step,
          "torch-padded": make_torch_padded_step, "jax": make_jax_step}


def make_step(name, model, X, Y, lengths=None, **options):
    """The step of implementation ``name``: one of ``IMPLEMENTATIONS``, or ``"fastbptt:METHOD"``.

    ``lengths`` (B,), when given, goes to the step (``fastbptt-full`` ignores it, plain
    ``torch`` and ``jax`` refuse it).
    """
    base, extra = parse_name(name)
    if base not in MAKERS:
        raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS}")
    if lengths is not None:
        options["lengths"] = lengths
    return MAKERS[base](model, X, Y, **extra, **options)


# ----------------------------------------------------------------------------- checking


def oracle(model, X, Y, lengths=None):
    """The reference's loss and gradients computed in float64 from the model's weights."""
    loss, grads = make_reference_step(model, X, Y, dtype=np.float64, lengths=lengths)()
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
