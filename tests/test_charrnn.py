"""``python -m fastbptt train``: a run, its outputs, resumption, and every kind of bad argument."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import pytest

from fastbptt import charrnn, checkpoint, optim
from fastbptt.model import RNN

SMALL = ["--hidden", "16", "--steps", "10", "--batch", "4", "--max-tokens", "3000", "--quiet"]
from helpers import TIME_MACHINE  # noqa: E402
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_d2l.py"


def run(capsys, *args):
    code = charrnn.main([*SMALL, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_trains_on_the_default_text_and_writes_json(capsys, tmp_path):
    code, out, err = run(capsys, "--epochs", "3", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "sample: the zen" in out          # the default text's first two words
    assert "perplexity" in out and "tokens/s" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result) == {"perplexity", "tokens_per_s", "epochs"}
    assert result["epochs"] == 3 and 1 < result["perplexity"] < 28 and result["tokens_per_s"] > 0
    assert f"perplexity {result['perplexity']:.2f}" in out


@pytest.mark.parametrize("flags", [["--sampling", "random", "--optimizer", "adagrad", "--lr", "0.1"],
                                   ["--random-truncation", "0.5", "--clip-value", "5", "--parallel"],
                                   ["--optimizer", "momentum", "--lr", "0.5", "--temperature", "0.7",
                                    "--dtype", "float64"]])
def test_other_options_run(capsys, flags):
    code, out, err = run(capsys, "--epochs", "2", *flags)
    assert code == 0, err
    assert "sample: the zen" in out


def test_own_text_file(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    code, out, err = run(capsys, "--text", str(text), "--epochs", "2", "--prefix", "the quick", "--predict", "5")
    assert code == 0, err
    assert "sample: the quick" in out


def test_resume_continues_bitwise(capsys, tmp_path):
    common = ["--optimizer", "adam", "--lr", "0.01", "--sampling", "random", "--random-truncation", "0.7"]
    assert run(capsys, *common, "--epochs", "4", "--save", str(tmp_path / "a.npz"))[0] == 0
    assert run(capsys, *common, "--epochs", "2", "--save", str(tmp_path / "b.npz"))[0] == 0
    code, out, err = run(capsys, *common, "--epochs", "4", "--resume", str(tmp_path / "b.npz"),
                         "--save", str(tmp_path / "c.npz"))
    assert code == 0, err
    a, b, c = (np.load(tmp_path / f"{n}.npz") for n in "abc")
    for key in ("model.flat", "optim.state.exp_avg", "optim.state.exp_avg_sq"):
        np.testing.assert_array_equal(a[key], c[key])
    assert not np.array_equal(a["model.flat"], b["model.flat"])


def test_progress_lines_without_tqdm(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)        # import tqdm now fails
    args = [a for a in SMALL if a != "--quiet"]
    code = charrnn.main([*args, "--epochs", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("epoch ") == 3 and "epoch     3/3  perplexity" in out


def test_help(capsys):
    assert charrnn.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--text", "--max-tokens", "--steps", "--batch", "--hidden", "--lr", "--clip", "--epochs",
                 "--sampling", "--optimizer", "--seed", "--json"):
        assert flag in out


@pytest.mark.parametrize("args,message", [
    (["--text", "/no/such/file.txt"], "--text: file '/no/such/file.txt' does not exist"),
    (["--max-tokens", "50"], "the default text gives 50 tokens (after --max-tokens), fewer than the 51 needed"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--lr", "-0.5"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--clip", "0"], "--clip (θ) must be a positive number, got 0.0"),
    (["--clip", "-1"], "--clip (θ) must be a positive number"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--random-truncation", "0"], "--random-truncation must be in (0, 1]"),
    (["--resume", "/no/such.npz"], "--resume: checkpoint '/no/such.npz' does not exist"),
    (["--json", "/no/such/dir/r.json"], "--json: directory '/no/such/dir' does not exist"),
    (["--sampling", "shuffled"], "invalid choice"),
    (["--optimizer", "rmsprop"], "invalid choice"),
    (["--hidden", "many"], "invalid int value"),
])
def test_bad_arguments_give_a_clear_message(capsys, args, message):
    code, out, err = run(capsys, "--epochs", "1", *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out


def test_short_corpus_file(capsys, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("too short")
    code, _, err = run(capsys, "--text", str(text))
    assert code == 2 and "gives 9 tokens" in err and "--batch 4" in err


def test_checkpoint_of_a_different_model(capsys, tmp_path):
    assert run(capsys, "--epochs", "1", "--save", str(tmp_path / "m.npz"))[0] == 0
    code, _, err = run(capsys, "--epochs", "2", "--hidden", "8", "--resume", str(tmp_path / "m.npz"))
    assert code == 2 and "--hidden 8 differs from the 16 that checkpoint" in err
    assert "cannot change when resuming; drop --hidden" in err
    code, _, err = run(capsys, "--epochs", "2", "--optimizer", "adam", "--resume", str(tmp_path / "m.npz"))
    assert code == 2 and "--optimizer adam differs from the sgd that checkpoint" in err
    code, _, err = run(capsys, "--epochs", "1", "--resume", str(tmp_path / "m.npz"))
    assert code == 2 and "already trained 1 epochs" in err
    model = RNN(28, 16, 28)
    checkpoint.save(tmp_path / "lib.npz", model, optim.SGD(model, lr=1.0))
    code, _, err = run(capsys, "--epochs", "2", "--resume", str(tmp_path / "lib.npz"))
    assert code == 2 and "was not written by 'python -m fastbptt train --save'" in err
    (tmp_path / "junk.npz").write_bytes(b"junk")
    code, _, err = run(capsys, "--epochs", "2", "--resume", str(tmp_path / "junk.npz"))
    assert code == 2 and "is not a fastbptt checkpoint" in err


def test_divergence_is_reported(capsys):
    code, out, err = run(capsys, "--epochs", "3", "--lr", "1e38", "--clip", "1e38")
    assert code == 1 and "training diverged" in err and "Traceback" not in err


@pytest.mark.skipif(not TIME_MACHINE.is_file(), reason=f"{TIME_MACHINE} is absent")
def test_time_machine(capsys, tmp_path):
    code, out, err = run(capsys, "--text", str(TIME_MACHINE), "--epochs", "1", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert math.isfinite(json.loads((tmp_path / "r.json").read_text())["perplexity"])


def test_python_dash_m_dispatches_train(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastbptt", "train", *SMALL, "--epochs", "1",
                           "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sample: the zen" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "fastbptt", "train", "--lr", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--lr must be a positive number" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not TIME_MACHINE.is_file(), reason=f"{TIME_MACHINE} is absent")
def test_reproduce_d2l_script_smoke(tmp_path):
    """The reproduction script, one epoch of a tiny model (with PyTorch when it is installed)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_d2l.py"
    proc = subprocess.run([sys.executable, str(script), "--epochs", "1", "--hidden", "8", "--batch", "4",
                           "--max-tokens", "2000", "--json", str(tmp_path / "rows.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| implementation | sampling | epochs | perplexity | tokens/s |" in proc.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    ours = [r for r in rows if r["implementation"].startswith("fastbptt")]
    assert [r["sampling"] for r in ours] == ["sequential", "random"]
    assert all(1 < r["perplexity"] < 28 and r["tokens_per_s"] > 0 for r in ours)


# ----------------------------------------------------------------------------- issue 7: honest output


def test_default_prefix_comes_from_the_training_text(capsys, tmp_path):
    """The default sample continues words the model has seen: the text's first two words."""
    text = tmp_path / "t.txt"
    text.write_text("Sphinx of black quartz, judge my vow.\n" * 40)
    code, out, err = run(capsys, "--text", str(text), "--epochs", "1", "--predict", "3")
    assert code == 0, err
    assert "sample: sphinx of" in out
    code, out, err = run(capsys, "--text", str(text), "--epochs", "1", "--prefix", "")
    assert code == 0, err and "sample:" not in out


def test_without_a_terminal_prints_clean_lines(capsys, monkeypatch):
    """Output to a file or CI (capsys is not a terminal): plain lines, no carriage-return bar, even with tqdm.

    A compilation (here a warm-up that compiles a new function, and takes a while) is announced
    in one line and its end in another.
    """
    pytest.importorskip("tqdm")
    warm_up = charrnn._warm_up

    def slow_warm_up(*args):
        numba.njit(lambda x: x + 1)(1)
        time.sleep(1.0)
        warm_up(*args)
    monkeypatch.setattr(charrnn, "_warm_up", slow_warm_up)
    args = [a for a in SMALL if a != "--quiet"]
    code = charrnn.main([*args, "--epochs", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "\r" not in out + err
    assert out.count("epoch ") == 3 and "epoch     3/3  perplexity" in out
    assert "compiling kernels (5-15 s the first time, cached afterwards) ...\n" in err
    assert "kernels ready after" in err


def test_on_a_terminal_the_bar_is_used(monkeypatch):
    monkeypatch.setattr(charrnn, "_is_terminal", lambda stream: True)
    pytest.importorskip("tqdm")
    assert charrnn._progress(5, 0, quiet=False) is not None
    assert charrnn._progress(5, 0, quiet=True) is None


def test_every_flag_has_help():
    for action in charrnn.build_parser()._actions:
        assert action.help, f"train {action.option_strings} has no help text"
    spec = importlib.util.spec_from_file_location("reproduce_d2l", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for action in script.build_parser()._actions:
        assert action.help, f"reproduce_d2l.py {action.option_strings} has no help text"


def test_top_level_help_is_plain_text():
    proc = subprocess.run([sys.executable, "-m", "fastbptt", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "``" not in proc.stdout and "train" in proc.stdout and "bench" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--seed", "x"], "--seed must be an integer >= 0, got 'x'"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "warm"], "--temperature must be a number >= 0"),
])
def test_seed_and_temperature_are_refused_at_parse_time(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        charrnn.build_parser().parse_args(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_text_that_is_a_directory_or_a_fifo(capsys, tmp_path):
    code, _, err = run(capsys, "--text", str(tmp_path))
    assert code == 2 and f"--text: file {str(tmp_path)!r} is a directory" in err
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "--text", str(fifo))       # opening it would wait for a writer forever
    assert code == 2 and "is a FIFO (named pipe); name a regular file" in err
    assert "does not exist" not in err


def test_tiny_temperature_samples_greedily(capsys):
    code, out, err = run(capsys, "--epochs", "2", "--temperature", "1e-320", "--predict", "10")
    assert code == 0, err
    greedy = run(capsys, "--epochs", "2", "--predict", "10")[1]
    assert out.splitlines()[-1] == greedy.splitlines()[-1]


def test_results_are_saved_before_the_sample(capsys, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("probabilities contain NaN")
    monkeypatch.setattr(charrnn, "predict", broken)
    code, out, err = run(capsys, "--epochs", "1", "--save", str(tmp_path / "m.npz"), "--json", str(tmp_path / "r.json"))
    assert code == 1 and "the sample failed (probabilities contain NaN); the results above are saved" in err
    assert checkpoint.load(tmp_path / "m.npz").extra["epoch"] == 1
    assert json.loads((tmp_path / "r.json").read_text())["epochs"] == 1
    assert "Traceback" not in err


def test_perplexity_that_overflows_is_divergence(capsys):
    """A mean loss above ~709 makes exp overflow: 'training diverged', not an OverflowError."""
    code, out, err = run(capsys, "--epochs", "5", "--lr", "1000", "--clip", "1000")
    assert code == 1 and "training diverged at epoch" in err
    assert "Traceback" not in err and "OverflowError" not in err


def test_a_huge_perplexity_is_not_printed_in_full(capsys):
    code, out, err = run(capsys, "--epochs", "5", "--lr", "100", "--clip", "100")
    assert code in (0, 1), err
    assert not re.search(r"\d{12}", out + err)              # never a 190-digit number on screen


def test_resume_from_a_checkpoint_with_nan_parameters_names_the_checkpoint(capsys, tmp_path):
    path = tmp_path / "a.npz"
    assert run(capsys, "--epochs", "2", "--save", str(path))[0] == 0
    with np.load(path) as f:
        members = {k: f[k] for k in f.files}
    members["model.flat"] = np.full_like(members["model.flat"], np.nan)
    np.savez(path, **members)
    code, out, err = run(capsys, "--epochs", "4", "--resume", str(path))
    assert code == 2
    assert "holds NaN or Inf parameters" in err and "check_finite" not in err


def test_a_text_that_is_not_utf8_is_named_by_its_flag(capsys, tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(bytes(range(128, 256)) * 4)
    code, out, err = run(capsys, "--text", str(path))
    assert code == 2 and "--text: text file" in err and "not UTF-8" in err
