"""``python -m fastbptt train``: a loss, gradient or parameter that becomes NaN or Inf stops the run at that step.

Exit 1, one line naming the epoch and the step, and nothing saved: a checkpoint written before
(the one resumed, or any file at --save) is left exactly as it was.
"""

import re

import pytest

from fastbptt import charrnn

SMALL = ["--hidden", "16", "--steps", "10", "--batch", "4", "--max-tokens", "3000", "--quiet", "--prefix", ""]
BLOW_UP = ["--lr", "1e38", "--clip", "1e38"]


@pytest.fixture
def steps(monkeypatch):
    """The training steps taken."""
    taken, step = [], charrnn.train_step

    def counted(*args, **kwargs):
        taken.append(1)
        return step(*args, **kwargs)
    monkeypatch.setattr(charrnn, "train_step", counted)
    return taken


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_divergence_stops_at_its_step_and_keeps_the_resumed_checkpoint(capsys, tmp_path, steps, dtype):
    path = tmp_path / "m.npz"
    assert charrnn.main([*SMALL, "--dtype", dtype, "--epochs", "1", "--save", str(path)]) == 0
    capsys.readouterr()
    good = path.read_bytes()
    steps.clear()
    code = charrnn.main(["--resume", str(path), "--epochs", "5", *BLOW_UP, "--save", str(path), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert [line.startswith("resume: ") for line in err.splitlines()] == [True] * 3 + [False]   # one line of it
    found = re.search(r"training diverged at epoch 2, step (\d+): (the parameters became NaN or Inf|the loss is "
                      r"(nan|inf|[-+.e\d]+, and its perplexity overflows)|the gradient's norm is (nan|inf));", err)
    assert found, err
    step = int(found.group(1))
    assert len(steps) == step < 10                    # stopped there, not at the end of the epoch (74 steps)
    assert "nothing was saved (an earlier checkpoint is left as it was)" in err
    assert path.read_bytes() == good and "saved" not in out


def test_a_diverged_new_run_does_not_replace_the_file_at_save(capsys, tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(b"an earlier, good checkpoint")
    code = charrnn.main([*SMALL, "--epochs", "3", *BLOW_UP, "--save", str(path), "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 1 and re.search(r"training diverged at epoch 1, step \d+: ", err)
    assert path.read_bytes() == b"an earlier, good checkpoint" and not (tmp_path / "r.json").exists()
