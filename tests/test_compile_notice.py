"""The "compiling kernels" notice (``fastbptt._progress.compiling``): shown only when Numba compiles.

Numba fires its ``numba:compile`` event only on a real compilation; a kernel loaded from the
on-disk cache fires nothing, so a warm run, however slowly it loads, shows no notice.
"""

import io
import os
import subprocess
import sys
import time

import numba

from fastbptt import _progress, charrnn

SMALL = ["--hidden", "8", "--steps", "5", "--batch", "2", "--max-tokens", "500", "--epochs", "1", "--prefix", ""]


def test_a_slow_block_that_compiles_nothing_shows_nothing():
    stream = io.StringIO()
    with _progress.compiling(stream=stream, after=0):
        time.sleep(0.5)                       # loading a cache, say: slow, but no compilation
    assert stream.getvalue() == ""


def test_a_compilation_is_announced_and_its_end():
    stream = io.StringIO()
    with _progress.compiling(stream=stream, after=0):
        numba.njit(lambda x: x * 2 + 1)(3)    # a new function: a real compilation
        for _ in range(500):                  # wait (not time) for the notice thread
            if "compiling" in stream.getvalue():
                break
            time.sleep(0.01)
    lines = stream.getvalue().splitlines()
    assert lines[0] == _progress.COMPILE_TEXT + " ..." and lines[1].startswith("kernels ready after ")


def test_train_with_a_slow_warm_up_that_compiles_nothing_prints_no_notice(capsys, monkeypatch):
    warm_up = charrnn._warm_up

    def slow_warm_up(*args):
        time.sleep(1.0)                       # well past the notice's 0.5 s
        warm_up(*args)
    monkeypatch.setattr(charrnn, "_warm_up", slow_warm_up)
    assert charrnn.main(SMALL) == 0
    err = capsys.readouterr().err
    assert "compiling kernels" not in err and "kernels ready" not in err


def test_a_second_run_on_a_warm_cache_prints_no_notice(tmp_path):
    runs = [subprocess.run([sys.executable, "-m", "fastbptt", "train", *SMALL], capture_output=True, text=True,
                           check=False, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
            for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    first, second = (proc.stderr for proc in runs)
    assert ("compiling kernels" in first) == ("kernels ready after" in first)   # if the first compiled
    assert "compiling kernels" not in second and "kernels ready" not in second, second
