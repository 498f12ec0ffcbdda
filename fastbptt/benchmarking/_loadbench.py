"""``python -m fastbptt bench --load``: one training step alone, and beside busy processes.

A step that spins in threaded BLAS while another process holds one of the cores can get
tens of times slower, where losing one of two cores should cost at most 2×. This
benchmark shows it: for each configuration and implementation it times the same step in
phases, "idle" (nothing else of ours running) and "loaded" (K busy-loop processes, pinned
to nothing, started for the phase and killed after it), interleaved in pairs whose order
alternates, so that a drift of the machine affects both alike. Each phase's CPU load is
measured (``fastbptt._load``): the idle phases must have been idle, and the loaded ones
show how much of the machine the busy processes got.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time

from . import compare
from ._load import DEFAULT_THRESHOLD, total

# A busy loop that dies with its parent: PR_SET_PDEATHSIG (Linux) kills it at once, and it
# checks its parent now and then elsewhere, so no competitor outlives a killed benchmark.
COMPETITOR_CODE = """\
import os, sys
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)
except Exception:
    pass
parent = os.getppid()
sys.stdout.write("ready\\n")
sys.stdout.flush()
i = 0
while True:
    i += 1
    if not i & 0xFFFFF and os.getppid() != parent:
        break
"""


class Competitors:
    """``n`` CPU-bound busy-loop processes, running between ``__enter__`` and ``__exit__``.

    No CPU affinity is set: the operating system places them as it places everything.
    ``__enter__`` returns once each has started its loop.
    """

    def __init__(self, n, python=None):
        if n < 0:
            raise ValueError(f"the number of competing processes must be >= 0, got {n}")
        self.n = n
        self.python = python or sys.executable
        self.procs = []

    def __enter__(self):
        try:
            for _ in range(self.n):
                proc = subprocess.Popen([self.python, "-c", COMPETITOR_CODE], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self.procs.append(proc)
                if proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a competing process ({self.python} -c ...) did not start")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        self.procs = []
        return False


def time_phase(step, min_time, min_calls=5, clock=time.perf_counter):
    """Seconds of each call of ``step`` over one phase.

    One untimed call first (the caches and a new neighbour settle), then calls until at
    least ``min_calls`` were made and ``min_time`` seconds passed.
    """
    step()
    times = []
    start = clock()
    while True:
        t0 = clock()
        step()
        t1 = clock()
        times.append(t1 - t0)
        if len(times) >= min_calls and t1 - start >= min_time:
            return times


def run_interleaved(step, pairs, min_time, competitors, monitor, load=None, on_phase=None,
                    clock=time.perf_counter):
    """Time ``step`` in ``pairs`` idle/loaded pairs of phases, alternating which comes first.

    Parameters
    ----------
    step : callable
        One training step.
    pairs : int
        Number of (idle, loaded) pairs; odd pairs run loaded first.
    min_time : float
        Seconds each phase lasts at least.
    competitors : int
        Busy processes during a loaded phase.
    monitor : fastbptt._load.LoadMonitor
        Measures each phase's load (its ``since`` may return None).
    load : callable, optional
        ``load(competitors)`` is the context manager that runs them (default ``Competitors``).
    on_phase : callable, optional
        Called with "idle" or "loaded" before each phase.

    Returns
    -------
    list of dict, one per phase in the order run: ``condition``, ``times`` (seconds per call)
    and ``load`` (a ``Load`` or None).
    """
    load = Competitors if load is None else load
    phases = []
    for i in range(pairs):
        for condition in (("idle", "loaded") if i % 2 == 0 else ("loaded", "idle")):
            if on_phase:
                on_phase(condition)
            context = load(competitors) if condition == "loaded" else contextlib.nullcontext()
            with context:
                start = monitor.sample()
                times = time_phase(step, min_time, clock=clock)
                measured = monitor.since(start)
            phases.append({"condition": condition, "times": times, "load": measured})
    return phases


def bound(cores, competitors):
    """The most a step should slow down when ``competitors`` of ``cores`` cores are taken.

    A step that keeps the cores left to it runs on cores − competitors of them instead of
    cores, at worst, so it slows down by cores / (cores − competitors) at most (2 for one
    of two). None when the competitors take every core.
    """
    return cores / (cores - competitors) if competitors < cores else None


def summarize(phases, competitors, threshold=DEFAULT_THRESHOLD):
    """Medians, the ratio and the loads of the phases of ``run_interleaved``.

    Returns
    -------
    dict with ``idle_ms`` and ``loaded_ms`` (median of every call in those phases),
    ``ratio`` (loaded / idle), ``idle_phase_ms``/``loaded_phase_ms`` (each phase's median),
    ``calls``, and when the load was measured ``idle_load``/``loaded_load`` (``Load.as_dict``),
    ``idle_disturbed`` (other processes were busy during the idle phases),
    ``loaded_disturbed`` (something besides our competitors was busy during the loaded ones)
    and ``competitors_ran`` (the competitors got at least half a core each).
    """
    out = {}
    for condition in ("idle", "loaded"):
        mine = [p for p in phases if p["condition"] == condition]
        calls = [t for p in mine for t in p["times"]]
        out[f"{condition}_ms"] = statistics.median(calls) * 1e3 if calls else None
        out[f"{condition}_phase_ms"] = [statistics.median(p["times"]) * 1e3 for p in mine]
        out[f"{condition}_calls"] = len(calls)
        out[f"{condition}_load"] = total(p["load"] for p in mine)
    idle, loaded = out["idle_ms"], out["loaded_ms"]
    out["ratio"] = loaded / idle if idle and loaded is not None else None
    idle_load, loaded_load = out.pop("idle_load"), out.pop("loaded_load")
    if idle_load is not None:
        out["idle_load"] = idle_load.as_dict(threshold)
        out["idle_disturbed"] = idle_load.disturbed(threshold)
    if loaded_load is not None:
        out["loaded_load"] = loaded_load.as_dict(threshold)
        wall, cores = loaded_load.wall_s, loaded_load.cores
        extra = (loaded_load.others_s - competitors * wall) / (wall * cores) if wall > 0 else 0.0
        out["loaded_disturbed"] = extra - loaded_load.resolution > threshold
        out["competitors_ran"] = loaded_load.others_cores >= 0.5 * competitors
    return out


# ----------------------------------------------------------------------------- output


def _num(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if value < 100 else f"{value:.1f}"


def format_table(rows, cores, competitors):
    """The printed table: one line per configuration and implementation."""
    limit = bound(cores, competitors)
    cols = [("T", 5), ("B", 3), ("D", 5), ("H", 5), ("O", 5), ("dtype", 5), ("act", 8), ("impl", 20),
            ("idle ms", 9), ("loaded ms", 10), ("×slower", 8), ("others idle", 12), ("others loaded", 14)]
    lines = [" ".join(f"{name:>{w}}" for name, w in cols)]
    for r in rows:
        ratio = r.get("ratio")
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x" + ("!" if limit and ratio > limit else "")
        idle_load, loaded_load = r.get("idle_load"), r.get("loaded_load")
        idle_text = "-" if idle_load is None else (f"{idle_load['others_cores']:.2f}"
                                                   + ("*" if r.get("idle_disturbed") else ""))
        loaded_text = "-" if loaded_load is None else (f"{loaded_load['others_cores']:.2f}"
                                                       + ("*" if r.get("loaded_disturbed") else ""))
        if "error" in r:
            idle_text = loaded_text = ""
            ratio_text = "error"
        cells = [r["T"], r["B"], r["D"], r["H"], r["O"], {"float32": "f32", "float64": "f64"}[r["dtype"]],
                 r["activation"] or r.get("cell"), r["impl"], _num(r.get("idle_ms")), _num(r.get("loaded_ms")), ratio_text,
                 idle_text, loaded_text]
        lines.append(" ".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, cols)))
    return "\n".join(lines)


def footer(rows, cores, competitors, threshold, load_available):
    """The lines under the table: what the columns mean and what went wrong."""
    limit = bound(cores, competitors)
    lines = [f"idle/loaded ms = median time per step alone / beside {competitors} busy-loop "
             f"process{'es' if competitors != 1 else ''}; ×slower = loaded / idle"]
    if limit:
        lines.append(f"with {competitors} of {cores} cores taken, a step that keeps the cores left to it "
                     f"is at most {limit:.1f}x slower; '!' marks a step slowed down more")
    if load_available:
        lines.append(f"others = cores kept busy by other processes during those phases (from /proc/stat, "
                     f"this process's own CPU time taken out); '*' = over {100 * threshold:.0f}% of the "
                     f"machine beyond what was expected (idle: anything; loaded: beyond the busy loops)")
    else:
        lines.append("others: not measured (/proc/stat cannot be read on this system)")
    if any(r.get("idle_disturbed") for r in rows):
        lines.append("warning: other processes were busy during some idle phases ('*'): those idle times, "
                     "and so the ratios, are not of an idle machine; rerun when the machine is quiet")
    if any(r.get("loaded_disturbed") for r in rows):
        lines.append("warning: processes besides the busy loops were running during some loaded phases ('*')")
    if any(r.get("competitors_ran") is False for r in rows):
        lines.append("note: the busy loops got less than half a core each in some rows: the operating "
                     "system gave the step's threads priority, or /proc/stat counts a different machine "
                     "than this process can use (a container)")
    over = [r for r in rows if limit and r.get("ratio") and r["ratio"] > limit]
    if over:
        lines.append(f"{len(over)} of {len(rows)} steps slowed down more than {limit:.1f}x")
    return lines


# ----------------------------------------------------------------------------- running


def run_config(config, impl, pairs, min_time, competitors, monitor, threshold=DEFAULT_THRESHOLD,
               load=None, on_phase=None):
    """Check one implementation's step against the float64 reference, then time it idle and loaded.

    Returns
    -------
    dict with the config's fields, ``impl``, ``ok`` and ``max_grad_error`` (the check), the
    fields of ``summarize``, and ``phases`` (condition, median ms, calls and load of each, in
    the order run); or ``error`` (text) when the step could not be built or run.
    """
    from dataclasses import asdict

    import numpy as np

    dtype = np.dtype(config.dtype)
    model, X, Y = compare.make_problem(config.T, config.B, config.D, config.H, config.O,
                                       dtype=dtype, activation=config.activation, cell=config.cell)
    result = dict(asdict(config), impl=impl)
    try:
        step = compare.make_step(impl, model, X, Y)
        checked = compare.check(step(), compare.oracle(model, X, Y), dtype)
        phases = run_interleaved(step, pairs, min_time, competitors, monitor, load=load, on_phase=on_phase)
    except Exception as exc:  # noqa: BLE001 -- report it and go on with the others
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result.update(ok=checked["ok"], max_grad_error=checked["max_grad_error"])
    result.update(summarize(phases, competitors, threshold))
    result["phases"] = [{"condition": p["condition"], "median_ms": statistics.median(p["times"]) * 1e3,
                         "calls": len(p["times"]),
                         "load": None if p["load"] is None else p["load"].as_dict(threshold)}
                        for p in phases]
    return result


def main(args, configs, impls, command):
    """``bench --load`` with the parsed and checked arguments of ``fastbptt.benchmark``."""
    import json

    from . import benchmark
    from ._load import LoadMonitor
    from .._progress import Progress

    cores = compare.default_threads()
    competitors = args.load_procs if args.load_procs is not None else max(1, cores // 2)
    monitor = LoadMonitor()
    info = benchmark.machine_info(impls)
    for line in benchmark.header_lines(info, what="load benchmark"):
        print(line)
    if not monitor.available:
        print(f"machine load: not measured ({monitor.why_unavailable})")
    print(f"one step (forward + softmax cross-entropy + all gradients) alone and beside {competitors} "
          f"busy-loop process{'es' if competitors != 1 else ''} on {cores} cores; {args.repeats} pairs of "
          f"phases of >= {args.min_time:g} s, interleaved; medians", flush=True)

    benchmark.warm_up_for(impls, configs, enabled=not args.no_progress)
    progress = Progress(len(configs) * len(impls) * 2 * args.repeats, enabled=not args.no_progress, unit="phase")
    rows = []
    started = time.perf_counter()
    try:
        for config in configs:
            for impl in impls:
                rows.append(run_config(config, impl, args.repeats, args.min_time, competitors, monitor,
                                       threshold=args.busy_threshold,
                                       on_phase=lambda what, c=config, i=impl: progress.step(
                                           f"{c.label} {i}: {what}")))
    finally:
        progress.close()
    elapsed = time.perf_counter() - started

    print()
    print(format_table(rows, cores, competitors))
    print()
    for line in footer(rows, cores, competitors, args.busy_threshold, monitor.available):
        print(line)
    print(f"{len(rows)} steps in {elapsed:.1f} s")
    failed = [r for r in rows if "error" in r or r.get("ok") is False]
    for r in failed:
        what = r.get("error") or f"max gradient error {r['max_grad_error']:.2e} against the float64 reference"
        print(f"FAILED {r['impl']} at T={r['T']} B={r['B']} D={r['D']} H={r['H']} O={r['O']}: {what}",
              file=sys.stderr)
    if args.json:
        doc = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": info,
               "cores": cores, "competitors": competitors, "bound": bound(cores, competitors),
               "pairs": args.repeats, "phase_min_s": args.min_time, "threshold": args.busy_threshold,
               "load_measured": monitor.available, "elapsed_s": elapsed, "implementations": impls,
               "results": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if failed else 0
