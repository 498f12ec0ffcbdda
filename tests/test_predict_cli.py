"""``python -m fastbptt predict`` (fastbptt.training.predict), and ``fastbptt.predict`` taking the vocabulary
a checkpoint stores (a list of tokens by id)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastbptt
from fastbptt import checkpoint, data

TIMEMACHINE = "/work/shared/data/timemachine.txt"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fastbptt", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint written by ``python -m fastbptt train --save`` (The Time Machine when it is on this
    machine, else the text that ships with Python), and the text's prefix."""
    where = tmp_path_factory.mktemp("train")
    text = ["--text", TIMEMACHINE] if os.path.exists(TIMEMACHINE) else []
    proc = _cli("train", *text, "--cell", "gru", "--layers", "2", "--hidden", "24", "--steps", "12",
                "--batch", "8", "--max-tokens", "4000", "--epochs", "3", "--lr", "1", "--quiet",
                "--prefix", "", "--save", str(where / "ck.npz"), cwd=where)
    assert proc.returncode == 0, proc.stderr
    return where / "ck.npz"


def _oracle(path, prefix, n, **kwargs):
    model, _, extra = checkpoint.load(path)
    return fastbptt.predict(model, extra["vocab"], prefix, n, **kwargs)


def test_predict_a_checkpoint_of_train_end_to_end(trained, tmp_path):
    vocab = checkpoint.load(trained).extra["vocab"]
    prefix = "the time" if all(c in vocab for c in "the time") else vocab[1] * 3
    proc = _cli("predict", "--resume", str(trained), "--prefix", prefix, "-n", "60", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    text = proc.stdout[:-1]
    assert proc.stdout.endswith("\n") and text.startswith(prefix)
    assert text == _oracle(trained, prefix, 60)                       # greedy: the same every time
    proc = _cli("predict", "--resume", str(trained), "--prefix", prefix, "-n", "60", "--greedy", cwd=tmp_path)
    assert proc.stdout[:-1] == text
    sampled = _cli("predict", "--resume", str(trained), "--prefix", prefix, "-n", "80", "--temperature", "1.5",
                   "--seed", "7", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout[:-1] == _oracle(trained, prefix, 80, temperature=1.5, rng=7)
    assert sampled.stdout[:-1] != text


def test_predict_a_checkpoint_saved_from_python(tmp_path, capsys):
    from fastbptt.training import predict as predict_cli
    rng = np.random.default_rng(0)
    corpus, vocab = data.load_corpus(None, max_tokens=3000)
    model = fastbptt.LSTM(len(vocab), 20, len(vocab), seed=1)
    opt = fastbptt.optim.make_optimizer("adam", model, 0.01)
    ws = fastbptt.Workspace(model, 10, 4)
    for _ in range(5):
        start = rng.integers(0, corpus.size - 11, 4)
        X = np.stack([corpus[s:s + 10] for s in start], axis=1)
        Y = np.stack([corpus[s + 1:s + 11] for s in start], axis=1)
        fastbptt.training.train_step(model, X, Y, opt, workspace=ws, clip=1.0)
    path = tmp_path / "api.npz"
    checkpoint.save(path, model, opt, extra={"vocab": vocab.idx_to_token})
    prefix = "".join(vocab.to_tokens(corpus[:6]))
    assert predict_cli.main(["--resume", str(path), "--prefix", prefix, "-n", "40", "--temperature", "0.7",
                             "--seed", "3"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out == fastbptt.predict(model, vocab, prefix, 40, temperature=0.7, rng=3) + "\n"
    assert predict_cli.main(["--resume", str(path), "--prefix", prefix, "-n", "0"]) == 0
    assert capsys.readouterr().out == prefix + "\n"
    proc = _cli("predict", "--resume", str(path), "--prefix", prefix, "-n", "25", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == fastbptt.predict(model, vocab, prefix, 25) + "\n"


def _saved(tmp_path, name, model, extra):
    path = tmp_path / name
    checkpoint.save(path, model, extra=extra)
    return str(path)


def test_predict_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from fastbptt.training import predict as predict_cli
    vocab = data.Vocab(list("hello world"))
    tokens = vocab.idx_to_token
    good = _saved(tmp_path, "good.npz", fastbptt.GRU(len(vocab), 8, len(vocab)), {"vocab": tokens})
    damaged = tmp_path / "damaged.npz"
    with open(good, "rb") as f:
        damaged.write_bytes(f.read()[:300])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    cases = {
        "no file": (["--resume", str(tmp_path / "missing.npz"), "--prefix", "he"], "no file"),
        "a directory": (["--resume", str(tmp_path), "--prefix", "he"], "directory"),
        "truncated": (["--resume", str(damaged), "--prefix", "he"], "--resume"),
        "garbage": (["--resume", str(garbage), "--prefix", "he"], "--resume"),
        "unknown characters": (["--resume", good, "--prefix", "hex?"], "'x?'"),
        "empty prefix": (["--resume", good, "--prefix", ""], "--prefix is empty"),
        "no vocabulary": (["--resume", _saved(tmp_path, "novocab.npz", fastbptt.GRU(len(vocab), 8, len(vocab)),
                                              {"epoch": 3}), "--prefix", "he"], "holds no vocabulary"),
        "no extra": (["--resume", _saved(tmp_path, "noextra.npz", fastbptt.GRU(len(vocab), 8, len(vocab)),
                                         None), "--prefix", "he"], "holds no vocabulary"),
        "vocabulary not a list": (["--resume", _saved(tmp_path, "str.npz", fastbptt.GRU(len(vocab), 8, len(vocab)),
                                                      {"vocab": "helo wrd"}), "--prefix", "he"], "list of str"),
        "vocabulary of numbers": (["--resume", _saved(tmp_path, "num.npz", fastbptt.GRU(3, 8, 3),
                                                      {"vocab": ["<unk>", 1, 2]}), "--prefix", "he"],
                                  "extra['vocab'][1] must be a str"),
        "token twice": (["--resume", _saved(tmp_path, "twice.npz", fastbptt.GRU(3, 8, 3),
                                            {"vocab": ["<unk>", "h", "h"]}), "--prefix", "h"], "twice"),
        "sizes differ": (["--resume", _saved(tmp_path, "size.npz", fastbptt.GRU(len(vocab) + 1, 8, len(vocab) + 1),
                                             {"vocab": tokens}), "--prefix", "he"], "input size"),
        "bidirectional": (["--resume", _saved(tmp_path, "bi.npz", fastbptt.GRU(len(vocab), 8, len(vocab),
                                                                                bidirectional=True),
                                              {"vocab": tokens}), "--prefix", "he"], "bidirectional"),
        "negative n": (["--resume", good, "--prefix", "he", "-n", "-1"], "-n must be an integer >= 0"),
        "n not a number": (["--resume", good, "--prefix", "he", "-n", "ten"], "-n must be an integer"),
        "bad temperature": (["--resume", good, "--prefix", "he", "--temperature", "-1"], "--temperature"),
        "greedy and temperature": (["--resume", good, "--prefix", "he", "--temperature", "1", "--greedy"],
                                   "not allowed with"),
        "bad seed": (["--resume", good, "--prefix", "he", "--seed", "-3"], "--seed"),
        "no --resume": (["--prefix", "he"], "--resume"),
    }
    for name, (argv, says) in cases.items():
        assert predict_cli.main(argv) == 2, name
        out = capsys.readouterr()
        assert out.out == "", name
        lines = out.err.strip().splitlines()
        assert says in lines[-1], (name, out.err)
        if not name.startswith(("negative", "n not", "bad", "greedy", "no --")):    # not argparse's usage
            assert len(lines) == 1 and lines[0].startswith("python -m fastbptt predict: error: "), (name, out.err)
            assert "Traceback" not in out.err


def test_predict_takes_the_vocabulary_a_checkpoint_stores():
    vocab = data.Vocab(list("the quick brown fox"))
    model = fastbptt.LSTM(len(vocab), 12, len(vocab), num_layers=2, seed=4)
    want = fastbptt.predict(model, vocab, "the q", 30, temperature=0.9, rng=2)
    assert fastbptt.predict(model, list(vocab.idx_to_token), "the q", 30, temperature=0.9, rng=2) == want
    assert fastbptt.predict(model, tuple(vocab.idx_to_token), "the q", 30, temperature=0.9, rng=2) == want
    assert fastbptt.predict(model, vocab.idx_to_token, ["t", "h"], 5) == fastbptt.predict(model, vocab, ["t", "h"], 5)
    assert fastbptt.predict(model, vocab.idx_to_token, "thz", 4) == fastbptt.predict(model, vocab, "thz", 4)
    tokens = vocab.idx_to_token
    with pytest.raises(TypeError, match=r"vocab\[2\] must be a str"):
        fastbptt.predict(model, tokens[:2] + [7] + tokens[3:], "the", 3)
    with pytest.raises(ValueError, match="twice"):
        fastbptt.predict(model, tokens[:-1] + [tokens[1]], "the", 3)
    with pytest.raises(ValueError, match=r"vocab\[3\] is the empty string"):
        fastbptt.predict(model, tokens[:3] + [""] + tokens[4:], "the", 3)
    with pytest.raises(ValueError, match="empty"):
        fastbptt.predict(fastbptt.LSTM(1, 2, 1), [], "the", 3)
    with pytest.raises(TypeError, match="Vocab or a list of str"):
        fastbptt.predict(model, "".join(tokens[1:]), "the", 3)
    with pytest.raises(TypeError, match="Vocab or a list of str"):
        fastbptt.predict(model, dict(vocab.token_to_idx), "the", 3)
    with pytest.raises(ValueError, match="but the vocabulary has"):
        fastbptt.predict(model, tokens[:-1], "the", 3)
    # without '<unk>' at id 0, an unknown token has nowhere to go
    no_unk = tokens[1:] + ["#"]
    assert fastbptt.predict(model, no_unk, "the", 3).startswith("the")
    with pytest.raises(ValueError, match=r"lacks.*\['z'\]"):
        fastbptt.predict(model, no_unk, "thez", 3)
    assert tokens == vocab.idx_to_token                                  # not changed
