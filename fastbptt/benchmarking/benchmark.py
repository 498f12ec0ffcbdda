"""``python -m fastbptt bench``: one training step of fastbptt, the NumPy reference, PyTorch and JAX, side by side.

For every configuration (T, B, D, H, O, dtype, activation, cell, layers, lengths) each implementation
builds its step from the same weights and batch (see ``fastbptt.compare``), is
checked once against a float64 run of the reference, is warmed up (compiled or
traced) outside the timing, and is then timed best-of-N. Every number in the table
comes from the same process, one configuration after another.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from .._paths import check_output_path
from .._progress import Progress, compiling
from . import _machine, compare
from ._load import DEFAULT_THRESHOLD, Load, LoadMonitor, describe, total
from .timing import best_time, best_times_interleaved, positive_ints

DTYPE_SHORT = {"float32": "f32", "float64": "f64"}


@dataclass(frozen=True)
class Config:
    """One benchmark problem: dense inputs of size D, O classes, h_0 = 0, biases on.

    ``cell`` is ``"rnn"`` (Elman, with ``activation``), ``"gru"`` or ``"lstm"`` (whose
    ``activation`` is None: they have none to choose). ``layers`` is the model's
    ``num_layers``; ``lengths`` is ``"full"`` (every sequence T long) or ``"uniform"``
    (``compare.make_lengths``: drawn from 1..T, the first T).
    """

    T: int
    B: int
    D: int
    H: int
    O: int
    dtype: str = "float32"
    activation: str | None = "tanh"
    cell: str = "rnn"
    layers: int = 1
    lengths: str = "full"

    @property
    def variable(self):
        """Whether the sequences have different lengths."""
        return self.lengths != "full"

    def make_lengths(self):
        """The batch's lengths (B,), or None for full lengths."""
        return compare.make_lengths(self.T, self.B, self.lengths)

    @property
    def positions(self):
        """Σ lengths: the positions that do work (T·B at full lengths)."""
        lengths = self.make_lengths()
        return self.T * self.B if lengths is None else int(lengths.sum())

    @property
    def flops(self):
        return compare.step_flops(self.T, self.B, self.D, self.H, self.O, self.cell, self.layers,
                                  self.positions)

    @property
    def label(self):
        return (f"T={self.T} B={self.B} D={self.D} H={self.H} O={self.O} "
                f"{self.dtype} {self.activation if self.cell == 'rnn' else self.cell}"
                + (f" L={self.layers}" if self.layers != 1 else "")
                + (f" lengths {self.lengths}" if self.variable else ""))


def build(config):
    """(model, X, Y, lengths) of a Config: the batch zero-padded past each sequence's end."""
    model, X, Y = compare.make_problem(config.T, config.B, config.D, config.H, config.O,
                                       dtype=np.dtype(config.dtype), activation=config.activation,
                                       cell=config.cell, num_layers=config.layers)
    lengths = config.make_lengths()
    if lengths is not None:
        X, Y = compare.zero_padding(X, Y, lengths)
    return model, X, Y, lengths


#: Eight training shapes (T, B, D, H, O), float32, tanh, from a one-unit sequence model to H = 1760:
#: the d2l character model (35, 32, 28, 512, 28), single long sequences, and large batched GEMMs.
SIZES = [(35, 32, 28, 512, 28), (35, 1, 28, 256, 28), (100, 1, 1, 32, 1),
         (1000, 1, 28, 64, 28), (200, 8, 64, 128, 64), (100, 64, 512, 512, 512),
         (50, 16, 1760, 1760, 1760), (50, 64, 1760, 1760, 1760)]

#: The load benchmark's shapes: a small fused step, the per-step-BLAS d2l step, one long sequence.
LOAD_SIZES = [(35, 32, 28, 64, 28), (35, 32, 28, 512, 28), (1000, 1, 28, 64, 28)]

#: Shapes to compare the cells on: a latency-bound long sequence (200, 4, 16, 96, 16), the d2l
#: character model at H = 64 and 256, a mid-sized batch and a single sequence.
CELL_SIZES = [(200, 4, 16, 96, 16), (35, 32, 28, 256, 28), (35, 32, 28, 64, 28),
              (100, 8, 28, 128, 28), (50, 1, 28, 256, 28)]

#: Shapes to compare stacks on (run at 1 and 2 layers by default): latency-bound steps
#: (B·H <= 2048: the first four) and two larger ones.
LAYER_SIZES = [(200, 4, 16, 96, 16), (35, 32, 28, 64, 28), (100, 8, 28, 128, 28), (50, 1, 28, 256, 28),
               (35, 32, 28, 256, 28), (50, 64, 64, 256, 64)]

#: Shapes to compare lengths on (uniform lengths by default): small and mid-sized batches.
LENGTH_SIZES = [(200, 8, 16, 96, 16), (100, 32, 28, 128, 28), (50, 64, 28, 256, 28)]

#: Grids (T values, H values, B values, D = O) of the named sets that are grids.
GRIDS = {"default": ([10, 100, 1000], [16, 64, 256], [1, 16], 28),
         "quick": ([5, 20], [8, 16], [1, 4], 6)}

#: Fixed lists of shapes of the other named sets.
FIXED = {"sizes": SIZES, "load": LOAD_SIZES, "cells": CELL_SIZES, "layers": LAYER_SIZES,
         "lengths": LENGTH_SIZES}

SETS = {"default": "T in 10,100,1000 x H in 16,64,256 x B in 1,16, D = O = 28 (about a minute)",
        "sizes": "eight training shapes from T=100,B=1,H=32 to T=50,B=64,H=1760 (a few minutes)",
        "quick": "T in 5,20 x H in 8,16 x B in 1,4, D = O = 6 (seconds; a smoke test)",
        "load": "T=35,B=32,D=O=28 with H=64 and 512; T=1000,B=1,H=64 (the default with --load)",
        "cells": "five shapes from T=200,B=4,D=O=16,H=96 to T=35,B=32,D=O=28,H=256 (the default "
                 "with a gated --cell; about a minute per cell)",
        "layers": "six shapes from T=200,B=4,H=96 to T=50,B=64,H=256, each cell at --layers 1,2 "
                  "(the default with --layers 2; a few minutes)",
        "lengths": "T=200,B=8,H=96; T=100,B=32,H=128; T=50,B=64,H=256, each cell with --lengths "
                   "uniform (the default with --lengths uniform; a minute or two)"}

#: Older names of the sets, still accepted.
SET_ALIASES = {"issue": "sizes"}


def grid(Ts, Hs, Bs, D, dtypes=("float32",), activations=("tanh",)):
    """Every (T, H, B, dtype, activation) combination with D = O, as Configs (Elman cell)."""
    return [Config(T, B, D, H, D, dt, act)
            for dt, act, B, H, T in itertools.product(dtypes, activations, Bs, Hs, Ts)]


def with_cells(configs, cells):
    """Each Elman config of ``configs`` followed by the same shape in each gated cell of ``cells``.

    The gated cells have no activation: each shape gets them once (after the config with
    the first activation). Without "rnn" in ``cells`` the Elman configs are left out.
    """
    first = configs[0].activation if configs else None
    out = []
    for c in configs:
        if "rnn" in cells:
            out.append(c)
        if c.activation == first:
            out += [replace(c, activation=None, cell=cell) for cell in cells if cell != "rnn"]
    return out


def with_stacks(configs, layers=(1,), lengths=("full",)):
    """Each config once per layer count of ``layers`` and per kind of ``lengths`` (shape by shape)."""
    return [replace(c, layers=L, lengths=kind) for c in configs for L in layers for kind in lengths]


# ----------------------------------------------------------------------------- timing


def gemm_peak(dtype=np.float32, n=2048, repeats=5):
    """GFLOP/s of NumPy's matrix product of two n × n matrices (best of ``repeats``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype)
    best, _, _ = best_time(lambda: np.matmul(a, b, out=c), repeats=repeats, min_time=0.05)
    return 2.0 * n ** 3 / best / 1e9


# ----------------------------------------------------------------------------- running


def run_config(config, impls, repeats=5, reference_repeats=3, min_time=0.02, pause=0.1, on_step=None,
               monitor=None, threshold=DEFAULT_THRESHOLD, interleave=False):
    """Check and time each implementation on one configuration.

    Returns
    -------
    dict with the config's fields, ``flops`` and ``impls``: name -> {``ms`` (best),
    ``rounds_ms``, ``first_call_ms``, ``gflops``, ``max_grad_error``, ``loss_error``,
    ``worst``, ``ok``, ``load``} or {``error``: text} when it failed or {``skipped``: reason}.
    With a ``monitor`` (``fastbptt._load.LoadMonitor``) that can measure, each timing's
    ``load`` (``Load.as_dict``) and the row's ``load`` (the whole row, checks and pauses
    included: a longer window, measured more precisely) say how much CPU other processes
    used meanwhile, and the row's ``disturbed`` whether that was over ``threshold`` of the machine. ``on_step(text)`` is called before each stage (for
    progress). Before each implementation the process sleeps ``pause`` seconds, so that the
    threads of the one before (BLAS, OpenMP) stop spinning and go to sleep before the next is timed.

    With ``interleave``, every implementation is checked first, then their rounds are
    timed in turn (``timing.best_times_interleaved``; a pause before each round), and each
    timing's ``load`` is that of the whole interleaved phase.
    """
    dtype = np.dtype(config.dtype)
    model, X, Y, lengths = build(config)
    if on_step:
        on_step("float64 oracle")
    expected = {False: compare.oracle(model, X, Y, lengths)}
    row_start = monitor.sample() if monitor else None
    result = dict(asdict(config), flops=config.flops, impls={})
    waiting = {}                                    # with interleave: name -> (step, repeats, checked, first)
    if lengths is not None:
        result["positions"] = int(lengths.sum())
    for name in impls:
        if on_step:
            on_step(name)
        why = compare.unsupported(name, config.activation, config.cell, config.layers, config.variable)
        if why:
            result["impls"][name] = {"skipped": why}
            continue
        # fastbptt-full runs every sequence to T: its loss is the full-length one
        full = compare.parse_name(name)[0] == "fastbptt-full" and lengths is not None
        if full and full not in expected:
            if on_step:
                on_step("float64 oracle at full lengths")
            expected[full] = compare.oracle(model, X, Y)
        time.sleep(pause)
        try:
            step = compare.make_step(name, model, X, Y, lengths=lengths)
            start = time.perf_counter()
            checked = compare.check(step(), expected[full], dtype)      # the first call also warms up
            first = time.perf_counter() - start
            n = reference_repeats if name == "reference" else repeats
            if interleave:
                waiting[name] = (step, n, checked, first)
                continue
            sample = monitor.sample() if monitor else None
            best, rounds, _ = best_time(step, repeats=n, min_time=min_time, warmup=1)
            load = monitor.since(sample) if monitor else None
        except Exception as exc:  # noqa: BLE001 -- report it and go on with the others
            result["impls"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        result["impls"][name] = _entry(config, best, rounds, first, checked, load, threshold)
        del step
    if waiting:
        if on_step:
            on_step("timing " + ", ".join(waiting) + " in turn")
        sample = monitor.sample() if monitor else None
        timed = best_times_interleaved({name: (w[0], w[1]) for name, w in waiting.items()},
                                       min_time=min_time, warmup=1, pause=pause)
        load = monitor.since(sample) if monitor else None
        for name in impls:                                  # in the order of impls
            if name not in waiting:
                continue
            got = timed[name]
            if isinstance(got, Exception):
                result["impls"][name] = {"error": f"{type(got).__name__}: {got}"}
                continue
            best, rounds, _ = got
            _, _, checked, first = waiting[name]
            result["impls"][name] = _entry(config, best, rounds, first, checked, load, threshold)
        waiting.clear()
    row = monitor.since(row_start) if monitor else None
    if row is not None:
        result["load"] = row.as_dict(threshold)
        result["disturbed"] = row.disturbed(threshold)
    return result


def _entry(config, best, rounds, first, checked, load, threshold):
    """One implementation's entry of a row: its times, GFLOP/s, check and load."""
    entry = {"ms": best * 1e3, "rounds_ms": [r * 1e3 for r in rounds], "first_call_ms": first * 1e3,
             "gflops": config.flops / best / 1e9,
             **{k: checked[k] for k in ("ok", "tolerance", "loss_error", "max_grad_error",
                                        "max_grad_abs_error", "worst")}}
    if load is not None:
        entry["load"] = load.as_dict(threshold)
    return entry


def _full(name):
    """Whether ``name`` is fastbptt run at full lengths (``fastbptt-full``, with or without a method)."""
    return compare.parse_name(name)[0] == "fastbptt-full"


def _forced(name):
    """The method a fastbptt variant forces ("fused", "blas"), or None (the default or "auto")."""
    method = compare.parse_name(name)[1].get("method")
    return None if method in (None, "auto") else method


def fastest_fastbptt(result):
    """(name, entry) of the fastbptt variant the row's ratios are about, or (None, None).

    That is the fastest timed variant that lets ``method="auto"`` choose (``fastbptt``,
    ``fastbptt:auto``, and their ``-parallel`` twins): what a user gets without forcing
    a method. Only when every timed variant forces one is it the fastest of those.
    """
    timed = [(e["ms"], name, e) for name, e in result["impls"].items()
             if name.startswith("fastbptt") and not _full(name) and "ms" in e]
    chosen = [t for t in timed if _forced(t[1]) is None] or timed
    if not chosen:
        return None, None
    _, name, entry = min(chosen)
    return name, entry


def compare_methods(result):
    """Which forced method was faster: ``{"fastest": name, "ratio": slower / faster}`` or None.

    Needs at least two serial fastbptt variants that force different methods (from
    ``--method fused,blas``); ``auto`` is what ``fastbptt.core.api.choose_method`` picks here.
    """
    timed = {_forced(name): e["ms"] for name, e in result["impls"].items()
             if name.startswith("fastbptt:") and _forced(name) and "ms" in e}
    if len(timed) < 2:
        return None
    order = sorted(timed, key=timed.get)
    out = {"fastest": order[0], "ratio": timed[order[1]] / timed[order[0]], "ms": timed}
    try:
        from ..core.api import choose_method
        out["auto"] = choose_method(result["B"], result["H"])
    except (ImportError, TypeError):       # a fastbptt without choose_method(B, H)
        out["auto"] = None
    return out


def summarize(result, peak_gflops):
    """Add ``fastbptt`` (see ``fastest_fastbptt``), its GFLOP/s, fraction of peak, speedups, methods."""
    name, fast = fastest_fastbptt(result)
    result["fastbptt_variant"] = name
    result["methods"] = compare_methods(result)
    if fast is None:
        return result
    result["fastbptt_gflops"] = fast["gflops"]
    result["peak_fraction"] = fast["gflops"] / peak_gflops if peak_gflops else None
    result["speedup"] = {other: e["ms"] / fast["ms"] for other, e in result["impls"].items()
                         if not other.startswith("fastbptt") and "ms" in e}
    if "fastbptt" in result["impls"] and "fastbptt-parallel" in result["impls"]:
        serial, par = result["impls"]["fastbptt"], result["impls"]["fastbptt-parallel"]
        if "ms" in serial and "ms" in par:
            result["parallel_speedup"] = serial["ms"] / par["ms"]
    full = lengths_ratio(result, name)
    if full is not None:
        result["lengths_ratio"] = full
    return result


def lengths_ratio(result, name):
    """fastbptt's time with the batch's lengths over its time at full lengths, or None.

    ``name`` is the variant the row is about; the full-length time is that of the
    ``fastbptt-full`` variant with the same method (``fastbptt-full`` when ``name`` lets
    method="auto" choose). Only rows with lengths have one.
    """
    if name is None or not result.get("lengths", "full") != "full":
        return None
    method = _forced(name)
    full = [e["ms"] for n, e in result["impls"].items() if _full(n) and _forced(n) == method and "ms" in e]
    if not full:
        return None
    return result["impls"][name]["ms"] / min(full)


# ----------------------------------------------------------------------------- output


def _ms(entry):
    if entry is None:
        return "-"
    if "ms" not in entry:
        return "error" if "error" in entry else "skip"
    text = f"{entry['ms']:.3f}" if entry["ms"] < 100 else f"{entry['ms']:.1f}"
    return text if entry["ok"] else text + "!"


def _busy(result):
    """The row's share of the machine used by other processes, starred when it was disturbed."""
    load = result.get("load")
    if load is None:
        return "-"
    return f"{100 * load['others_fraction']:.0f}%" + ("*" if result.get("disturbed") else "")


def load_summary(results, threshold, peak_loads=()):
    """Lines under the table on the machine's load while the rows were timed (empty when unmeasured)."""
    run = total(Load.from_dict(r["load"]) for r in results if "load" in r)
    if run is None:
        return []
    lines = [f"busy = CPU time other processes used while the row was timed, as a share of all "
             f"{run.cores} cores (from /proc/stat, this process's own CPU time taken out); "
             f"* = over {100 * threshold:.0f}%",
             f"machine load during the timings: {describe(run, threshold)}"]
    disturbed = [r for r in results if r.get("disturbed")]
    if disturbed:
        lines.append(f"warning: {len(disturbed)} of {len(results)} rows were timed while other processes "
                     f"used over {100 * threshold:.0f}% of the machine (marked *): their times are probably "
                     f"too slow; rerun them when the machine is quiet")
    for dt, load in peak_loads:
        if load is not None and load.disturbed(threshold):
            lines.append(f"warning: the {dt} GEMM peak was measured while the machine was busy "
                         f"({describe(load, threshold)}): the %peak column is too high")
    return lines


def format_table(results, impls):
    """The printed table: one line per configuration."""
    others = [n for n in impls if not n.startswith("fastbptt")]
    stacks = any(r.get("layers", 1) != 1 or r.get("lengths", "full") != "full" for r in results)
    cols = [("T", 5), ("B", 3), ("D", 5), ("H", 5), ("O", 5), ("dtype", 5), ("cell", 4), ("act", 8)]
    if stacks:
        cols += [("L", 2), ("lengths", 7)]
    cols += [(f"{n} ms", max(9, len(n) + 3)) for n in impls]
    cols += [("GFLOP/s", 8), ("%peak", 6)]
    cols += [(f"×{n}", max(6, len(n) + 1)) for n in others]
    if "fastbptt" in impls and "fastbptt-parallel" in impls:
        cols.append(("×par", 5))
    ratios = any("lengths_ratio" in r for r in results)
    if ratios:
        cols.append(("var/full", 8))
    methods = any(r.get("methods") for r in results)
    if methods:
        cols += [("faster", 11), ("auto", 5)]
    cols.append(("max err", 8))
    measured = any("load" in r for r in results)
    if measured:
        cols.append(("busy", 5))
    lines = [" ".join(f"{name:>{w}}" for name, w in cols)]
    for r in results:
        cells = [r["T"], r["B"], r["D"], r["H"], r["O"], DTYPE_SHORT[r["dtype"]], r.get("cell", "rnn"),
                 r["activation"] or "-"]
        if stacks:
            cells += [r.get("layers", 1), r.get("lengths", "full")]
        cells += [_ms(r["impls"].get(n)) for n in impls]
        g = r.get("fastbptt_gflops")
        cells.append("-" if g is None else f"{g:.2f}" if g < 10 else f"{g:.1f}")
        p = r.get("peak_fraction")
        cells.append("-" if p is None else f"{100 * p:.0f}%" if p >= 0.1 else f"{100 * p:.1f}%")
        speed = r.get("speedup", {})
        cells += ["-" if n not in speed else f"{speed[n]:.1f}x" if speed[n] < 100 else f"{speed[n]:.0f}x"
                  for n in others]
        if "fastbptt" in impls and "fastbptt-parallel" in impls:
            ps = r.get("parallel_speedup")
            cells.append("-" if ps is None else f"{ps:.2f}")
        if ratios:
            lr = r.get("lengths_ratio")
            cells.append("-" if lr is None else f"{lr:.2f}")
        if methods:
            m = r.get("methods")
            cells += ["-", "-"] if not m else [f"{m['fastest']} {m['ratio']:.2f}x", m["auto"] or "?"]
        errs = [e["max_grad_error"] for e in r["impls"].values() if "max_grad_error" in e]
        cells.append(f"{max(errs):.1e}" if errs else "-")
        if measured:
            cells.append(_busy(r))
        lines.append(" ".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, cols)))
    return "\n".join(lines)


def machine_info(impls, environ=None):
    """What the numbers depend on: CPU, vector extension, BLAS kernels, cores, threads and versions."""
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "numba": numba.__version__}
    for name in impls:
        base, _ = compare.parse_name(name)
        if base in ("torch", "jax"):
            versions[base] = compare.version(base)
    from .. import __version__
    versions["fastbptt"] = __version__
    extension = _machine.cpu_vector_extension()
    blas = _machine.blas_libraries()
    # numba.config, not numba.get_num_threads(): that would start Numba's thread pool, whose
    # threads can then compete with the BLAS threads even in the serial benchmarks
    return {"cpu": cpu, "cores": compare.default_threads(), "platform": platform.platform(),
            "machine": platform.machine(), "cpu_vector_extension": extension, "blas": blas,
            "environment": _machine.environment_notes(environ),
            "kernel_warnings": _machine.kernel_warnings(blas, extension, environ),
            "numba_threads": numba.config.NUMBA_NUM_THREADS,
            "torch_threads": compare.default_threads() if any(n.startswith("torch") for n in impls) else None,
            "versions": versions}


def header_lines(info, what="bench"):
    """The first lines of a benchmark's output: machine, versions, BLAS kernels and CPU, warnings."""
    lines = [f"fastbptt {info['versions']['fastbptt']} {what} on {info['cpu']}, {info['cores']} cores; "
             + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "fastbptt"),
             f"{_machine.describe_blas(info['blas'])}; "
             f"{_machine.describe_cpu(info['cpu_vector_extension'], info['machine'])}",
             f"numba threads {info['numba_threads']}"
             + (f", torch threads {info['torch_threads']}" if info["torch_threads"] else "")
             + (f"; set in the environment: {', '.join(info['environment'])}" if info["environment"] else "")]
    return lines + info["kernel_warnings"]


def write_plot(results, impls, path):
    """A PNG: best time against T (left) and against H (right), log-log.

    Configurations that differ only in T (left) or only in H (right) make a line, one per
    implementation (colour) and per value of everything else (marker); a configuration
    with no such partner is a lone point.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(13, 6), layout="constrained")
    base_colors = {"fastbptt": "C3", "fastbptt-parallel": "C1", "fastbptt-full": "C5", "reference": "C7",
                   "torch": "C0", "torch-packed": "C9", "torch-padded": "C4", "jax": "C2"}
    styles = ["-", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
    methods = sorted({compare.parse_name(n)[1].get("method", "") for n in impls})

    def look(name):
        base, options = compare.parse_name(name)
        color = base_colors.get(base, "k")
        if base.startswith("fastbptt"):
            return color, styles[methods.index(options.get("method", "")) % len(styles)]
        return color, "--"

    markers = "os^vDP*Xph<>"
    defaults = {"cell": "rnn", "layers": 1, "lengths": "full"}

    def value(r, k):         # the gated cells' activation is None: "-", so that keys sort
        v = r.get(k, defaults[k]) if k in defaults else r[k]
        return "-" if v is None else v

    for ax, x, fixed in ((fig.add_subplot(1, 2, 1), "T", ("H", "B", "D", "O", "dtype", "cell", "activation",
                                                          "layers", "lengths")),
                         (fig.add_subplot(1, 2, 2), "H", ("T", "B", "D", "O", "dtype", "cell", "activation",
                                                          "layers", "lengths"))):
        groups = {}
        for r in results:
            groups.setdefault(tuple(value(r, k) for k in fixed), []).append(r)
        lines = sorted(k for k, rows in groups.items() if len({r[x] for r in rows}) > 1)
        vary = [k for i, k in enumerate(fixed) if len({g[i] for g in lines}) > 1]
        handles = []
        for name in impls:
            color, style = look(name)
            handles.append(Line2D([], [], color=color, linestyle=style, label=name))
        for key, rows in sorted(groups.items()):
            rows = sorted(rows, key=lambda r: r[x])
            marker = markers[lines.index(key) % len(markers)] if key in lines else "."
            for name in impls:
                pts = [(r[x], r["impls"][name]["ms"]) for r in rows if "ms" in r["impls"].get(name, {})]
                if pts:
                    color, style = look(name)
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker=marker, color=color, linestyle=style if key in lines else "none",
                            markersize=4 if key in lines else 7)
        for key in lines:
            what = " ".join(f"{k}={key[fixed.index(k)]}" for k in vary) or "all"
            handles.append(Line2D([], [], color="k", marker=markers[lines.index(key) % len(markers)],
                                  linestyle="none", label=what))
        if len(lines) < len(groups):
            handles.append(Line2D([], [], color="k", marker=".", markersize=7, linestyle="none",
                                  label=f"a configuration alone in its {x}"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r[x] for r in results})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(x)
        ax.set_ylabel("ms per training step (best)")
        ax.set_title(f"time against {x}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(handles=handles, fontsize=7, ncol=2 if len(handles) > 10 else 1)
    fig.suptitle("one BPTT training step: forward + softmax cross-entropy + all gradients "
                 "(python -m fastbptt bench)", fontsize=10)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- command line


def _ints_or_names(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _positive_int(text):
    values = positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _config(text):
    values = positive_ints(text)
    if len(values) != 5:
        raise argparse.ArgumentTypeError(f"expected T,B,D,H,O (five positive integers), got {text!r}")
    return tuple(values)


def _choices(allowed, what):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
        return values
    return parse


def _cells(text):
    """Parse --cell: comma-separated cells, or "all"; returned in ``compare.CELL_NAMES`` order."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if "all" in values:
        values = list(compare.CELL_NAMES)
    bad = [v for v in values if v not in compare.CELL_NAMES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"unknown cell {bad or text!r}; choose from "
                                         f"{', '.join(compare.CELL_NAMES)} or all")
    return [c for c in compare.CELL_NAMES if c in values]


def _set_name(text):
    name = SET_ALIASES.get(text, text)
    if name not in SETS:
        raise argparse.ArgumentTypeError(f"unknown set {text!r}; choose from {', '.join(SETS)}")
    return name


def check_outputs(args, parser):
    """Refuse, before anything runs, an output path that cannot be written or a plot format matplotlib lacks.

    The path check (``fastbptt._paths.check_output_path``) tries the write for real: an
    empty path, a directory, a missing folder, /proc and the like are refused by name.
    """
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            try:
                check_output_path(path, flag)
            except ValueError as exc:
                parser.error(str(exc))
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
            from matplotlib.figure import Figure
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed: "
                         "pip install matplotlib (or pip install 'fastbptt[bench]')")
        ext = os.path.splitext(args.plot)[1].lstrip(".").lower()
        formats = Figure().canvas.get_supported_filetypes()
        if ext and ext not in formats:
            parser.error(f"--plot {args.plot!r}: matplotlib cannot write .{ext} files; "
                         f"use one of .{', .'.join(sorted(formats))}")


def warm_up(impls, dtypes, activations, enabled=True, cells=("rnn",), stacks=((1, "full"),)):
    """Compile (or load from the cache) every fastbptt kernel the run needs, saying so when it is slow.

    Each fastbptt variant is called once on a tiny problem with each method, for each
    cell (the Elman cell with each activation) and each (layers, lengths) of ``stacks``,
    so that the first timed configuration does not also time a compilation, and a first
    run is not several silent seconds.
    """
    from ..core import api

    variants = sorted({compare.parse_name(n)[0] for n in impls if n.startswith("fastbptt")})
    if not variants:
        return
    kinds = [("rnn", act) for act in activations if "rnn" in cells] + [(c, None) for c in cells if c != "rnn"]
    with compiling(enabled=enabled):
        for base, dt, (cell, act), (layers, kind) in itertools.product(variants, dtypes, kinds, stacks):
            model, X, Y = compare.make_problem(3, 2, 3, 4, 3, dtype=np.dtype(dt), activation=act, cell=cell,
                                               num_layers=layers)
            lengths = compare.make_lengths(3, 2, kind)
            for method in [m for m in getattr(api, "METHODS", ("auto",)) if m != "auto"] or [None]:
                options = {} if method is None else {"method": method}
                compare.make_step(base, model, X, Y, lengths=lengths, **options)()


def warm_up_for(impls, configs, enabled=True):
    """``warm_up`` for the dtypes, cells, Elman activations, layer counts and lengths of ``configs``."""
    warm_up(impls, sorted({c.dtype for c in configs}),
            sorted({c.activation for c in configs if c.cell == "rnn"}), enabled=enabled,
            cells=[c for c in compare.CELL_NAMES if any(k.cell == c for k in configs)],
            stacks=sorted({(c.layers, c.lengths) for c in configs}))


def stack_notes(impls):
    """Lines under the header of a run with stacks or lengths: what each implementation does with them."""
    out = ["stacks: num_layers = L in fastbptt and in torch.nn.RNN/GRU/LSTM(num_layers=L), every layer's "
           "weights copied; no dropout"]
    if any(compare.parse_name(n)[0] in ("fastbptt-full", "torch-packed", "torch-padded") for n in impls):
        out.append("lengths: the loss is the mean over the valid positions; fastbptt gets lengths=; "
                   "fastbptt-full = fastbptt on the same batch at full lengths; torch-packed = "
                   "pack_padded_sequence(enforce_sorted=False) of X and Y in every step; torch-padded = "
                   "the whole padded batch, loss masked to the valid positions")
    return out


def build_parser():
    sets = "\n".join(f"  {name:<8} {text}" for name, text in SETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m fastbptt bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Time one BPTT training step -- forward, softmax cross-entropy averaged over the T*B
positions, and the gradient of every parameter, from h_0 = 0, on dense inputs of size D
with a linear readout of size O and biases -- in fastbptt, the plain NumPy reference
(fastbptt.reference), PyTorch (torch.nn.RNN + nn.Linear + F.cross_entropy) and JAX
(jit(value_and_grad(loss)) over lax.scan), all from the same weights and batch.
--cell gru,lstm (or all) times the GRU and the LSTM too: PyTorch's nn.GRU / nn.LSTM
with the weights copied one to one, and JAX's scan over the same equations.

--layers 1,2 times stacked models (num_layers, against PyTorch's num_layers, every
layer's weights copied) and --lengths uniform batches whose sequences have lengths drawn
from 1..T (the first T), the loss averaged over the valid positions: fastbptt with
lengths=, "fastbptt-full" (the same batch with every sequence run to T), "torch-packed"
(pack_padded_sequence(enforce_sorted=False) of X and Y in each step) and "torch-padded"
(the padded batch, the loss masked). "var/full" is fastbptt's time over fastbptt-full's.
For stacks and lengths the default implementations are fastbptt and PyTorch (the JAX
step has one layer and no lengths; the reference is slow there: --impl reference adds it),
and a step counts {compare.STACK_FLOP_FORMULA} flops.

Each implementation is first checked against the reference run in float64 (loss and
every gradient; the table's "max err" is the largest gradient error relative to that
gradient's largest magnitude, and a time marked "!" failed the check), then warmed up
(compiled / traced) untimed, then timed: the best of N rounds, each round calling the
step enough times to last --min-time. PyTorch and JAX are used when installed and
skipped otherwise (pip install jax; for PyTorch's CPU build, pip install torch
--index-url https://download.pytorch.org/whl/cpu).

Columns: ms per step for each implementation; GFLOP/s and %peak of the fastest fastbptt
variant that lets method="auto" choose (with --method fused,blas alone: the fastest of
those), where a step counts {compare.FLOP_FORMULA} flops
(the matrix products of forward and backward; see fastbptt.compare.step_flops) and the
peak is NumPy's GEMM of two n x n matrices on the BLAS threads the benchmark uses,
measured before and after the run (the higher of the two; sgemm, n = 2048, by default;
dgemm for float64 rows); x<name> is how many times faster that fastbptt variant is than
<name>. With two forced methods (--method auto,fused,blas), "faster" names the faster
of them and by how much, and "auto" the one method="auto" picks for the shape.
"xpar" (with --parallel) is serial time / parallel time. "busy" (Linux)
is the share of all cores' time that OTHER processes used while the row was timed (from
/proc/stat, this process's own CPU time taken out); rows over --busy-threshold are
marked "*" and probably too slow.

The header names the BLAS library and the kernels it runs (threadpoolctl's
"architecture", when threadpoolctl is installed) and the CPU's widest vector extension,
and warns when the kernels are narrower than the CPU (as OPENBLAS_CORETYPE=Haswell
forces on an AVX-512 CPU).

--load times the same step alone ("idle") and beside busy-loop processes ("loaded"),
in alternating pairs of phases, and prints the median of each and their ratio (with
one of two cores taken, a step should be at most 2x slower). It uses the "load" set
unless --config, --configs or a grid says otherwise, fastbptt alone unless --impl
says otherwise, --repeats as the number of pairs (default 5) and --min-time as the
length of a phase (default 0.2 s).

configuration sets (--configs):
{sets}
""")
    sel = parser.add_argument_group("what to run")
    sel.add_argument("--configs", type=_set_name, default=None, metavar="NAME",
                     help=f"a named set of configurations, one of {', '.join(SETS)} (listed above; "
                          "default: default, or load with --load)")
    sel.add_argument("--quick", action="store_true",
                     help="shorthand for --configs quick --repeats 3 --min-time 0.005 (with --load: "
                          "2 pairs of 0.05 s phases)")
    sel.add_argument("--config", type=_config, action="append", metavar="T,B,D,H,O",
                     help="a configuration of your own (repeat the flag for several); replaces the set")
    sel.add_argument("--T", type=positive_ints, metavar="T1,T2,...", help="sequence lengths of the grid")
    sel.add_argument("--H", type=positive_ints, metavar="H1,H2,...", help="hidden sizes of the grid")
    sel.add_argument("--B", type=positive_ints, metavar="B1,B2,...", help="batch sizes of the grid")
    sel.add_argument("--D", type=_positive_int, metavar="D", help="input size = output size O of the grid")
    sel.add_argument("--cell", type=_cells, default=None, metavar="rnn,gru,lstm|all",
                     help="the cells to time each shape in: rnn (Elman), gru, lstm, or all (default rnn; "
                          "with a gated cell and no set, grid or --config, the cells set)")
    sel.add_argument("--layers", type=positive_ints, default=None, metavar="L1,L2,...",
                     help="stack each model this many layers deep (num_layers), each count a row: e.g. 1,2 "
                          "(default 1; 1,2 for the layers set, which is the default with a count above 1)")
    sel.add_argument("--lengths", type=_choices(list(compare.LENGTHS), "lengths"), default=None,
                     metavar="full,uniform",
                     help="sequence lengths of each batch: full (every sequence T long) or uniform (drawn "
                          "from 1..T, the first T); each a row (default full; uniform for the lengths set, "
                          "which is the default with uniform)")
    sel.add_argument("--dtype", type=_choices(["float32", "float64"], "dtype"), default=None,
                     metavar="float32,float64", help="dtypes to run each configuration in (default float32)")
    sel.add_argument("--activation", type=_choices(["tanh", "relu", "identity"], "activation"),
                     default=None, metavar="tanh,relu,identity",
                     help="activations to run each configuration with (default tanh; torch has no identity)")
    sel.add_argument("--impl", type=_choices(list(compare.IMPLEMENTATIONS), "implementation"),
                     default=None, metavar="NAME,...",
                     help="implementations to time, from " + ", ".join(compare.IMPLEMENTATIONS)
                          + " (default: fastbptt, reference, and torch and jax when installed; "
                            "fastbptt alone with --load)")
    sel.add_argument("--method", type=_ints_or_names, metavar="NAME,...",
                     help="time fastbptt once per method of loss_and_grad(method=...) (e.g. auto,fused,blas), "
                          "as columns fastbptt:NAME; speedups are over the fastest")
    sel.add_argument("--parallel", action="store_true",
                     help="also time fastbptt with parallel=True (column fastbptt-parallel, "
                          "speedup over serial in column xpar)")
    lod = parser.add_argument_group("speed under load")
    lod.add_argument("--load", action="store_true",
                     help="time each step alone and beside busy-loop processes, interleaved, "
                          "instead of the comparison table (see above)")
    lod.add_argument("--load-procs", type=_positive_int, default=None, metavar="K",
                     help="busy-loop processes during a loaded phase (default: half the cores, at least 1)")
    tim = parser.add_argument_group("timing")
    tim.add_argument("--repeats", type=int, default=None, metavar="N",
                     help="best of this many rounds (default 5; 3 with --quick); with --load, the "
                          "number of idle/loaded pairs (default 5)")
    tim.add_argument("--reference-repeats", type=int, default=3, metavar="N",
                     help="rounds for the slow NumPy reference (default 3)")
    tim.add_argument("--min-time", type=float, default=None, metavar="SECONDS",
                     help="seconds a round lasts at least (default 0.02; 0.005 with --quick); with "
                          "--load, seconds a phase lasts at least (default 0.2)")
    tim.add_argument("--interleave", action="store_true",
                     help="time the implementations of a row in turn, one round of each then again, "
                          "instead of one after the other: fairer ratios on a machine whose load comes and goes")
    tim.add_argument("--pause", type=float, default=0.1, metavar="SECONDS",
                     help="seconds to sleep before each implementation, so that the thread pools of "
                          "the one before go idle (default 0.1)")
    tim.add_argument("--peak-n", type=int, default=2048, metavar="N",
                     help="matrix size of the GEMM peak measurement (default 2048; 0 skips it)")
    tim.add_argument("--busy-threshold", type=float, default=DEFAULT_THRESHOLD, metavar="FRACTION",
                     help="share of all cores' time that other processes may use while a row (with "
                          f"--load: a phase) is timed before it is marked as disturbed (default {DEFAULT_THRESHOLD})")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write every result and the machine's details as JSON")
    out.add_argument("--plot", metavar="PATH",
                     help="write a PNG of time against T and against H (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true",
                     help="no progress bar or progress lines (on stderr: a bar on a terminal, plain "
                          "lines otherwise)")
    return parser


def select_configs(args, parser):
    """The Configs the arguments ask for: each shape in each cell of ``--cell`` (default rnn),
    at each layer count of ``--layers`` and each kind of ``--lengths``.

    The sets "layers" and "lengths" default to every cell, and to ``--layers 1,2`` and
    ``--lengths uniform`` respectively; they are the default set with ``--layers`` above 1
    and with ``--lengths uniform``.
    """
    dtypes = args.dtype or ["float32"]
    acts = args.activation or ["tanh"]
    grid_flags = [f for f in ("T", "H", "B", "D") if getattr(args, f) is not None]
    layers, lengths = getattr(args, "layers", None), getattr(args, "lengths", None)
    if args.configs:
        name = args.configs
    elif args.quick:
        name = "quick"
    elif getattr(args, "load", False) and not grid_flags:
        name = "load"
    elif layers and max(layers) > 1 and not grid_flags:
        name = "layers"
    elif lengths and lengths != ["full"] and not grid_flags:
        name = "lengths"
    elif getattr(args, "cell", None) not in (None, ["rnn"]) and not grid_flags:
        name = "cells"
    else:
        name = "default"
    stacked = name in ("layers", "lengths") and not args.config
    cells = getattr(args, "cell", None) or (list(compare.CELL_NAMES) if stacked else ["rnn"])
    layers = layers or ([1, 2] if name == "layers" and not args.config else [1])
    lengths = lengths or (["uniform"] if name == "lengths" and not args.config else ["full"])
    if args.activation and "rnn" not in cells:
        parser.error("--activation chooses the rnn cell's activation; the gru and lstm cells have none "
                     "(add rnn to --cell, or leave --activation out)")
    if args.config:
        if args.configs or grid_flags:
            parser.error("--config replaces the set: do not combine it with --configs, --T, --H, --B or --D")
        shapes = args.config
    elif name in GRIDS:
        Ts, Hs, Bs, D = GRIDS[name]
        return with_stacks(with_cells(grid(args.T or Ts, args.H or Hs, args.B or Bs, args.D or D, dtypes, acts),
                                      cells), layers, lengths)
    else:
        if grid_flags:
            parser.error(f"--{', --'.join(grid_flags)} shape a grid; the set {name!r} is a fixed list")
        shapes = FIXED[name]
    return with_stacks(with_cells([Config(*shape, dt, act) for dt, act in itertools.product(dtypes, acts)
                                   for shape in shapes], cells), layers, lengths)


def default_impls(configs):
    """The implementations a run times unless ``--impl`` says otherwise.

    fastbptt, the reference, PyTorch and JAX; for stacks and lengths fastbptt and PyTorch
    alone (the reference runs each sequence alone in Python loops, and the JAX step has
    one layer and no lengths), with, when some sequences are shorter than T,
    ``fastbptt-full``, ``torch-packed`` and ``torch-padded`` (and ``torch`` only when some
    rows have full lengths).
    """
    if all(c.layers == 1 and not c.variable for c in configs):
        return ("fastbptt", "reference", "torch", "jax")
    variable, full = any(c.variable for c in configs), any(not c.variable for c in configs)
    return tuple(n for n, wanted in (("fastbptt", True), ("fastbptt-full", variable), ("torch", full),
                                     ("torch-packed", variable), ("torch-padded", variable)) if wanted)


def select_impls(args, parser, default=("fastbptt", "reference", "torch", "jax")):
    """The implementations to time, and a note on each one left out."""
    notes = []
    if args.impl:
        impls = list(args.impl)
        for name in impls:
            if not compare.available(name):
                package = "torch" if compare.parse_name(name)[0] in compare.TORCH else name
                parser.error(f"--impl {name}: {name} is not installed (pip install {package})")
    else:
        impls = []
        for name in default:
            if compare.available(name):
                impls.append(name)
            else:
                package = "torch" if name in compare.TORCH else name
                notes.append(f"{name} is not installed: skipped (pip install {package})")
    if args.parallel and "fastbptt-parallel" not in impls:
        impls.insert(impls.index("fastbptt") + 1 if "fastbptt" in impls else 0, "fastbptt-parallel")
    impls = [n for n in compare.IMPLEMENTATIONS if n in impls]
    if args.method:
        from ..core import api
        known = getattr(api, "METHODS", None)
        if known is None:
            parser.error("--method: this fastbptt's loss_and_grad has no method keyword")
        bad = [m for m in args.method if m not in known]
        if bad:
            parser.error(f"--method: unknown {bad}; choose from {', '.join(known)}")
        impls = [f"{n}:{m}" if n.startswith("fastbptt") else n
                 for n in impls for m in (args.method if n.startswith("fastbptt") else [None])]
    return impls, notes


def check_args(args, parser):
    """Every flag's value, checked before anything runs; the defaults that depend on others filled in."""
    if args.repeats is None:
        args.repeats = (2 if args.quick else 5) if args.load else (3 if args.quick else 5)
    if args.min_time is None:
        args.min_time = (0.05 if args.quick else 0.2) if args.load else (0.005 if args.quick else 0.02)
    for flag in ("repeats", "reference_repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("min_time", "pause", "peak_n"):
        value = getattr(args, flag)
        if not value >= 0 or value == float("inf"):
            parser.error(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not 0 <= args.busy_threshold <= 1:
        parser.error(f"--busy-threshold must be a share of the machine between 0 and 1, got {args.busy_threshold}")
    if args.load_procs is not None and not args.load:
        parser.error("--load-procs goes with --load")
    if args.load and args.plot:
        parser.error("--plot draws the comparison table; it does not go with --load")
    if args.load and args.interleave:
        parser.error("--interleave goes with the comparison table; --load alternates its phases already")
    if args.load and (args.layers not in (None, [1]) or args.lengths not in (None, ["full"])):
        parser.error("--layers and --lengths go with the comparison table, not with --load")
    check_outputs(args, parser)


def _command(argv):
    return ["python", "-m", "fastbptt", "bench"] + list(sys.argv[1:] if argv is None else argv)


def write_json(path, doc):
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    configs = select_configs(args, parser)
    impls, notes = select_impls(args, parser, default=("fastbptt",) if args.load else default_impls(configs))
    if args.load:
        from . import _loadbench
        return _loadbench.main(args, configs, impls, _command(argv))

    monitor = LoadMonitor()
    peaks, peak_runs, peak_loads = {}, {}, []      # first, before anything starts a thread pool of its own
    if args.peak_n:
        for dt in sorted({c.dtype for c in configs}):
            sample = monitor.sample()
            peaks[dt] = gemm_peak(np.dtype(dt), n=args.peak_n)
            peak_loads.append((dt, monitor.since(sample)))
    info = machine_info(impls)
    for line in header_lines(info):
        print(line)
    if not monitor.available:
        print(f"machine load: not measured ({monitor.why_unavailable})")
    for note in notes:
        print(note)
    stacked = any(c.layers != 1 or c.variable for c in configs)
    print(f"one step: forward + softmax cross-entropy + all gradients, dense inputs, biases, h_0 = 0; "
          f"flops = {compare.STACK_FLOP_FORMULA if stacked else compare.FLOP_FORMULA}; best of {args.repeats} "
          f"(reference: {args.reference_repeats}) rounds of >= {args.min_time:g} s"
          + (", the implementations' rounds in turn" if args.interleave else ""), flush=True)
    if stacked:
        for line in stack_notes(impls):
            print(line)

    warm_up_for(impls, configs, enabled=not args.no_progress)
    progress = Progress(len(configs) * (len(impls) + 1), enabled=not args.no_progress)
    results = []
    started = time.perf_counter()
    try:
        for config in configs:
            r = run_config(config, impls, repeats=args.repeats, reference_repeats=args.reference_repeats,
                           min_time=args.min_time, pause=args.pause,
                           on_step=lambda what, c=config: progress.step(f"{c.label}: {what}"),
                           monitor=monitor, threshold=args.busy_threshold, interleave=args.interleave)
            results.append(r)
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    for dt, first in list(peaks.items()):
        # again at the end: a neighbour on the host can halve one measurement; keep the higher
        sample = monitor.sample()
        again = gemm_peak(np.dtype(dt), n=args.peak_n)
        peak_loads.append((dt, monitor.since(sample)))
        peak_runs[dt] = [first, again]
        peaks[dt] = max(first, again)
    for r in results:
        summarize(r, peaks.get(r["dtype"]))

    for dt, runs in peak_runs.items():
        print(f"NumPy {'s' if dt == 'float32' else 'd'}gemm peak (n = {args.peak_n}): {peaks[dt]:.1f} "
              f"GFLOP/s (the higher of {runs[0]:.1f} before and {runs[1]:.1f} after the run)")
    print()
    print(format_table(results, impls))
    if any("lengths_ratio" in r for r in results):
        print("\nlengths = full (every sequence T long) or uniform (drawn from 1..T, the first T); "
              "var/full = fastbptt's time with those lengths / fastbptt-full's (the same batch, every "
              "sequence run to T)")
    print(f"\n{len(configs)} configurations in {elapsed:.0f} s; ms = best time per step; "
          "×name = name's time / fastbptt's (the fastest variant that lets method=auto choose); max err = largest relative gradient "
          "error of any implementation against the float64 reference")
    for line in load_summary(results, args.busy_threshold, peak_loads):
        print(line)
    failed = [(r, n, e) for r in results for n, e in r["impls"].items() if "error" in e or e.get("ok") is False]
    for r, n, e in failed:
        what = e.get("error") or (f"max gradient error {e['max_grad_error']:.2e} ({e['worst']}), "
                                  f"loss error {e['loss_error']:.2e} > tolerance {e['tolerance']:.0e}")
        config = Config(*(r[k] for k in ("T", "B", "D", "H", "O", "dtype", "activation", "cell")),
                        layers=r.get("layers", 1), lengths=r.get("lengths", "full"))
        print(f"FAILED {n} at {config.label}: {what}", file=sys.stderr)

    if args.json:
        run_load = total(Load.from_dict(r["load"]) for r in results if "load" in r)
        doc = {"command": _command(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": info,
               "gemm_peak_gflops": peaks, "gemm_peak_runs_gflops": peak_runs, "gemm_peak_n": args.peak_n,
               "gemm_peak_loads": [{"dtype": dt, "load": None if load is None else load.as_dict(args.busy_threshold)}
                                   for dt, load in peak_loads],
               "flop_formula": compare.STACK_FLOP_FORMULA if stacked else compare.FLOP_FORMULA,
               "repeats": args.repeats,
               "reference_repeats": args.reference_repeats, "min_time_s": args.min_time,
               "pause_s": args.pause, "interleave": args.interleave, "implementations": impls,
               "elapsed_s": elapsed,
               "load": {"measured": monitor.available, "why_not": monitor.why_unavailable,
                        "threshold": args.busy_threshold,
                        "disturbed_rows": sum(bool(r.get("disturbed")) for r in results),
                        "run": None if run_load is None else run_load.as_dict(args.busy_threshold)},
               "results": results}
        write_json(args.json, doc)
    if args.plot:
        write_plot(results, impls, args.plot)
        print(f"wrote {args.plot}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
