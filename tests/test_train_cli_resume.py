"""``python -m fastbptt train --resume``: the run continues with the checkpoint's settings and architecture.

The rule (``--help``): a flag not given takes the checkpoint's value; a flag given that differs
is applied and reported (``charrnn.RESUME_APPLIED``) or refused (``charrnn.RESUME_FIXED``).
"""

import re

import numpy as np
import pytest

from fastbptt import charrnn, checkpoint
from helpers import members

# a run far from every default: a flag the resumed command forgets must not fall back to one
RUN = {"--cell": "gru", "--hidden": "12", "--layers": "2", "--dropout": "0.2", "--dtype": "float64",
       "--max-tokens": "2000", "--steps": "8", "--batch": "3", "--sampling": "random", "--optimizer": "adam",
       "--lr": "0.01", "--clip": "0.5", "--clip-value": "3", "--random-truncation": "0.7", "--seed": "3"}
FLAGS = [x for kv in RUN.items() for x in kv]
OTHER = {"--cell": "lstm", "--hidden": "8", "--layers": "3", "--dropout": "0.1", "--dtype": "float32",
         "--max-tokens": "2500", "--steps": "5", "--batch": "2", "--sampling": "sequential", "--optimizer": "sgd",
         "--seed": "4", "--lr": "0.002", "--clip": "2", "--clip-value": "0.01", "--random-truncation": "0.9"}
QUIET = ["--quiet", "--prefix", ""]
FIXED = ["cell", "hidden", "layers", "dropout", "dtype", "max_tokens", "steps", "batch", "sampling", "optimizer",
         "seed"]
APPLIED = ["lr", "clip", "clip_value", "random_truncation"]          # and epochs


def run(capsys, *args):
    code = charrnn.main([*QUIET, *args])
    out, err = capsys.readouterr()
    return code, out, err



@pytest.fixture
def runs(capsys, tmp_path):
    """An unbroken 3-epoch run (a.npz) and its first epoch (b.npz)."""
    assert run(capsys, *FLAGS, "--epochs", "3", "--save", str(tmp_path / "a.npz"))[0] == 0
    assert run(capsys, *FLAGS, "--epochs", "1", "--save", str(tmp_path / "b.npz"))[0] == 0
    return tmp_path / "a.npz", tmp_path / "b.npz"


def test_resume_with_only_the_epochs_continues_the_stored_run_bitwise(capsys, tmp_path, runs):
    a, b = runs
    code, out, err = run(capsys, "--resume", str(b), "--epochs", "3", "--save", str(tmp_path / "c.npz"))
    assert code == 0, err
    assert "resume: --epochs 3 applied (checkpoint" in err and "has 1)" in err
    assert "(gru, random, 3 epochs, T=8, B=3, H=12, L=2, dropout=0.2)" in out
    want, got = members(a), members(tmp_path / "c.npz")
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_the_learning_rate_is_the_checkpoints_not_the_default(capsys, tmp_path):
    """The issue's run: Adam at lr 0.01 resumed without --lr trained at the default 1.0 and diverged."""
    first = ["--optimizer", "adam", "--lr", "0.01", "--hidden", "16", "--steps", "10", "--batch", "4",
             "--max-tokens", "3000", "--dtype", "float64"]
    assert run(capsys, *first, "--epochs", "2", "--save", str(tmp_path / "a.npz"))[0] == 0
    assert run(capsys, *first, "--epochs", "1", "--save", str(tmp_path / "b.npz"))[0] == 0
    code, _, err = run(capsys, "--resume", str(tmp_path / "b.npz"), "--epochs", "2", "--save",
                       str(tmp_path / "b.npz"))
    assert code == 0, err
    assert checkpoint.load(tmp_path / "b.npz").optimizer.lr == 0.01
    np.testing.assert_array_equal(members(tmp_path / "a.npz")["model.flat"],
                                  members(tmp_path / "b.npz")["model.flat"])


@pytest.mark.parametrize("flag", FIXED)
def test_a_fixed_setting_that_differs_is_refused(capsys, runs, flag):
    flag = "--" + flag.replace("_", "-")
    b = runs[1]
    before = members(b)
    code, _, err = run(capsys, "--resume", str(b), "--epochs", "3", flag, OTHER[flag], "--save", str(b))
    assert code == 2 and "Traceback" not in err
    assert f"{flag} {OTHER[flag]} differs from the {RUN[flag]} that checkpoint" in err
    assert f"cannot change when resuming; drop {flag}" in err
    got = members(b)                                  # untouched
    assert all(np.array_equal(before[k], got[k]) for k in before)
    code, _, err = run(capsys, "--resume", str(b), "--epochs", "2", flag, RUN[flag])     # the same: fine
    assert code == 0 and "differs" not in err and "applied" not in err.replace("--epochs 2 applied", "")


@pytest.mark.parametrize("flag", APPLIED)
def test_a_setting_that_may_change_is_applied_and_reported(capsys, tmp_path, runs, flag):
    flag_name = "--" + flag.replace("_", "-")
    a, b = runs
    out_path = tmp_path / "c.npz"
    code, _, err = run(capsys, "--resume", str(b), "--epochs", "3", flag_name, OTHER[flag_name],
                       "--save", str(out_path))
    assert code == 0, err
    assert f"resume: {flag_name} {float(OTHER[flag_name])} applied (checkpoint {str(b)!r} has " \
           f"{float(RUN[flag_name])})" in err
    saved = checkpoint.load(out_path)
    assert saved.extra["train"][flag] == float(OTHER[flag_name])      # and the next resume keeps it
    if flag == "lr":
        assert saved.optimizer.lr == float(OTHER[flag_name])
    assert not np.array_equal(members(a)["model.flat"], members(out_path)["model.flat"])


def test_the_rule_covers_every_setting():
    assert sorted(charrnn.RESUME_FIXED) == sorted(FIXED)
    assert sorted(charrnn.RESUME_APPLIED) == sorted(APPLIED + ["epochs"])
    assert sorted(charrnn.DEFAULTS) == sorted(FIXED + APPLIED + ["epochs"])


def test_a_checkpoint_holds_every_setting_and_the_corpus(capsys, runs):
    extra = checkpoint.load(runs[0]).extra
    assert set(extra["train"]) == set(charrnn.DEFAULTS)
    given = vars(charrnn.build_parser().parse_args(FLAGS))
    for name, value in extra["train"].items():
        assert value == (3 if name == "epochs" else given[name]), name
    assert extra["corpus"]["tokens"] == 2000 and extra["corpus"]["text"] is None


def test_the_text_comes_from_the_checkpoint_and_another_text_is_refused(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    other = tmp_path / "o.txt"
    other.write_text("the lazy dog jumps over the quick brown fox\n" * 40)      # the same characters
    small = ["--hidden", "8", "--steps", "5", "--batch", "2"]
    assert run(capsys, *small, "--text", str(text), "--epochs", "1", "--save", str(tmp_path / "m.npz"))[0] == 0
    code, _, err = run(capsys, "--resume", str(tmp_path / "m.npz"), "--epochs", "2")
    assert code == 0, err
    assert f"resume: --text {text} (from the checkpoint)" in err
    code, _, err = run(capsys, "--resume", str(tmp_path / "m.npz"), "--epochs", "2", "--text", str(other))
    assert code == 2 and "is not the corpus checkpoint" in err and "pass that --text" in err
    code, _, err = run(capsys, "--resume", str(tmp_path / "m.npz"), "--epochs", "2", "--json", str(text))
    assert code == 2 and "--json and the text of checkpoint" in err and "name the same file" in err
    assert text.read_text().startswith("the quick")


def test_a_checkpoint_from_before_the_settings_were_stored(capsys, tmp_path):
    """Old files: the model and the optimizer (and its lr) from the file, the rest from the command line."""
    flags = ["--cell", "lstm", "--hidden", "12", "--optimizer", "adam", "--lr", "0.01", "--steps", "8",
             "--batch", "3", "--max-tokens", "2000", "--dtype", "float64"]
    assert run(capsys, *flags, "--epochs", "2", "--save", str(tmp_path / "a.npz"))[0] == 0
    assert run(capsys, *flags, "--epochs", "1", "--save", str(tmp_path / "b.npz"))[0] == 0
    saved = checkpoint.load(tmp_path / "b.npz")
    old = {k: saved.extra[k] for k in ("epoch", "rng", "vocab")}            # what the old CLI stored
    checkpoint.save(tmp_path / "old.npz", saved.model, saved.optimizer, extra=old)
    code, _, err = run(capsys, "--resume", str(tmp_path / "old.npz"), "--steps", "8", "--batch", "3",
                       "--max-tokens", "2000", "--epochs", "2", "--save", str(tmp_path / "c.npz"))
    assert code == 0, err
    assert "predates stored settings; --max-tokens, --steps, --batch, --clip, --clip-value, --epochs, " \
           "--sampling, --random-truncation, --seed come from the command line" in err
    np.testing.assert_array_equal(members(tmp_path / "a.npz")["model.flat"],
                                  members(tmp_path / "c.npz")["model.flat"])
    code, _, err = run(capsys, "--resume", str(tmp_path / "old.npz"), "--epochs", "2", "--hidden", "16")
    assert code == 2 and "--hidden 16 differs from the 12" in err


@pytest.mark.parametrize("case,message", [
    ({"steps": "8"}, "its stored setting steps = '8' is not a valid --steps"),
    ({"cell": "transformer"}, "its stored setting cell = 'transformer' is not a valid --cell"),
    ({"steps": -3}, "its stored settings are out of range: --steps must be a positive integer, got -3"),
    ({"hidden": 99}, "its stored setting hidden = 99 disagrees with its model"),
    ({"lr": True}, "its stored setting lr = 'True' is not a valid --lr"),
    ({"surprise": 1}, "its settings (extra['train']) must hold exactly"),
])
def test_damaged_stored_settings_exit_2(capsys, tmp_path, runs, case, message):
    saved = checkpoint.load(runs[1])
    settings = dict(saved.extra["train"], **case)
    checkpoint.save(tmp_path / "t.npz", saved.model, saved.optimizer, extra=dict(saved.extra, train=settings))
    code, _, err = run(capsys, "--resume", str(tmp_path / "t.npz"), "--epochs", "3")
    assert code == 2 and "is damaged" in err and message in err and "Traceback" not in err


def test_help_states_the_rule(capsys):
    assert charrnn.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "a flag not\ngiven takes the checkpoint's value" in out
    assert "applied, and reported: --lr, --clip, --clip-value, --random-truncation, --epochs" in out
    assert "refused: --cell, --hidden, --layers, --dropout, --dtype" in out
    assert re.search(r"--steps T, -T T +time steps per chunk \(default: 35\)", out)


@pytest.mark.parametrize("change", [{"has_uint32": 2}, {"uinteger": 2 ** 32}, {"state": {"state": -1, "inc": 1}},
                                    {"bit_generator": "MT19937", "state": {"key": [0] * 624, "pos": 2 ** 31 - 1}}])
def test_a_crafted_state_of_the_batches_generator_exits_2(capsys, tmp_path, runs, change):
    saved = checkpoint.load(runs[1])
    state = dict(saved.extra["rng"], **change)
    checkpoint.save(tmp_path / "t.npz", saved.model, saved.optimizer, extra=dict(saved.extra, rng=state))
    code, _, err = run(capsys, "--resume", str(tmp_path / "t.npz"), "--epochs", "3")
    assert code == 2 and "is damaged" in err and "batches' generator" in err and "Traceback" not in err
