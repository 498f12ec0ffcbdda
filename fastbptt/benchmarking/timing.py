"""What ``profile`` and ``benchmark`` share: best-of-N wall timing, and the size lists of their flags."""

import argparse
import time


def best_time(fn, repeats=5, min_time=0.02, warmup=1):
    """Best wall time of one call of ``fn``, in seconds.

    ``warmup`` calls run untimed first. Then a round calls ``fn`` enough times (1, 2, 4, ...)
    to last at least ``min_time``; the best round of ``repeats``, divided by its number of
    calls, is returned with the time of the first warm-up call (compilation, tracing).

    Returns
    -------
    best : float
        Seconds per call in the best round.
    rounds : list of float
        Seconds per call in each round.
    first : float or None
        Seconds of the first warm-up call.
    """
    calls, first, elapsed = calibrate(fn, min_time, warmup)
    rounds = [elapsed]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls)
    return min(rounds), rounds, first


def positive_ints(text):
    """Parse "10,100,1000" for argparse: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def calibrate(fn, min_time=0.02, warmup=1):
    """How many calls of ``fn`` (1, 2, 4, ...) a round needs to last ``min_time``, after ``warmup`` untimed calls.

    Returns
    -------
    calls : int
    first : float or None
        Seconds of the first warm-up call.
    elapsed : float
        Seconds per call of the last calibration round (a first round).
    """
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - start
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or calls >= 1 << 20:
            return calls, first, elapsed / calls
        calls *= 2


def best_times_interleaved(fns, repeats=5, min_time=0.02, warmup=1, pause=0.0):
    """``best_time`` for several functions whose rounds are taken in turn: one round of each, then again.

    On a machine whose other load comes and goes, timing one function's rounds after
    another's lets a quiet spell favour one of them; in turn, each gets its share of the
    quiet and of the busy spells, and their ratio is fairer.

    Parameters
    ----------
    fns : dict
        name -> ``fn`` or (``fn``, repeats of its own).
    pause : float
        Seconds to sleep before each round (for the thread pools of the one before to go idle).

    Returns
    -------
    dict name -> (best, rounds, first) as ``best_time`` returns them, or name -> the
    exception a call of that function raised (it takes no further rounds).
    """
    plan, out = {}, {}
    for name, value in fns.items():
        fn, n = value if isinstance(value, tuple) else (value, repeats)
        try:
            time.sleep(pause)
            calls, first, elapsed = calibrate(fn, min_time, warmup)
        except Exception as exc:  # noqa: BLE001 -- the caller reports it
            out[name] = exc
            continue
        plan[name] = (fn, n, calls, first, [elapsed])
    for r in range(1, max((p[1] for p in plan.values()), default=0)):
        for name, (fn, n, calls, _, rounds) in plan.items():
            if r >= n or name in out:
                continue
            time.sleep(pause)
            try:
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                rounds.append((time.perf_counter() - start) / calls)
            except Exception as exc:  # noqa: BLE001
                out[name] = exc
    for name, (_, _, _, first, rounds) in plan.items():
        out.setdefault(name, (min(rounds), rounds, first))
    return out
