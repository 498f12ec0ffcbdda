"""Progress for the long commands: a tqdm bar on a terminal, plain lines anywhere else.

A carriage-return bar written into a file or a CI log is a mess of partial lines, so a
bar is drawn only when the stream is a terminal and tqdm is installed; otherwise each
stage is one plain line. ``compiling()`` tells about the first compilation of the kernels,
the one long silent wait of a first run.
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
def compiling(enabled=True, stream=None, after=0.5, text=COMPILE_TEXT):
    """Say that the kernels are compiling when the block takes longer than ``after`` seconds.

    A warm on-disk cache loads them in a fraction of a second, and then nothing is shown.
    Otherwise a terminal gets a tqdm line with the elapsed time (a background thread
    refreshes it: Numba and LLVM let it run), and anything else one line when the wait
    starts and one when it ends.

    Parameters
    ----------
    enabled : bool
        False shows nothing.
    stream : file, optional
        Default ``sys.stderr``.
    after : float
        Seconds of silence before anything is shown.
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

    def notice():
        if done.wait(after):
            return
        shown.set()
        if tqdm is None:
            print(f"{text} ...", file=stream, flush=True)
            return
        bar = tqdm(total=None, desc=text, file=stream, bar_format="{desc}: {elapsed}", leave=False)
        while not done.wait(0.2):
            bar.refresh()
        bar.close()

    thread = threading.Thread(target=notice, name="fastbptt-compile-notice", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if shown.is_set():
            print(f"kernels ready after {time.perf_counter() - started:.1f} s", file=stream, flush=True)
