"""``python -m fastbptt train``, Ctrl-C: the last whole step is saved (exit 130) and ``--resume`` continues bit for bit.

Every run is float64. The reference is the same run never interrupted; an interrupted run,
resumed, must end with exactly its file: parameters, optimizer state, both generators, and
every stored setting.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from fastbptt import charrnn, checkpoint, data, optim
from helpers import members

SMALL = ["--hidden", "16", "--steps", "10", "--batch", "4", "--max-tokens", "3000", "--dtype", "float64"]
CONFIGS = {
    "rnn-adam-truncation": ["--optimizer", "adam", "--lr", "0.01", "--random-truncation", "0.7"],
    "lstm-stack-dropout": ["--cell", "lstm", "--layers", "2", "--dropout", "0.3", "--optimizer", "momentum",
                           "--lr", "0.5"],
    "gru-random-sampling": ["--cell", "gru", "--sampling", "random", "--optimizer", "adagrad", "--lr", "0.1",
                            "--clip-value", "5"],
}


def batches_per_epoch():
    """Batches in an epoch of SMALL's corpus: the same for either sampling and every offset drawn."""
    corpus, _ = data.load_corpus(max_tokens=3000)
    counts = {sum(1 for _ in data.sequential_batches(corpus, 10, 4, seed)) for seed in range(40)}
    counts |= {sum(1 for _ in data.random_batches(corpus, 10, 4, seed)) for seed in range(40)}
    assert len(counts) == 1
    return counts.pop()


BATCHES = batches_per_epoch()



def assert_same_file(a, b):
    a, b = members(a), members(b)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def extra(path):
    return checkpoint.load(path).extra


def reference(tmp_path, flags, epochs):
    path = tmp_path / "reference.npz"
    code = charrnn.main([*SMALL, *flags, "--quiet", "--epochs", str(epochs), "--save", str(path), "--prefix", ""])
    assert code == 0
    return path


def cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "fastbptt", "train", *args], capture_output=True, text=True,
                          check=False, timeout=300, env={**os.environ, **(env or {})}, **kwargs)


@pytest.mark.parametrize("config", CONFIGS)
def test_ctrl_c_mid_epoch_saves_the_last_step_and_resume_continues_bitwise(capsys, tmp_path, config):
    flags = CONFIGS[config]
    ref = reference(tmp_path, flags, 3)
    path = tmp_path / "run.npz"
    step = BATCHES + 20                     # within the second epoch
    proc = cli(*SMALL, *flags, "--quiet", "--epochs", "3", "--save", str(path),
               env={charrnn.SIGINT_HOOK: str(step)})
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert f"of epoch 2/3; saved it to {path}: continue with --resume {path}" in proc.stderr
    saved = extra(path)
    done = saved["epoch"] * BATCHES + saved["position"]["batch"]
    assert saved["epoch"] == 1 and done == step             # the step Ctrl-C came in is whole and saved
    assert checkpoint.load(path).optimizer.state_dict()["t"] == step
    code = charrnn.main(["--resume", str(path), "--save", str(path), "--quiet", "--prefix", ""])
    capsys.readouterr()
    assert code == 0
    assert_same_file(ref, path)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_from_outside_at_any_moment_resumes_to_the_same_end(tmp_path, signum, status):
    """A real Ctrl-C (SIGINT from another process), or a scheduler's SIGTERM, sent once training is under way:
    wherever it lands (in a kernel, in the optimizer's update, between steps), the resumed run ends where an
    unbroken one does."""
    flags = CONFIGS["lstm-stack-dropout"]
    epochs = 30
    ref = reference(tmp_path, flags, epochs)
    path = tmp_path / "run.npz"
    proc = subprocess.Popen([sys.executable, "-m", "fastbptt", "train", *SMALL, *flags, "--epochs", str(epochs),
                             "--save", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:            # progress, not time: the third epoch line is out
            if line.startswith(f"epoch     6/{epochs}"):
                proc.send_signal(signum)
                break
        err = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    assert proc.returncode == status, err
    assert "Traceback" not in err and f"saved it to {path}" in err
    assert 6 <= extra(path)["epoch"] < epochs
    code = charrnn.main(["--resume", str(path), "--save", str(path), "--quiet", "--prefix", ""])
    assert code == 0
    assert_same_file(ref, path)


def test_ctrl_c_inside_the_optimizers_update_is_deferred_to_the_end_of_the_step(capsys, tmp_path, monkeypatch):
    """The dangerous place: SIGINT arriving after the step count has moved and before the parameters have."""
    flags = CONFIGS["rnn-adam-truncation"]
    ref = reference(tmp_path, flags, 2)
    update, calls = optim.Adam._update, []

    def update_hit_by_ctrl_c(self, p, g):
        if p.size > 100:                            # not the warm-up's scratch model
            calls.append(1)
            if len(calls) == 30:
                os.kill(os.getpid(), signal.SIGINT)     # its Python handler runs here, within the update
        update(self, p, g)
    monkeypatch.setattr(optim.Adam, "_update", update_hit_by_ctrl_c)
    path = tmp_path / "run.npz"
    try:
        code = charrnn.main([*SMALL, *flags, "--quiet", "--epochs", "2", "--save", str(path)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped train as a KeyboardInterrupt")
    err = capsys.readouterr().err
    assert code == 130 and "after step 30 of epoch 1/2" in err
    monkeypatch.setattr(optim.Adam, "_update", update)
    saved = checkpoint.load(path)
    assert saved.optimizer.state_dict()["t"] == 30 and saved.extra["position"]["batch"] == 30
    assert charrnn.main(["--resume", str(path), "--save", str(path), "--quiet", "--prefix", ""]) == 0
    assert_same_file(ref, path)


def test_ctrl_c_without_save_says_so_in_one_line(tmp_path):
    proc = cli(*SMALL, "--quiet", "--epochs", "3", cwd=tmp_path, env={charrnn.SIGINT_HOOK: "5"})
    assert proc.returncode == 130
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "interrupted after step 5 of epoch 1/3; nothing saved (pass --save PATH" in proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_ctrl_c_while_compiling_saves_nothing(tmp_path):
    path = tmp_path / "run.npz"
    proc = cli(*SMALL, "--epochs", "3", "--save", str(path), env={charrnn.SIGINT_HOOK: "0"})
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines()[-1] == ("python -m fastbptt train: interrupted before the first "
                                                    "training step; nothing saved")
    assert "Traceback" not in proc.stderr and not path.exists()


def test_resume_of_a_tampered_place_in_the_epoch_exits_2(capsys, tmp_path):
    path = tmp_path / "run.npz"
    assert charrnn.main([*SMALL, "--quiet", "--epochs", "1", "--save", str(tmp_path / "whole.npz")]) == 0
    saved = checkpoint.load(tmp_path / "whole.npz")
    good = {"batch": 3, "rng_epoch": saved.extra["rng"], "total": 9.5, "tokens": 120,
            "h": charrnn._encode_state(np.zeros((4, 16)))}
    cases = {"beyond the epoch": (dict(good, batch=10 ** 6), "lies beyond the epoch's"),
             "state of another shape": (dict(good, h=charrnn._encode_state(np.zeros((3, 16)))),
                                        "carried hidden state is not a float64 array of shape (4, 16)"),
             "state with NaN": (dict(good, h=charrnn._encode_state(np.full((4, 16), np.nan))), "holds NaN"),
             "no state": (dict(good, h=None), "does not fit --sampling sequential"),
             "a batch that is a string": (dict(good, batch="3"), "is not an int >= 1"),
             "a missing key": ({k: v for k, v in good.items() if k != "total"}, "place in the epoch must hold"),
             "a bad generator": (dict(good, rng_epoch={"bit_generator": "nonsense"}), "cannot be restored")}
    for name, (position, message) in cases.items():
        checkpoint.save(path, saved.model, saved.optimizer, extra=dict(saved.extra, position=position))
        code = charrnn.main(["--resume", str(path), "--epochs", "2", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "is damaged" in err and message in err, (name, err)
        assert "Traceback" not in err
    checkpoint.save(path, saved.model, saved.optimizer, extra=dict(saved.extra, position=good))
    assert charrnn.main(["--resume", str(path), "--epochs", "2", "--quiet", "--prefix", ""]) == 0
    json.dumps(good)                                  # what a checkpoint holds is plain JSON


def test_ctrl_c_in_the_final_evaluation_keeps_the_whole_run(capsys, tmp_path, monkeypatch):
    """With dropout the run ends by evaluating with it off; a Ctrl-C then still saves the run, complete."""
    flags = CONFIGS["lstm-stack-dropout"]
    ref = reference(tmp_path, flags, 2)
    evaluate = charrnn.evaluate

    def evaluate_hit_by_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(charrnn, "evaluate", evaluate_hit_by_ctrl_c)
    path, doc = tmp_path / "run.npz", tmp_path / "run.json"
    try:
        code = charrnn.main([*SMALL, *flags, "--quiet", "--epochs", "2", "--save", str(path), "--json", str(doc)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped train as a KeyboardInterrupt")
    err = capsys.readouterr().err
    # every epoch was done: the run is complete (no --resume to suggest), its files are written
    assert code == 130 and "interrupted after the run was complete and its results written" in err
    assert "--resume" not in err
    assert_same_file(ref, path)
    assert json.loads(doc.read_text())["epochs"] == 2 and "position" not in extra(path)


def test_ctrl_c_between_the_last_step_and_the_save_keeps_the_run(capsys, tmp_path, monkeypatch):
    """The summary line is printed after the last step and before the files (a slow terminal, a full pipe):
    a Ctrl-C there waits for the files to be written."""
    ref = reference(tmp_path, [], 2)
    summary = charrnn.format_perplexity

    def summary_hit_by_ctrl_c(value):
        if sys._getframe(1).f_code.co_name == "_main":
            os.kill(os.getpid(), signal.SIGINT)
        return summary(value)
    monkeypatch.setattr(charrnn, "format_perplexity", summary_hit_by_ctrl_c)
    path = tmp_path / "run.npz"
    code = charrnn.main([*SMALL, "--quiet", "--epochs", "2", "--save", str(path)])
    assert code == 130 and "interrupted after the run was complete" in capsys.readouterr().err
    assert_same_file(ref, path)


def test_a_second_ctrl_c_while_an_interrupted_run_is_saved_waits_for_the_save(capsys, tmp_path, monkeypatch):
    interrupted = charrnn._interrupted

    def second_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return interrupted(*args, **kwargs)
    monkeypatch.setattr(charrnn, "_interrupted", second_ctrl_c)
    monkeypatch.setenv(charrnn.SIGINT_HOOK, "5")               # the first Ctrl-C, before step 5
    path = tmp_path / "run.npz"
    code = charrnn.main([*SMALL, "--quiet", "--epochs", "3", "--save", str(path)])
    assert code == 130 and f"after step 5 of epoch 1/3; saved it to {path}" in capsys.readouterr().err
    assert extra(path)["position"]["batch"] == 5


def test_train_leaves_the_sigint_handler_as_it_found_it(tmp_path):
    corpus, vocab = data.load_corpus(max_tokens=3000)
    before = signal.getsignal(signal.SIGINT)
    charrnn.train(corpus, vocab, steps=10, batch=4, hidden=8, epochs=1)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_sigterm_handler_of_the_callers_own_is_left_in_place(tmp_path):
    corpus, vocab = data.load_corpus(max_tokens=3000)
    seen = []

    def own(signum, frame):
        seen.append(signum)
    before = signal.signal(signal.SIGTERM, own)
    try:
        hook = charrnn._Run.epoch

        def epoch_with_sigterm(self, *args):
            os.kill(os.getpid(), signal.SIGTERM)
            return hook(self, *args)
        charrnn._Run.epoch = epoch_with_sigterm
        try:
            result = charrnn.train(corpus, vocab, steps=10, batch=4, hidden=8, epochs=2)
        finally:
            charrnn._Run.epoch = hook
        assert seen == [signal.SIGTERM, signal.SIGTERM] and not result["interrupted"] and result["epochs"] == 2
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)
