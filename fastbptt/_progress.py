"""Progress for the long commands: a tqdm bar on a terminal, plain lines anywhere else.

A carriage-return bar written into a file or a CI log is a mess of partial lines, so a
bar is drawn only when the stream is a terminal and tqdm is installed; otherwise each
stage is one plain line. ``compiling()`` tells about a compilation of the kernels (Numba's
compile events: a warm cache shows nothing), the one long silent wait of a first run.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

#: What a first run waits for, said while it waits.
COMPILE_TEXT = "compiling kernels (first run only, several seconds; cached afterwards)"


def is_terminal(stream):
    """Whether ``stream`` is an interactive terminal."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):          # no isatty, or a closed stream
        return False


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """Progress over ``total`` stages: a tqdm bar on a terminal, else one line per stage.

    Parameters
    ----------
    total : int
        Number of ``step`` calls expected.
    enabled : bool
        False prints nothing at all.
    stream : file, optional
        Where progress goes (default ``sys.stderr``).
    unit : str
        tqdm's unit.
    lines : bool
        Whether to print a plain line per stage where there is no bar (False: when the
        caller's own output already shows the progress).
    """

    def __init__(self, total, enabled=True, stream=None, unit="step", lines=True):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.done = total, 0
        self.bar = None
        self.lines = False
        if not enabled:
            return
        tqdm = _tqdm() if is_terminal(self.stream) else None
        if tqdm is not None:
            self.bar = tqdm(total=total, unit=unit, file=self.stream, dynamic_ncols=True)
        elif lines:
            self.lines = True
            if is_terminal(self.stream):
                print("(tqdm is not installed: plain progress lines; pip install tqdm for a bar)",
                      file=self.stream, flush=True)

    def step(self, text):
        """Start the next stage, described by ``text``."""
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.set_description(text)
        elif self.lines:
            print(f"[{self.done + 1}/{self.total}] {text}", file=self.stream, flush=True)
        self.done += 1

    def write(self, line, file=None):
        """Print ``line`` (to stdout by default) without breaking the bar."""
        file = sys.stdout if file is None else file
        if self.bar is not None:
            self.bar.write(line, file=file)
            file.flush()
        else:
            print(line, file=file, flush=True)

    def close(self):
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def _watching_compiles():
    """An Event set once Numba starts a compilation within the block.

    Numba fires ``numba:compile`` only when it compiles: a kernel loaded from the on-disk
    cache (or already in memory) fires nothing.
    """
    started = threading.Event()
    try:
        from numba.core import event
    except ImportError:                 # pragma: no cover - every supported Numba has it
        yield started
        return

    class Watch(event.Listener):
        def on_start(self, ev):
            started.set()

        def on_end(self, ev):
            pass

    watch = Watch()
    event.register("numba:compile", watch)
    try:
        yield started
    finally:
        event.unregister("numba:compile", watch)


@contextlib.contextmanager
def compiling(enabled=True, stream=None, after=0.5, text=COMPILE_TEXT):
    """Say that the kernels are compiling, when Numba compiles one and the block has taken ``after`` seconds.

    A kernel loaded from the on-disk cache is not a compilation (Numba fires its compile
    event only on a cache miss), so a warm run shows nothing however long loading takes.
    When Numba does compile, a terminal gets a tqdm line with the elapsed time (a background
    thread refreshes it: Numba and LLVM let it run), and anything else one line when the
    notice starts and one when the block ends.

    Parameters
    ----------
    enabled : bool
        False shows nothing.
    stream : file, optional
        Default ``sys.stderr``.
    after : float
        Seconds of silence before anything is shown (a compile must also have started).
    text : str
        What is being waited for.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        yield
        return
    done = threading.Event()
    shown = threading.Event()
    tqdm = _tqdm() if is_terminal(stream) else None
    started = time.perf_counter()

    def notice(compile_started):
        while not done.wait(0.05):      # until a compile has started and `after` has passed
            if compile_started.is_set() and time.perf_counter() - started >= after:
                break
        else:
            return
        shown.set()
        if tqdm is None:
            print(f"{text} ...", file=stream, flush=True)
            return
        bar = tqdm(total=None, desc=text, file=stream, bar_format="{desc}: {elapsed}", leave=False)
        while not done.wait(0.2):
            bar.refresh()
        bar.close()

    with _watching_compiles() as watch:
        thread = threading.Thread(target=notice, args=(watch,), name="fastbptt-compile-notice", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
    if shown.is_set():
        print(f"kernels ready after {time.perf_counter() - started:.1f} s", file=stream, flush=True)
