"""``python -m fastbptt bench-torch``: a whole PyTorch training step, ``fastbptt.torch`` against ``torch.nn``.

One step is what a PyTorch training loop runs for a batch::

    optimizer.zero_grad()                              # gradients set to None
    out, _ = rnn(x)                                    # x (T, B, D), or a PackedSequence
    logits = head(out)                                 # nn.Linear(dirs·H, O); out.data when packed
    loss = F.cross_entropy(logits.reshape(-1, O), y)   # y (T·B,), or the packed y
    loss.backward()
    optimizer.step()                                   # only with --optimizer sgd

with ``rnn`` a ``torch.nn.RNN``/``GRU``/``LSTM`` in one column and the ``fastbptt.torch``
class of the same name in the other, loaded with the same ``state_dict``; the heads are
copies of one ``nn.Linear`` and the batch is the same. Packed rows pack x and y with
``pack_padded_sequence(..., enforce_sorted=False)`` inside every step (as a training loop
does for each batch), from lengths drawn uniformly in 1..T (``compare.make_lengths``).

Each row first runs both steps once and compares the losses and every gradient (the
check, which also compiles), then times them in turn: after each step's calibration (how
many calls make a round last ``min_time``), round r of one, round r of the other, the
order swapped every round, a short pause before each round; the row's figure for each is
the median of its rounds, and × is torch.nn's median over fastbptt.torch's.

The per-call overhead rows time, at tiny sizes (B = 1, H = 8), the module's forward and
``out.backward(dout)`` alone, and the same work through fastbptt's core
(``layer_forward`` + ``layer_backward`` on the same arrays, workspace made once): the
difference is what the bridge adds per call (autograd node, tensor wrapping, checks).

Needs PyTorch and ``fastbptt.torch``; ``import fastbptt.benchmarking.torch_step`` alone
needs NumPy only.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from .profile import _cells          # --cell, parsed as `profile` parses it
from .._paths import check_output_path
from .._progress import Progress, compiling
from ._load import DEFAULT_THRESHOLD, Load, LoadMonitor, describe, total
from .timing import calibrate, positive_ints

CELLS = ("rnn", "gru", "lstm")
CLASS_NAMES = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}

#: B·H at or below which a step is latency-bound: per-step overhead, not the products, sets its time.
LATENCY_BOUND = 2048

#: The speed each kind of row should reach, torch.nn's time over fastbptt.torch's.
GOALS = {"packed": 5.0, "latency-bound": 2.0, "larger": 1.0}

#: The per-call overhead fastbptt.torch should add to fastbptt's core call, in µs.
OVERHEAD_GOAL_US = 30.0

#: The variables that force OpenBLAS's kernels; figures to publish are taken without them.
FORCING = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
README_COMMAND = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m fastbptt bench-torch"

IMPLS = ("torch.nn", "fastbptt.torch")


@dataclass(frozen=True)
class Case:
    """One row: a cell, a shape, a stack, and full lengths or packed sequences (float32 unless said).

    ``D`` is the input size, ``O`` the number of classes of the head.
    """

    cell: str
    T: int
    B: int
    H: int
    D: int = 32
    O: int = 32
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    dtype: str = "float32"

    @property
    def latency_bound(self):
        return self.B * self.H <= LATENCY_BOUND

    @property
    def kind(self):
        """"packed", "latency-bound" or "larger": which goal of ``GOALS`` the row is held to."""
        return "packed" if self.packed else "latency-bound" if self.latency_bound else "larger"

    @property
    def goal(self):
        return GOALS[self.kind]

    @property
    def label(self):
        return (f"{self.cell} T={self.T} B={self.B} D={self.D} H={self.H} O={self.O} L={self.layers}"
                + (" bidirectional" if self.bidirectional else "") + (" packed" if self.packed else "")
                + ("" if self.dtype == "float32" else f" {self.dtype}"))


def _every_cell(shapes, **kw):
    """Each (T, B, H, layers) of ``shapes`` in every cell."""
    return [Case(cell, T, B, H, layers=L, **kw) for (T, B, H, L) in shapes for cell in CELLS]


#: Latency-bound steps (B·H <= 2048): B in 1, 8, 32 × H in 32, 64, T = 100, 1 and 2 layers.
LATENCY = _every_cell([(100, B, H, L) for B in (1, 8, 32) for H in (32, 64) for L in (1, 2)])
#: Larger steps: B = 64, H = 256 (1 and 2 layers) and B = 128, H = 512, T = 50.
LARGE = _every_cell([(50, 64, 256, 1), (50, 64, 256, 2), (50, 128, 512, 1)])
#: Bidirectional stacks: T = 100, B = 8, H = 64, 1 and 2 layers.
BIDIRECTIONAL = _every_cell([(100, 8, 64, 1), (100, 8, 64, 2)], bidirectional=True)
#: Packed sequences, lengths uniform in 1..T: small and mid batches, a stack, a larger step, bidirectional.
PACKED = (_every_cell([(100, 8, 64, 1), (100, 32, 64, 1), (100, 32, 64, 2), (50, 64, 256, 1)], packed=True)
          + _every_cell([(100, 8, 64, 1)], packed=True, bidirectional=True))
#: Seconds: one shape per cell and kind, tiny.
QUICK = [Case("rnn", 5, 2, 8, D=4, O=3), Case("gru", 5, 3, 8, D=4, O=3, packed=True),
         Case("lstm", 5, 2, 8, D=4, O=3, layers=2, bidirectional=True, packed=True)]

SETS = {"latency": LATENCY, "large": LARGE, "bidirectional": BIDIRECTIONAL, "packed": PACKED, "quick": QUICK}
SET_TEXT = {"latency": "B in 1,8,32 x H in 32,64, T=100, 1 and 2 layers, each cell (36 rows)",
            "large": "T=50: B=64,H=256 at 1 and 2 layers; B=128,H=512 (9 rows, the slowest)",
            "bidirectional": "T=100, B=8, H=64, bidirectional, 1 and 2 layers (6 rows)",
            "packed": "lengths uniform in 1..T: T=100, H=64, B=8 and 32 (B=32 also at 2 layers,\n"
                      "                 B=8 also bidirectional); T=50, B=64, H=256 (15 rows)",
            "quick": "three tiny rows (seconds; a smoke test)"}
DEFAULT_SETS = ("latency", "large", "bidirectional", "packed")

#: Sequence lengths of the overhead rows (B = 1, H = 8, D = 8).
OVERHEAD_T = (1, 2, 5)


# ----------------------------------------------------------------------------- set-up


def torch_available():
    """Whether PyTorch and ``fastbptt.torch`` can be imported (without importing them)."""
    return importlib.util.find_spec("torch") is not None


def _classes(cell):
    """(torch.nn class, fastbptt.torch class) of ``cell``."""
    import torch

    import fastbptt.torch as bridge
    name = CLASS_NAMES[cell]
    return getattr(torch.nn, name), getattr(bridge, name)


def make_modules(case, seed=0, options=None):
    """(torch.nn module, fastbptt.torch module, head, head copy): the same weights in both.

    The torch.nn module is made under ``torch.manual_seed(seed)`` (PyTorch's initialization)
    and its ``state_dict`` loaded into the fastbptt.torch one; ``options`` (``method``,
    ``parallel``) go to fastbptt.torch's constructor. The head is ``nn.Linear(dirs·H, O)``.
    """
    import torch

    dtype = getattr(torch, case.dtype)
    ref_cls, fast_cls = _classes(case.cell)
    torch.manual_seed(seed)
    kw = dict(num_layers=case.layers, bidirectional=case.bidirectional, dtype=dtype)
    ref = ref_cls(case.D, case.H, **kw)
    fast = fast_cls(case.D, case.H, **kw, **(options or {}))
    fast.load_state_dict(ref.state_dict())
    head = torch.nn.Linear((2 if case.bidirectional else 1) * case.H, case.O, dtype=dtype)
    return ref, fast, head, copy.deepcopy(head)


def make_batch(case, seed=0):
    """(x (T, B, D), y (T, B) int64, lengths (B,) int64 or None) as tensors; padding zeroed."""
    import torch

    from .compare import make_lengths
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.T, case.B, case.D)).astype(case.dtype)
    y = rng.integers(0, case.O, size=(case.T, case.B)).astype(np.int64)
    lengths = make_lengths(case.T, case.B, "uniform", seed=seed) if case.packed else None
    if lengths is not None:
        pad = np.arange(case.T)[:, None] >= lengths[None, :]
        x[pad], y[pad] = 0, 0
    return (torch.from_numpy(x), torch.from_numpy(y),
            None if lengths is None else torch.from_numpy(lengths))


def make_step(module, head, x, y, lengths=None, optimizer="none", lr=1e-3):
    """One training step of ``module`` + ``head`` + cross-entropy on the batch, as a callable.

    Each call sets every gradient to None (``optimizer.zero_grad()``), runs forward, the
    loss and ``backward()``, and with ``optimizer="sgd"`` also ``torch.optim.SGD.step()``
    (lr ``lr``). It returns the loss (a tensor). With ``lengths`` (a tensor (B,)) x and y
    are packed in every call (``enforce_sorted=False``) and the head reads the packed output.
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pack_padded_sequence as pack

    if optimizer not in ("none", "sgd"):
        raise ValueError(f"optimizer must be 'none' or 'sgd', got {optimizer!r}")
    opt = torch.optim.SGD(list(module.parameters()) + list(head.parameters()), lr=lr)
    update = optimizer == "sgd"
    flat_y = y.reshape(-1)

    if lengths is None:
        def loss_of():
            out, _ = module(x)
            return F.cross_entropy(head(out).reshape(flat_y.shape[0], -1), flat_y)
    else:
        def loss_of():
            out, _ = module(pack(x, lengths, enforce_sorted=False))
            return F.cross_entropy(head(out.data), pack(y, lengths, enforce_sorted=False).data)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        if update:
            opt.step()
        return loss

    return step


def _grads(module, head):
    out = {f"rnn.{n}": p.grad for n, p in module.named_parameters()}
    out.update({f"head.{n}": p.grad for n, p in head.named_parameters()})
    return out


def check_same(ref_step, fast_step, parts, dtype="float32"):
    """Run each step once (no optimizer step) and compare the losses and every gradient.

    ``parts`` is ``(ref, fast, ref_head, fast_head)`` of ``make_modules``. The error of a
    gradient is max |g − g_ref| over max(max |g_ref|, 1e-3); the tolerance 1e-4 (float32),
    1e-10 (float64) of the benchmarks' check against their float64 oracle.
    """
    ref, fast, ref_head, fast_head = parts
    ref_loss = float(ref_step().detach())
    start = time.perf_counter()
    fast_loss = float(fast_step().detach())
    first = time.perf_counter() - start
    want, got = _grads(ref, ref_head), _grads(fast, fast_head)
    errors = {}
    for name, g_ref in want.items():
        g = got[name]
        if g is None or g_ref is None or tuple(g.shape) != tuple(g_ref.shape):
            errors[name] = float("inf")
            continue
        g_ref = g_ref.detach().double()
        errors[name] = float((g.detach().double() - g_ref).abs().max()) / max(float(g_ref.abs().max()), 1e-3)
    worst = max(errors, key=errors.get)
    tol = 1e-10 if dtype == "float64" else 1e-4
    loss_error = abs(fast_loss - ref_loss) / max(abs(ref_loss), 1e-3)
    return {"loss": ref_loss, "loss_error": loss_error, "max_grad_error": errors[worst], "worst": worst,
            "tolerance": tol, "ok": bool(loss_error <= tol and errors[worst] <= tol),
            "first_call_ms": first * 1e3}


def grad_fn_names(parts, x, lengths):
    """The autograd node that made each module's output (``type(out.grad_fn).__name__``).

    Tells that fastbptt.torch ran its own node and did not fall back to PyTorch's
    implementation (which would make the row a comparison of PyTorch with itself).
    """
    from torch.nn.utils.rnn import pack_padded_sequence as pack

    names = []
    for module in parts[:2]:
        out, _ = module(x if lengths is None else pack(x, lengths, enforce_sorted=False))
        out = out if lengths is None else out.data
        names.append(type(out.grad_fn).__name__ if out.grad_fn is not None else None)
    return names


# ----------------------------------------------------------------------------- timing


def interleaved_rounds(fns, rounds=7, min_time=0.05, pause=0.05):
    """Seconds per call of each function in ``rounds`` rounds taken in turn.

    Each function is first calibrated (``timing.calibrate``: one untimed call, then 1, 2,
    4, ... calls until a round lasts ``min_time``; those rounds are not kept). Then round r
    of every function runs, in ``fns``' order on even rounds and the reverse on odd ones,
    so that neither always follows the other; ``pause`` seconds of sleep before each round
    let the thread pools of the one before go idle.

    Parameters
    ----------
    fns : dict
        name -> callable with no arguments.

    Returns
    -------
    dict name -> {"rounds": [seconds per call, ...], "calls": calls per round}
    """
    plan = {}
    for name, fn in fns.items():
        time.sleep(pause)
        calls, _, _ = calibrate(fn, min_time, warmup=1)
        plan[name] = (fn, calls, [])
    names = list(plan)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, calls, out = plan[name]
            time.sleep(pause)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - start) / calls)
    return {name: {"rounds": out, "calls": calls} for name, (_, calls, out) in plan.items()}


def _summary(rounds):
    return {"median_ms": 1e3 * statistics.median(rounds), "best_ms": 1e3 * min(rounds),
            "rounds_ms": [1e3 * r for r in rounds]}


def run_case(case, rounds=7, min_time=0.05, pause=0.05, optimizer="none", options=None, monitor=None,
             threshold=DEFAULT_THRESHOLD, breakdown=False, seed=0):
    """Check and time one row: torch.nn's step and fastbptt.torch's, in turn.

    Returns
    -------
    dict with the case's fields, ``kind``, ``goal``, ``B_H``; ``check`` (``check_same``);
    ``grad_fn`` (each output's autograd node); ``impls``: {"torch.nn": {...}, "fastbptt.torch":
    {...}} each with ``median_ms``, ``best_ms``, ``rounds_ms``, ``calls``; ``ratio`` (torch.nn's
    median / fastbptt.torch's), ``paired_ratio`` (median over rounds of the two rounds'
    ratio), ``met`` (ratio >= goal); ``load`` and ``disturbed`` when the load is measured;
    with ``breakdown``, ``head_ms`` (the head and loss alone, forward and backward, on a
    fixed output: the part of the step both columns share). On failure ``error`` (text).
    """
    row = dict(asdict(case), kind=case.kind, goal=case.goal, B_H=case.B * case.H)
    start = monitor.sample() if monitor else None
    try:
        parts = make_modules(case, seed, options)
        x, y, lengths = make_batch(case, seed)
        if lengths is not None:
            row["positions"] = int(lengths.sum())
        steps = {"torch.nn": make_step(parts[0], parts[2], x, y, lengths, optimizer),
                 "fastbptt.torch": make_step(parts[1], parts[3], x, y, lengths, optimizer)}
        row["check"] = check_same(make_step(parts[0], parts[2], x, y, lengths),
                                  make_step(parts[1], parts[3], x, y, lengths), parts, case.dtype)
        row["grad_fn"] = dict(zip(IMPLS, grad_fn_names(parts, x, lengths)))
        fns = dict(steps)
        if breakdown:
            fns["head"] = _head_step(case, parts[2], x, y, lengths)
        timed = interleaved_rounds(fns, rounds, min_time, pause)
    except Exception as exc:  # noqa: BLE001 -- reported in the row, the run goes on
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    row["impls"] = {name: dict(_summary(timed[name]["rounds"]), calls=timed[name]["calls"]) for name in IMPLS}
    ref, fast = (row["impls"][n] for n in IMPLS)
    row["ratio"] = ref["median_ms"] / fast["median_ms"]
    row["paired_ratio"] = statistics.median(a / b for a, b in zip(timed["torch.nn"]["rounds"],
                                                                  timed["fastbptt.torch"]["rounds"]))
    row["met"] = bool(row["ratio"] >= case.goal)
    if breakdown:
        row["head_ms"] = _summary(timed["head"]["rounds"])["median_ms"]
    load = monitor.since(start) if monitor else None
    if load is not None:
        row["load"] = load.as_dict(threshold)
        row["disturbed"] = load.disturbed(threshold)
    return row


def _head_step(case, head, x, y, lengths):
    """The head and the loss alone, forward and backward, on a fixed recurrent output."""
    import torch
    import torch.nn.functional as F

    head = copy.deepcopy(head)
    dirs = 2 if case.bidirectional else 1
    n = int(lengths.sum()) if lengths is not None else case.T * case.B
    out = torch.randn(n, dirs * case.H, dtype=head.weight.dtype, requires_grad=True)
    target = torch.randint(0, case.O, (n,))

    def step():
        out.grad = None
        for p in head.parameters():
            p.grad = None
        F.cross_entropy(head(out), target).backward()

    return step


# ----------------------------------------------------------------------------- overhead


def core_model_from(module, cell, dtype):
    """A fastbptt core model (output size 1) with the recurrent weights of a torch module.

    The Elman cell's one bias is torch's ``bias_ih + bias_hh``.
    """
    import fastbptt

    layers, dirs = module.num_layers, 2 if module.bidirectional else 1
    cls = {"rnn": fastbptt.RNN, "gru": fastbptt.GRU, "lstm": fastbptt.LSTM}[cell]
    kw = {"activation": module.nonlinearity} if cell == "rnn" else {}
    model = cls(module.input_size, module.hidden_size, 1, dtype=np.dtype(dtype), num_layers=layers,
                bidirectional=module.bidirectional, **kw)
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    for k in range(layers):
        for d in range(dirs):
            names, sfx = model.layer_names(k, d), f"l{k}" + ("_reverse" if d else "")
            model.params[names["W_ih"]][...] = state[f"weight_ih_{sfx}"]
            model.params[names["W_hh"]][...] = state[f"weight_hh_{sfx}"]
            if names["b_ih"] is None:
                model.params[names["b_hh"]][...] = state[f"bias_ih_{sfx}"] + state[f"bias_hh_{sfx}"]
            else:
                model.params[names["b_ih"]][...] = state[f"bias_ih_{sfx}"]
                model.params[names["b_hh"]][...] = state[f"bias_hh_{sfx}"]
    return model


def run_overhead(cell, T, B=1, H=8, D=8, rounds=7, min_time=0.05, pause=0.05, options=None, seed=0,
                 monitor=None, threshold=DEFAULT_THRESHOLD):
    """Per-call overhead of fastbptt.torch at a tiny size: its forward + backward minus the core's.

    Three functions are timed in turn: fastbptt.torch's ``out, _ = m(x); out.backward(dout)``
    (parameters' gradients set to None first; x needs no gradient), fastbptt's
    ``layer_forward`` + ``layer_backward(return_dX=False)`` on the same arrays with a
    workspace made once, and the same as the first with torch.nn's module.

    Returns
    -------
    dict with ``cell``, ``T``, ``B``, ``H``, ``D``; ``impls`` {"fastbptt.torch", "core",
    "torch.nn"} each with ``median_ms``, ...; ``overhead_us`` (fastbptt.torch's median minus
    the core's, in µs), ``goal_us``, ``met``; or ``error``.
    """
    import torch

    import fastbptt

    row = {"cell": cell, "T": T, "B": B, "H": H, "D": D, "goal_us": OVERHEAD_GOAL_US}
    start = monitor.sample() if monitor else None
    try:
        case = Case(cell, T, B, H, D=D, O=1)
        ref, fast, _, _ = make_modules(case, seed, options)
        model = core_model_from(ref, cell, "float32")
        ws = fastbptt.Workspace(model, T, B)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(T, B, D, generator=g)
        dout = torch.randn(T, B, H, generator=g)
        X, dH = x.numpy(), dout.numpy()

        def module_fn(m):
            params = list(m.parameters())

            def fn():
                for p in params:
                    p.grad = None
                out, _ = m(x)
                out.backward(dout)
            return fn

        def core():
            fastbptt.layer_forward(model, X, workspace=ws)
            fastbptt.layer_backward(model, dH, workspace=ws, return_dX=False)

        fns = {"fastbptt.torch": module_fn(fast), "core": core, "torch.nn": module_fn(ref)}
        for fn in fns.values():
            fn()                                     # compiles
        timed = interleaved_rounds(fns, rounds, min_time, pause)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    row["impls"] = {name: dict(_summary(t["rounds"]), calls=t["calls"]) for name, t in timed.items()}
    row["overhead_us"] = 1e3 * (row["impls"]["fastbptt.torch"]["median_ms"] - row["impls"]["core"]["median_ms"])
    row["met"] = bool(row["overhead_us"] < OVERHEAD_GOAL_US)
    load = monitor.since(start) if monitor else None
    if load is not None:
        row["load"] = load.as_dict(threshold)
        row["disturbed"] = load.disturbed(threshold)
    return row


# ----------------------------------------------------------------------------- machine


def torch_backends():
    """PyTorch's version, threads and math libraries (MKL, oneDNN) as its build reports them."""
    import torch

    info = {"version": torch.__version__, "threads": torch.get_num_threads(),
            "mkl": None, "onednn": None}
    try:
        text = torch.__config__.parallel_info()
    except Exception:  # noqa: BLE001 -- an unusual build: leave them unknown
        text = ""
    m = re.search(r"Math Kernel Library Version ([\w.]+)", text)
    if m:
        info["mkl"] = m.group(1)
    elif torch.backends.mkl.is_available():
        info["mkl"] = "yes"
    m = re.search(r"(?:MKL-DNN|oneDNN) (v[\w.]+)", text)
    if m:
        info["onednn"] = m.group(1)
    elif torch.backends.mkldnn.is_available():
        info["onednn"] = "yes"
    return info


def machine_info(environ=None):
    """``benchmark.machine_info`` with PyTorch's math libraries and the OpenBLAS-forcing variables."""
    from .benchmark import machine_info as base

    environ = os.environ if environ is None else environ
    info = base(["torch"], environ)
    info["torch"] = torch_backends()
    info["torch_threads"] = info["torch"]["threads"]
    info["openblas_forcing"] = {name: environ.get(name) for name in FORCING}
    return info


def header_lines(info):
    """The header: machine, versions, BLAS kernels, PyTorch's libraries, the forcing variables."""
    from .benchmark import header_lines as base

    lines = base(info, what="bench-torch")
    t = info["torch"]
    lines.append(f"PyTorch {t['version']} on {t['threads']} threads, its own math libraries: "
                 f"MKL {t['mkl'] or 'not found'}, oneDNN {t['onednn'] or 'not found'}")
    forced = [f"{k}={v}" for k, v in info["openblas_forcing"].items() if v is not None]
    if forced:
        lines.append(f"warning: {' and '.join(forced)} set: OpenBLAS runs the kernels they force, not the ones "
                     f"it picks for this CPU; for figures to publish run '{README_COMMAND}'")
    else:
        lines.append("OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are not set: OpenBLAS runs the kernels it picks "
                     "for this CPU")
    return lines


# ----------------------------------------------------------------------------- output


def _ms(x):
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _busy(row):
    load = row.get("load")
    if load is None:
        return "-"
    return f"{100 * load['others_fraction']:.0f}%" + ("*" if row.get("disturbed") else "")


def format_table(rows):
    """The step rows as a fixed-width table."""
    cols = [("cell", 4), ("T", 4), ("B", 4), ("D", 4), ("H", 4), ("O", 4), ("L", 2), ("dirs", 4),
            ("lengths", 7), ("B·H", 6), ("torch.nn ms", 11), ("fastbptt ms", 11), ("×", 6), ("goal", 5),
            ("met", 4), ("max err", 8), ("busy", 5)]
    lines = [" ".join(f"{n:>{w}}" for n, w in cols)]
    for r in rows:
        cells = [r["cell"], r["T"], r["B"], r["D"], r["H"], r["O"], r["layers"], 2 if r["bidirectional"] else 1,
                 "packed" if r["packed"] else "full", r["B_H"]]
        if "error" in r:
            cells += ["error", "error", "-", f"{r['goal']:g}×", "-", "-", _busy(r)]
        else:
            ok = r["check"]["ok"]
            cells += [_ms(r["impls"]["torch.nn"]["median_ms"]),
                      _ms(r["impls"]["fastbptt.torch"]["median_ms"]) + ("" if ok else "!"),
                      f"{r['ratio']:.2f}", f"{r['goal']:g}×", "yes" if r["met"] else "NO",
                      f"{r['check']['max_grad_error']:.1e}", _busy(r)]
        lines.append(" ".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, cols)))
    return "\n".join(lines)


def format_overhead(rows):
    """The overhead rows as a fixed-width table (µs)."""
    cols = [("cell", 4), ("T", 3), ("B", 3), ("H", 3), ("fastbptt.torch µs", 17), ("core µs", 8),
            ("overhead µs", 11), ("torch.nn µs", 11), ("met", 4), ("busy", 5)]
    lines = [" ".join(f"{n:>{w}}" for n, w in cols)]
    for r in rows:
        cells = [r["cell"], r["T"], r["B"], r["H"]]
        if "error" in r:
            cells += ["error", "-", "-", "-", "-", _busy(r)]
        else:
            us = {n: 1e3 * e["median_ms"] for n, e in r["impls"].items()}
            cells += [f"{us['fastbptt.torch']:.1f}", f"{us['core']:.1f}", f"{r['overhead_us']:.1f}",
                      f"{us['torch.nn']:.1f}", "yes" if r["met"] else "NO", _busy(r)]
        lines.append(" ".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, cols)))
    return "\n".join(lines)


def goal_lines(rows, overhead=()):
    """Lines under the tables: for each kind of row, the range of × and the rows below the goal."""
    out = []
    for kind, goal in GOALS.items():
        these = [r for r in rows if r.get("kind") == kind and "ratio" in r]
        if not these:
            continue
        ratios = [r["ratio"] for r in these]
        missed = [r for r in these if not r["met"]]
        what = {"packed": "packed sequences", "latency-bound": f"latency-bound (B·H <= {LATENCY_BOUND}), full lengths",
                "larger": f"larger (B·H > {LATENCY_BOUND}), full lengths"}[kind]
        text = (f"{what}: {min(ratios):.2f}-{max(ratios):.2f}× torch.nn, goal >= {goal:g}×: "
                f"met at {len(these) - len(missed)} of {len(these)} rows")
        if missed:
            text += "; missed at " + "; ".join(f"{r['cell']} B={r['B']} H={r['H']} L={r['layers']}"
                                               + (" bi" if r["bidirectional"] else "") + f" ({r['ratio']:.2f}×)"
                                               for r in missed)
        out.append(text)
    timed = [r for r in overhead if "overhead_us" in r]
    if timed:
        us = [r["overhead_us"] for r in timed]
        missed = [r for r in timed if not r["met"]]
        out.append(f"per-call overhead (fastbptt.torch forward + backward minus the core's layer_forward + "
                   f"layer_backward): {min(us):.1f}-{max(us):.1f} µs, goal < {OVERHEAD_GOAL_US:g} µs: met at "
                   f"{len(timed) - len(missed)} of {len(timed)} rows")
    return out


def load_lines(rows, threshold):
    """The machine's load over the rows, and a warning naming the disturbed rows' count."""
    run = total(Load.from_dict(r["load"]) for r in rows if "load" in r)
    if run is None:
        return []
    lines = [f"busy = CPU time other processes used while the row ran, as a share of all {run.cores} cores; "
             f"* = over {100 * threshold:.0f}%", f"machine load during the rows: {describe(run, threshold)}"]
    disturbed = [r for r in rows if r.get("disturbed")]
    if disturbed:
        lines.append(f"warning: {len(disturbed)} of {len(rows)} rows ran while other processes used over "
                     f"{100 * threshold:.0f}% of the machine (marked *): rerun them on a quiet machine")
    return lines


def wait_quiet(monitor, threshold=DEFAULT_THRESHOLD, max_wait=0.0, window=0.5, sleep=time.sleep):
    """Wait until other processes use at most ``threshold`` of the machine over a ``window``, or ``max_wait`` s.

    On a shared machine a row timed beside someone else's test run is slowed unevenly
    (PyTorch's OpenMP threads wait for a core at every parallel region), so a run can wait
    for a quiet spell before each row. Returns the seconds waited (0 when ``max_wait`` is 0
    or the load cannot be measured).
    """
    if max_wait <= 0 or monitor is None or not monitor.available:
        return 0.0
    start = time.perf_counter()
    while True:
        sample = monitor.sample()
        sleep(window)
        load = monitor.since(sample)
        waited = time.perf_counter() - start
        if load is None or not load.disturbed(threshold) or waited >= max_wait:
            return waited


def least_disturbed(timed_row, monitor=None, threshold=DEFAULT_THRESHOLD, wait=0.0, retries=0):
    """``timed_row()`` (a row's dict), again up to ``retries`` times while it comes out disturbed.

    Before each attempt ``wait_quiet`` waits up to ``wait`` seconds. The attempt whose
    load left the smallest share to other processes is kept, with ``waited_s`` (its wait)
    and ``attempts`` (how many were made); a row that failed is not retried.
    """
    best = None
    for attempt in range(retries + 1):
        waited = wait_quiet(monitor, threshold, wait)
        row = dict(timed_row(), waited_s=waited)
        if best is None or _others(row) < _others(best):
            best = row
        if "error" in row or not row.get("disturbed"):
            break
    best["attempts"] = attempt + 1
    return best


def _others(row):
    return row["load"]["others_fraction"] if "load" in row else 0.0


# ----------------------------------------------------------------------------- command line


def _set_names(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in SETS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"unknown set {bad or text!r}; choose from {', '.join(SETS)}")
    return values


def _shape(text):
    values = positive_ints(text)
    if len(values) != 5:
        raise argparse.ArgumentTypeError(f"expected T,B,D,H,O (five positive integers), got {text!r}")
    return tuple(values)


def _lengths(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ("full", "packed")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"unknown lengths {bad or text!r}; choose from full, packed")
    return values


def _directions(text):
    values = positive_ints(text)
    if any(v not in (1, 2) for v in values):
        raise argparse.ArgumentTypeError(f"directions are 1 or 2, got {text!r}")
    return values


def _nonneg_ints(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if values is None or any(v < 0 for v in values) or (0 in values and len(values) > 1):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, or 0, got {text!r}")
    return [] if values in ([], [0]) else values


def build_parser():
    sets = "\n".join(f"  {name:<14} {text}" for name, text in SET_TEXT.items())
    parser = argparse.ArgumentParser(
        prog="python -m fastbptt bench-torch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Time a whole PyTorch training step -- the recurrent module, nn.Linear on its output,
F.cross_entropy on the flattened logits, loss.backward(), and optimizer.zero_grad()
(gradients set to None; --optimizer sgd adds torch.optim.SGD's step) -- with
fastbptt.torch.RNN/GRU/LSTM and with torch.nn.RNN/GRU/LSTM, loaded with the same
state_dict, on the same batch and head weights. Packed rows pack x and y with
pack_padded_sequence(..., enforce_sorted=False) in every step, lengths drawn uniformly
from 1..T.

Each row first checks that both give the same loss and gradients (max err: the largest
gradient error relative to that gradient's largest magnitude; a time marked "!" failed),
then times the two steps round by round in turn (the order swapped every round, a pause
before each); each figure is the median of its rounds, and x is torch.nn's median over
fastbptt.torch's. The goal column is the speed each kind of row should reach: 5x for
packed sequences, 2x where B*H <= {LATENCY_BOUND} (latency-bound: per-step overhead, not the
products, sets the time), 1x (never slower) elsewhere.

The overhead table times, at B = 1, H = 8, T in {','.join(map(str, OVERHEAD_T))}, the module's
forward and out.backward(dout) alone, in fastbptt.torch, through fastbptt's core
(layer_forward + layer_backward on the same arrays), and in torch.nn: "overhead" is
fastbptt.torch's time minus the core's, what the PyTorch bridge adds per call
(goal < {OVERHEAD_GOAL_US:g} us).

PyTorch runs on --threads threads (torch.set_num_threads; default 2). The header names
the BLAS library and kernels NumPy (and so fastbptt) runs, PyTorch's MKL and oneDNN, and
whether OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE force OpenBLAS's kernels; figures to
publish come from

  {README_COMMAND}

Needs PyTorch (pip install "fastbptt[torch]").

row sets (--configs, default {','.join(DEFAULT_SETS)}; about ten minutes on 2 cores):
{sets}
""")
    sel = parser.add_argument_group("what to run")
    sel.add_argument("--configs", type=_set_names, default=None, metavar="NAME,...",
                     help=f"row sets, from {', '.join(SETS)} (default {','.join(DEFAULT_SETS)})")
    sel.add_argument("--config", type=_shape, action="append", metavar="T,B,D,H,O",
                     help="a shape of your own (repeat for several); replaces the sets; each in every "
                          "cell of --cell, layer count of --layers, --directions and --lengths")
    sel.add_argument("--cell", type=_cells, default=None, metavar="rnn,gru,lstm|all",
                     help="keep the rows of these cells (default all)")
    sel.add_argument("--layers", type=positive_ints, default=None, metavar="L1,...",
                     help="with --config: num_layers of each row (default 1)")
    sel.add_argument("--directions", type=_directions, default=None, metavar="1,2",
                     help="with --config: 1 (one direction) and/or 2 (bidirectional) (default 1)")
    sel.add_argument("--lengths", type=_lengths, default=None, metavar="full,packed",
                     help="with --config: full lengths and/or packed sequences (default full)")
    sel.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                     help="the dtype of the modules, head and batch (default float32)")
    sel.add_argument("--overhead-T", type=_nonneg_ints, default=None, metavar="T1,...",
                     help="sequence lengths of the overhead rows (default 1,2,5; 0 skips them; none with "
                          "--config unless given)")
    sel.add_argument("--optimizer", choices=["none", "sgd"], default="none",
                     help="none: the step ends with backward() (default); sgd: also torch.optim.SGD(lr=1e-3).step()")
    sel.add_argument("--method", choices=["auto", "fused", "blas"], default=None,
                     help="method= of the fastbptt.torch modules (default: theirs)")
    sel.add_argument("--parallel", action="store_true", help="parallel=True in the fastbptt.torch modules")
    sel.add_argument("--breakdown", action="store_true",
                     help="also time the head and loss alone (forward and backward on a fixed output): "
                          "the part of the step both columns share (JSON head_ms)")
    tim = parser.add_argument_group("timing")
    tim.add_argument("--threads", type=int, default=2, metavar="N",
                     help="torch.set_num_threads(N) for the run (default 2)")
    tim.add_argument("--repeats", type=int, default=7, metavar="N", help="rounds of each step (default 7)")
    tim.add_argument("--min-time", type=float, default=0.05, metavar="SECONDS",
                     help="seconds a round lasts at least (default 0.05)")
    tim.add_argument("--pause", type=float, default=0.03, metavar="SECONDS",
                     help="seconds of sleep before each round, for the thread pools to go idle (default 0.03)")
    tim.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                     help="before each row, wait up to this long for half a second in which other processes "
                          "use at most --busy-threshold of the machine (default 0: do not wait)")
    tim.add_argument("--retries", type=int, default=0, metavar="N",
                     help="time a row again, up to N times, when other processes used over --busy-threshold "
                          "of the machine while it ran; the least disturbed attempt is kept (default 0)")
    tim.add_argument("--busy-threshold", type=float, default=DEFAULT_THRESHOLD, metavar="FRACTION",
                     help=f"share of the machine other processes may use while a row runs before it is "
                          f"marked as disturbed (default {DEFAULT_THRESHOLD})")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write every row, its rounds and the machine's details as JSON")
    out.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines (on stderr)")
    return parser


def check_args(args, parser):
    """Every flag checked before anything runs."""
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.retries < 0:
        parser.error(f"--retries must be at least 0, got {args.retries}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    for flag in ("min_time", "pause", "wait_quiet"):
        value = getattr(args, flag)
        if not value >= 0 or value == float("inf"):
            parser.error(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not 0 <= args.busy_threshold <= 1:
        parser.error(f"--busy-threshold must be a share of the machine between 0 and 1, got {args.busy_threshold}")
    if args.config and args.configs:
        parser.error("--config replaces the sets: do not combine it with --configs")
    for flag in ("layers", "directions", "lengths"):
        if getattr(args, flag) is not None and not args.config:
            parser.error(f"--{flag} shapes the rows of --config; the sets have their own (add --config T,B,D,H,O)")
    if args.json is not None:
        try:
            check_output_path(args.json, "--json")
        except ValueError as exc:
            parser.error(str(exc))


def select_cases(args):
    """The rows the arguments ask for, in order."""
    cells = args.cell or list(CELLS)
    if args.config:
        cases = [Case(cell, T, B, H, D=D, O=O, layers=L, bidirectional=dirs == 2, packed=kind == "packed")
                 for (T, B, D, H, O) in args.config for L in (args.layers or [1])
                 for dirs in (args.directions or [1]) for kind in (args.lengths or ["full"]) for cell in cells]
    else:
        cases = [c for name in (args.configs or DEFAULT_SETS) for c in SETS[name] if c.cell in cells]
    return [replace(c, dtype=args.dtype) for c in cases]


def overhead_Ts(args):
    """T of the overhead rows: --overhead-T, else none with --config, T = 1 for the quick set alone,
    ``OVERHEAD_T`` otherwise."""
    if args.overhead_T is not None:
        return args.overhead_T
    if args.config:
        return []
    return [1] if args.configs == ["quick"] else list(OVERHEAD_T)


def warm_up(cases, overhead_cells, options=None, enabled=True):
    """One tiny step of fastbptt.torch for each kind of row (cell, stack, directions, lengths, dtype).

    Compiles (or loads from Numba's cache) the kernels the rows need before any is timed,
    saying so when that is slow.
    """
    kinds = {(c.cell, min(c.layers, 2), c.bidirectional, c.packed, c.dtype) for c in cases}
    kinds |= {(cell, 1, False, False, "float32") for cell in overhead_cells}
    with compiling(enabled=enabled):
        for cell, layers, bi, packed, dtype in sorted(kinds):
            case = Case(cell, 3, 2, 4, D=3, O=3, layers=layers, bidirectional=bi, packed=packed, dtype=dtype)
            parts = make_modules(case, options=options)
            x, y, lengths = make_batch(case)
            make_step(parts[1], parts[3], x, y, lengths)()


def _command(argv):
    return ["python", "-m", "fastbptt", "bench-torch"] + list(sys.argv[1:] if argv is None else argv)


def run(args, argv=None, out=None):
    """Run what ``args`` ask for, print the tables to ``out`` (default ``sys.stdout``); return the report (a dict)."""
    import torch

    out = sys.stdout if out is None else out

    cases, Ts = select_cases(args), overhead_Ts(args)
    options = {k: v for k, v in (("method", args.method), ("parallel", args.parallel or None)) if v is not None}
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        info = machine_info()
        for line in header_lines(info):
            print(line, file=out)
        monitor = LoadMonitor()
        if not monitor.available:
            print(f"machine load: not measured ({monitor.why_unavailable})", file=out)
        print("one step: zero_grad (to None) + module forward + nn.Linear + F.cross_entropy + backward()"
              + (" + SGD step" if args.optimizer == "sgd" else " (no optimizer step)")
              + f", {args.dtype}; median of {args.repeats} rounds of >= {args.min_time:g} s, "
                f"the two steps' rounds in turn", file=out, flush=True)
        progress = Progress(len(cases) + len(Ts) * len(args.cell or CELLS), enabled=not args.no_progress)
        rows, overhead = [], []
        interrupted = False
        started = time.perf_counter()

        def show(fmt, row, first):                   # each row as it is done: a long run killed keeps them
            lines = fmt([row]).splitlines()
            progress.write(("\n" + lines[0] + "\n" if first else "") + lines[1], file=out)

        try:
            warm_up(cases, (args.cell or CELLS) if Ts else (), options, enabled=not args.no_progress)
            retry = dict(monitor=monitor, threshold=args.busy_threshold, wait=args.wait_quiet, retries=args.retries)
            for case in cases:
                progress.step(case.label)
                rows.append(least_disturbed(
                    lambda case=case: run_case(case, args.repeats, args.min_time, args.pause, args.optimizer,
                                               options, monitor, args.busy_threshold, args.breakdown), **retry))
                show(format_table, rows[-1], len(rows) == 1)
            for cell in args.cell or CELLS:
                for T in Ts:
                    progress.step(f"overhead {cell} T={T}")
                    overhead.append(least_disturbed(
                        lambda cell=cell, T=T: run_overhead(cell, T, rounds=args.repeats, min_time=args.min_time,
                                                            pause=args.pause, options=options, monitor=monitor,
                                                            threshold=args.busy_threshold), **retry))
                    show(format_overhead, overhead[-1], len(overhead) == 1)
        except KeyboardInterrupt:                    # report (and write) what was done
            interrupted = True
        finally:
            progress.close()
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(before)
    print(f"\n{len(rows)} rows and {len(overhead)} overhead rows in {elapsed:.0f} s"
          + (" (interrupted: the rest were not run)" if interrupted else "")
          + "; ms = median time per step; × = torch.nn's median / fastbptt.torch's", file=out)
    for line in goal_lines(rows, overhead) + load_lines(rows + overhead, args.busy_threshold):
        print(line, file=out)
    again = [r for r in rows + overhead if r.get("attempts", 1) > 1]
    if again:
        print(f"{len(again)} rows were timed again because they were disturbed (--retries {args.retries}); "
              f"each shows its least disturbed attempt", file=out)
    same = [r for r in rows if "grad_fn" in r and r["grad_fn"]["torch.nn"] == r["grad_fn"]["fastbptt.torch"]]
    if same:
        print(f"warning: at {len(same)} rows fastbptt.torch's output came from the same autograd node as "
              f"torch.nn's ({same[0]['grad_fn']['torch.nn']}): it ran PyTorch's implementation", file=out)
    return {"command": _command(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": info,
            "readme_command": README_COMMAND, "threads": args.threads, "dtype": args.dtype,
            "optimizer": args.optimizer, "options": options, "repeats": args.repeats,
            "min_time_s": args.min_time, "pause_s": args.pause, "wait_quiet_s": args.wait_quiet,
            "retries": args.retries,
            "goals": GOALS, "latency_bound": LATENCY_BOUND,
            "overhead_goal_us": OVERHEAD_GOAL_US, "elapsed_s": elapsed,
            "load": {"measured": monitor.available, "why_not": monitor.why_unavailable,
                     "threshold": args.busy_threshold},
            "interrupted": interrupted, "rows": rows, "overhead": overhead}


def failures(report):
    """(what, text) for each row whose check failed or that raised."""
    out = []
    for r in report["rows"]:
        what = f"{r['cell']} T={r['T']} B={r['B']} H={r['H']} L={r['layers']}" + (" bi" if r["bidirectional"] else "") \
            + (" packed" if r["packed"] else "")
        if "error" in r:
            out.append((what, r["error"]))
        elif not r["check"]["ok"]:
            c = r["check"]
            out.append((what, f"max gradient error {c['max_grad_error']:.2e} ({c['worst']}), loss error "
                              f"{c['loss_error']:.2e} > tolerance {c['tolerance']:.0e}"))
    out += [(f"overhead {r['cell']} T={r['T']}", r["error"]) for r in report["overhead"] if "error" in r]
    return out


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    if not torch_available():
        print('python -m fastbptt bench-torch needs PyTorch, which is not installed: pip install "fastbptt[torch]"',
              file=sys.stderr)
        return 2
    report = run(args, argv)
    failed = failures(report)
    for what, text in failed:
        print(f"FAILED {what}: {text}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 130 if report["interrupted"] else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
