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
            break
        calls *= 2
    rounds = [elapsed / calls]
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
