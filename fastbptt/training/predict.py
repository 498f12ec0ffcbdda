"""``python -m fastbptt predict``: continue a text with a model saved by ``python -m fastbptt train``.

::

    python -m fastbptt predict --resume ck.npz --prefix "the time" -n 200
    python -m fastbptt predict --resume ck.npz --prefix "the time" -n 200 --temperature 0.8 --seed 1

The checkpoint must hold the vocabulary in its ``extra`` (``extra["vocab"]``, the tokens by
id: ``Vocab.idx_to_token``), as ``train --save`` writes it; a checkpoint saved from Python
needs ``fastbptt.checkpoint.save(path, model, extra={"vocab": vocab.idx_to_token})``.
Generation is ``fastbptt.predict``: greedy by default (``--greedy`` says so explicitly),
sampled at ``--temperature`` (seeded by ``--seed``). The text (prefix and continuation) goes
to standard output, alone, so it can be piped; every error is one line on standard error
with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import saving
from .charrnn import _seed, _temperature     # the flags train has too, parsed alike
from .generate import as_vocab, predict

PROG = "python -m fastbptt predict"


class UsageError(Exception):
    """A bad argument or checkpoint: reported in one line, exit status 2."""


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-n must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"-n must be an integer >= 0, got {value}")
    return value


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with a character-level model saved by 'python -m fastbptt train --save': "
                    "the prefix, then N more characters, printed to standard output.",
        epilog="The checkpoint must store its vocabulary (extra['vocab'], as train --save writes it). "
               "Exit status 0 done, 2 a bad argument or checkpoint (one line on standard error).")
    p.add_argument("--resume", metavar="PATH", required=True,
                   help="the checkpoint (.npz) written by 'python -m fastbptt train --save'")
    p.add_argument("--prefix", required=True,
                   help="text to continue; every character must be in the model's vocabulary")
    p.add_argument("-n", "--predict", metavar="N", type=_count, default=100, dest="n",
                   help="characters to generate (default: 100)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--temperature", type=_temperature, default=None,
                     help="sample each character from softmax(o / T) at this temperature > 0 "
                          "(0, or without this flag: greedy)")
    how.add_argument("--greedy", action="store_true",
                     help="pick the most likely character at each step (the default)")
    p.add_argument("--seed", type=_seed, default=None,
                   help="seed (an integer >= 0) of the sampling; without it, a fresh one each run")
    return p


def _checkpoint_vocab(path, extra):
    """The vocabulary a checkpoint stores in ``extra["vocab"]``, checked."""
    if not isinstance(extra, dict) or "vocab" not in extra:
        raise UsageError(f"checkpoint {path!r} holds no vocabulary (extra['vocab']); save it with "
                         f"extra={{'vocab': vocab.idx_to_token}}, as 'python -m fastbptt train --save' does")
    try:
        return as_vocab(extra["vocab"], name="the checkpoint's extra['vocab']")
    except (TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint {path!r}: {exc}") from None


def _check_prefix(prefix, vocab):
    if not prefix:
        raise UsageError("--prefix is empty: give at least one character to continue")
    unknown = [c for c in dict.fromkeys(prefix) if c not in vocab.token_to_idx]
    if unknown:
        shown = "".join(unknown[:20])
        raise UsageError(f"--prefix holds {len(unknown)} character(s) not in the model's vocabulary: "
                         f"{shown!r} (the vocabulary has {len(vocab)} tokens)")


def run(args):
    """Load, check and generate: the text, or a UsageError."""
    try:
        model, _, extra = saving.load(args.resume)
    except FileNotFoundError:
        raise UsageError(f"--resume: no file {args.resume!r}") from None
    except IsADirectoryError:
        raise UsageError(f"--resume: {args.resume!r} is a directory, not a checkpoint") from None
    except (saving.CheckpointError, ValueError, OSError) as exc:
        raise UsageError(f"--resume: {exc}") from None
    vocab = _checkpoint_vocab(args.resume, extra)
    if model.bidirectional:
        raise UsageError(f"checkpoint {args.resume!r} holds a bidirectional model, which reads a sequence from "
                         f"both ends and cannot generate one character after another")
    if model.input_size != len(vocab) or model.output_size != len(vocab):
        raise UsageError(f"checkpoint {args.resume!r}: the model has input size {model.input_size} and output "
                         f"size {model.output_size}, but its vocabulary has {len(vocab)} tokens")
    _check_prefix(args.prefix, vocab)
    temperature = 0.0 if args.greedy else args.temperature
    try:
        return predict(model, vocab, args.prefix, args.n, temperature=temperature, rng=args.seed)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def main(argv=None):
    """Run the command; returns the exit status (0 done, 2 bad arguments or checkpoint)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:               # --help (0) or an argparse error (2), already printed
        return int(exc.code or 0)
    try:
        text = run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)      # one line
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
