"""No lost work: every output path is checked before training starts; damaged checkpoints exit 2."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastbptt import charrnn, checkpoint
from fastbptt._paths import check_output_path

SMALL = ["--hidden", "8", "--steps", "5", "--batch", "2", "--max-tokens", "500", "--quiet", "--epochs", "1"]
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_d2l.py"


# ----------------------------------------------------------------------------- the helper


def unwritable_paths(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {
        "directory": (str(tmp_path), "is a directory; name a file inside it"),
        "empty": ("", "the path is empty"),
        "blank": ("  ", "the path is empty"),
        "missing folder": (str(tmp_path / "no" / "r.json"), "does not exist; create it first"),
        "trailing separator": (str(tmp_path / "new") + os.sep, "names a directory"),
        "proc file": ("/proc/self/status", "cannot write '/proc/self/status'"),
        "new file in /proc": ("/proc/fastbptt-result.json", "cannot write '/proc/fastbptt-result.json'"),
        "fifo": (str(fifo), "is a FIFO (named pipe)"),
        "under a file": (str(tmp_path / "file.txt" / "r.json"), "cannot"),
    }


CASES = ["directory", "empty", "blank", "missing folder", "trailing separator", "proc file", "new file in /proc",
         "fifo", "under a file"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("replace", [False, True])
def test_check_output_path_refuses(tmp_path, case, replace):
    (tmp_path / "file.txt").write_text("x")
    path, message = unwritable_paths(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="^--out: .*" + re.escape(message.split("'")[0])):
        check_output_path(path, "--out", replace=replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_check_output_path_accepts_and_leaves_nothing_behind(tmp_path):
    existing = tmp_path / "old.json"
    existing.write_text("keep me")
    stamp = os.stat(existing).st_mtime_ns
    for replace in (False, True):
        assert check_output_path(tmp_path / "new.json", "--json", replace=replace) == str(tmp_path / "new.json")
        assert check_output_path(existing, "--json", replace=replace) == str(existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]        # nothing created, nothing left
    assert existing.read_text() == "keep me" and os.stat(existing).st_mtime_ns == stamp
    assert check_output_path("/dev/null", "--json") == "/dev/null"          # written directly: fine
    with pytest.raises(ValueError, match="not a regular file"):            # renamed over: never
        check_output_path("/dev/null", "--save", replace=True)
    with pytest.raises(TypeError, match="--json must be a path"):
        check_output_path(3, "--json")


# ----------------------------------------------------------------------------- the command line


@pytest.fixture
def no_training(monkeypatch):
    """Training that fails the test if it ever starts."""
    def must_not_train(*args, **kwargs):
        raise AssertionError("training started before the output paths were checked")
    monkeypatch.setattr(charrnn, "train", must_not_train)


@pytest.mark.parametrize("flag", ["--save", "--json"])
@pytest.mark.parametrize("case", CASES)
def test_train_checks_every_output_path_before_training(capsys, tmp_path, no_training, flag, case):
    (tmp_path / "file.txt").write_text("x")
    path, message = unwritable_paths(tmp_path)[case]
    code = charrnn.main([*SMALL, flag, path])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag}: " in err and message.split("'")[0] in err
    assert "Traceback" not in err


def test_save_and_json_must_differ(capsys, tmp_path, no_training):
    same = str(tmp_path / "out")
    assert charrnn.main([*SMALL, "--save", same, "--json", same]) == 2
    assert "--json and --save name the same file" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("some text " * 100)
    assert charrnn.main([*SMALL, "--text", str(text), "--json", str(text)]) == 2
    assert "--json and --text name the same file" in capsys.readouterr().err
    assert text.read_text() == "some text " * 100


def test_reproduce_script_checks_json_before_training(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the time traveller " * 200)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--text", str(text), "--json", str(tmp_path),
                           "--no-torch", "--epochs", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--json: " in proc.stderr and "is a directory" in proc.stderr
    assert "fastbptt, sequential" not in proc.stdout and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--text", str(tmp_path), "--no-torch"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--text: file" in proc.stderr and "is a directory" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--text", str(text), "--seed", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--seed must be an integer >= 0, got -1" in proc.stderr


def test_resume_from_a_damaged_checkpoint_exits_2(capsys, tmp_path):
    assert charrnn.main([*SMALL, "--save", str(tmp_path / "m.npz")]) == 0
    capsys.readouterr()
    with np.load(tmp_path / "m.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["model.flat"] = arrays["model.flat"][:-1]
    np.savez(tmp_path / "cut.npz", **arrays)
    code = charrnn.main([*SMALL, "--epochs", "2", "--resume", str(tmp_path / "cut.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "member 'model.flat.npy'" in err
    assert "--hidden" not in err                          # damage, not a model of another size
    np.savez(tmp_path / "more.npz", **arrays, payload=np.zeros(3))
    code = charrnn.main([*SMALL, "--epochs", "2", "--resume", str(tmp_path / "more.npz")])
    assert code == 2 and "unexpected member 'payload.npy'" in capsys.readouterr().err
    (tmp_path / "plain.npy").write_bytes(b"\x93NUMPY junk")
    code = charrnn.main([*SMALL, "--epochs", "2", "--resume", str(tmp_path / "plain.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "not a .npz (zip) archive" in err and "allow_pickle" not in err


def test_resume_with_a_tampered_epoch_count(capsys, tmp_path):
    assert charrnn.main([*SMALL, "--save", str(tmp_path / "m.npz")]) == 0
    capsys.readouterr()
    saved = checkpoint.load(tmp_path / "m.npz")
    extra = dict(saved.extra, epoch=-3)
    checkpoint.save(tmp_path / "t.npz", saved.model, saved.optimizer, extra=extra)
    code = charrnn.main([*SMALL, "--epochs", "2", "--resume", str(tmp_path / "t.npz")])
    assert code == 2 and "its epoch count -3 is not an int >= 0" in capsys.readouterr().err
    extra = dict(saved.extra, rng={"bit_generator": "nonsense"})
    checkpoint.save(tmp_path / "r.npz", saved.model, saved.optimizer, extra=extra)
    code = charrnn.main([*SMALL, "--epochs", "2", "--resume", str(tmp_path / "r.npz")])
    assert code == 2 and "generator cannot be restored" in capsys.readouterr().err


# ----------------------------------------------------------------------------- outputs against inputs


PAIRS = [("--json", "--save"), ("--save", "--text"), ("--json", "--text"), ("--json", "--resume")]
"""Every (output, other path) pair that must differ: --save may name --resume (the run continues in place)."""


def name_the_same_file(tmp_path, monkeypatch, how):
    """Two names of one existing file, ``how`` they are the same: (output's name, the other's name)."""
    target = tmp_path / "file"
    target.write_bytes(b"keep me")
    if how == "same name":
        return str(target), str(target)
    if how == "relative and absolute":
        monkeypatch.chdir(tmp_path)
        return "./sub/../file", str(target)
    (tmp_path / "sub").mkdir(exist_ok=True)
    if how == "symbolic link":
        os.symlink(target, tmp_path / "sub" / "link")
        return str(tmp_path / "sub" / "link"), str(target)
    os.link(target, tmp_path / "hard")
    return str(tmp_path / "hard"), str(target)


@pytest.mark.parametrize("how", ["same name", "relative and absolute", "symbolic link", "hard link"])
@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
def test_no_output_names_an_input_or_another_output(capsys, tmp_path, monkeypatch, no_training, pair, how):
    (tmp_path / "sub").mkdir()
    out_flag, other_flag = pair
    out_path, other_path = name_the_same_file(tmp_path, monkeypatch, how)
    code = charrnn.main([*SMALL, out_flag, out_path, other_flag, other_path])
    err = capsys.readouterr().err
    assert code == 2 and f"{out_flag} and {other_flag} name the same file" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "file").read_bytes() == b"keep me"


def test_two_outputs_through_a_link_to_a_file_not_yet_written(capsys, tmp_path, no_training):
    os.symlink(tmp_path / "new.json", tmp_path / "link.npz")           # dangling until written
    code = charrnn.main([*SMALL, "--save", str(tmp_path / "link.npz"), "--json", str(tmp_path / "new.json")])
    assert code == 2 and "--json and --save name the same file" in capsys.readouterr().err


def test_save_may_name_the_checkpoint_it_resumes(capsys, tmp_path):
    path = tmp_path / "m.npz"
    assert charrnn.main([*SMALL, "--save", str(path)]) == 0
    os.symlink(path, tmp_path / "link.npz")
    assert charrnn.main(["--resume", str(tmp_path / "link.npz"), "--save", str(path), "--epochs", "2", "--quiet",
                         "--prefix", ""]) == 0
    assert "saved" in capsys.readouterr().out
    assert checkpoint.load(path).extra["epoch"] == 2 and os.path.islink(tmp_path / "link.npz")
