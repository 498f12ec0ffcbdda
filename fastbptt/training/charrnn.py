"""``python -m fastbptt train``: a character-level RNN language model, d2l's recipe by default.

``--cell rnn|gru|lstm`` picks the recurrent cell (the Elman RNN by default); every other
flag means the same for each, and the checkpoint records the cell, so ``--resume``
refuses a checkpoint of another one. ``--layers N`` stacks N layers, with ``--dropout p``
between them (on each layer's output but the last, while training; off for the final
evaluation and the sample); the checkpoint records both, and the dropout generator's
state, so a resumed run draws the masks an unbroken one would. A language model reads
left to right, so there is no bidirectional flag (see ``examples/bidirectional_tagger.py``).

Defaults follow Dive into Deep Learning's from-scratch RNN on The Time Machine: the first
10,000 characters, T = 35 steps, B = 32 sequences, H = 512 hidden units, weights from
N(0, 0.01²), zero biases, plain SGD with lr = 1, gradients clipped to norm θ = 1,
500 epochs, sequential partitioning. Without ``--text`` it trains on a text that ships
with Python (``fastbptt.data.default_text``: the Zen of Python and the docstrings of a
few standard modules), so it runs offline anywhere; ``--text timemachine.txt`` gives
the book's corpus.

Every argument and output path is checked before anything is built. At the end it
saves the checkpoint and the JSON (``--save``, ``--json``), then prints a continuation
of the prefix (by default the text's first two words), the final perplexity (of the
last epoch) and tokens per second (over all epochs, compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from .._paths import check_output_path
from .._progress import compiling
from ..core import api
from ..core.model import CELLS
from ..core.workspace import Workspace
from . import data, optim
from . import saving as checkpoint
from .generate import predict
from .tbptt import _carry_weight, evaluate, train_epoch

PROG = "python -m fastbptt train"
COMPILE_TEXT = "compiling kernels (5-15 s the first time, cached afterwards)"


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _seed(text):
    """--seed: an int >= 0, refused at parse time."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--seed must be an integer >= 0, got {value}")
    return value


def _dropout(text):
    """--dropout: a probability in [0, 1), refused at parse time."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dropout must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"--dropout must be a number in [0, 1), got {text}")
    return value


def _temperature(text):
    """--temperature: a finite number >= 0 (0 is greedy), refused at parse time."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--temperature must be a number >= 0, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"--temperature must be a finite number >= 0 (0: greedy), "
                                         f"got {text}")
    return value


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Train a character-level RNN language model with fastbptt; the sizes and "
                    "hyperparameters default to Dive into Deep Learning's recipe for The Time "
                    "Machine (the text itself is --text).",
        epilog="Without --text the corpus is a text that ships with Python (the Zen of Python and "
               "standard-library docstrings, about 17,000 characters). The Time Machine is "
               "Project Gutenberg's public-domain text; d2l's copy is timemachine.txt.")
    p.add_argument("--text", metavar="PATH",
                   help="UTF-8 text file to train on (default: a text that ships with Python)")
    p.add_argument("--max-tokens", metavar="N", type=int, default=10000,
                   help="train on the first N characters (0: all)")
    p.add_argument("--steps", "-T", metavar="T", type=int, default=35, help="time steps per chunk")
    p.add_argument("--batch", "-B", metavar="B", type=int, default=32, help="sequences per batch")
    p.add_argument("--cell", choices=tuple(CELLS), default="rnn",
                   help="the recurrent cell: Elman RNN, GRU or LSTM (PyTorch's gates)")
    p.add_argument("--hidden", metavar="H", type=int, default=512, help="hidden units")
    p.add_argument("--layers", metavar="N", type=int, default=1, help="stacked recurrent layers")
    p.add_argument("--dropout", metavar="P", type=_dropout, default=0.0,
                   help="dropout between the stacked layers while training (needs --layers 2 or more)")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate")
    p.add_argument("--clip", metavar="THETA", type=float, default=1.0,
                   help="clip the gradient's global L2 norm to THETA")
    p.add_argument("--clip-value", metavar="C", type=float, default=None,
                   help="also clamp every gradient element to [-C, C] (min-char-rnn uses 5)")
    p.add_argument("--epochs", type=int, default=500, help="epochs (in total, when resuming)")
    p.add_argument("--sampling", choices=("sequential", "random"), default="sequential",
                   help="minibatches: sequential partitioning (state carried) or random sampling")
    p.add_argument("--optimizer", choices=sorted(optim.OPTIMIZERS), default="sgd",
                   help="update rule (momentum: SGD with μ = 0.9; adagrad as min-char-rnn)")
    p.add_argument("--random-truncation", metavar="PI", type=float, default=None,
                   help="randomized truncation (Tallec & Ollivier): carry the gradient back each step "
                        "with probability PI, weighted 1/PI")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed (an integer >= 0) of the initialization, the batches and the sample")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameter dtype")
    p.add_argument("--parallel", action="store_true", help="spread the batch over Numba's threads")
    p.add_argument("--prefix", default=None,
                   help="text to continue at the end (default: the training text's first two words; "
                        "'' for no sample)")
    p.add_argument("--predict", metavar="N", type=int, default=50, help="characters to generate")
    p.add_argument("--temperature", type=_temperature, default=None,
                   help="sample the continuation at this temperature > 0 (default and 0: greedy)")
    p.add_argument("--save", metavar="PATH",
                   help="save model and optimizer to this .npz at the end (checked before training)")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint written by --save")
    p.add_argument("--json", metavar="PATH",
                   help='write {"perplexity", "tokens_per_s", "epochs"} (with --dropout also '
                        '"eval_perplexity", dropout off) here (checked before training)')
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    return p


def _check_args(args):
    """Every argument and path, before anything is built or trained."""
    for name in ("steps", "batch", "hidden", "layers", "epochs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.dropout > 0 and args.layers < 2:
        raise UsageError(f"--dropout applies between stacked layers, and there is one: pass --layers 2 "
                         f"or more with --dropout {args.dropout:g}")
    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0 (0: the whole text), got {args.max_tokens}")
    if args.predict < 0:
        raise UsageError(f"--predict must be >= 0, got {args.predict}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not (args.clip > 0 and math.isfinite(args.clip)):
        raise UsageError(f"--clip (θ) must be a positive number, got {args.clip}")
    if args.clip_value is not None and not (args.clip_value > 0 and math.isfinite(args.clip_value)):
        raise UsageError(f"--clip-value must be a positive number, got {args.clip_value}")
    if args.random_truncation is not None and not (0 < args.random_truncation <= 1):
        raise UsageError(f"--random-truncation must be in (0, 1], got {args.random_truncation}")
    if args.random_truncation is not None:
        try:
            _carry_weight(args.random_truncation, args.dtype)
        except ValueError:
            raise UsageError(f"--random-truncation {args.random_truncation:g} is too small for --dtype "
                             f"{args.dtype}: its weight 1/PI overflows") from None
    if args.text is not None:
        _as_usage(data.check_text_file, args.text, "--text: file")
    if args.resume is not None:
        _as_usage(data.check_text_file, args.resume, "--resume: checkpoint")
    outputs = [(flag, path) for flag, path in (("--save", args.save), ("--json", args.json))
               if path is not None]
    for flag, path in outputs:
        check_output_path(path, flag, replace=flag == "--save")
    inputs = [("--text", args.text)] if args.text is not None else []
    for i, (flag, path) in enumerate(outputs):
        for other, other_path in inputs + outputs[:i]:
            if os.path.abspath(path) == os.path.abspath(other_path) or _same_file(path, other_path):
                raise UsageError(f"{flag} and {other} name the same file {path!r}; give {flag} another path")


def _as_usage(check, path, name):
    try:
        check(path, name)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _progress(epochs, start, quiet):
    """A tqdm bar over the epochs on a terminal; None otherwise (then plain lines are printed)."""
    if quiet or not _is_terminal(sys.stderr):    # a file or CI: clean lines, no carriage returns
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=epochs, initial=start, desc="train", unit="epoch", dynamic_ncols=True)


def format_perplexity(value):
    """A perplexity for people: two decimals, or three significant digits once it is huge (or Inf)."""
    return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3g}"


def _warm_up(model, ws, opt, loader, parallel):
    """Compile (or load from cache) every kernel the loop uses, so tokens/s excludes it.

    Runs on a batch drawn from a separate generator; the parameters are not changed, nor
    is the state of the dropout generator (a resumed run draws what an unbroken one would).
    """
    X, Y = next(iter(data.sequential_batches(loader.corpus, loader.T, loader.B)))
    state = model.generator.bit_generator.state
    try:
        api.loss_and_grad(model, X, Y, workspace=ws, parallel=parallel)
    finally:
        model.generator.bit_generator.state = state
    scratch = np.ones(1, dtype=model.dtype)
    optim.clip_grad_norm(scratch, 0.5)
    optim.clip_grad_value(scratch, 0.25)
    opt._warm_up()


def train(corpus, vocab, *, steps=35, batch=32, hidden=512, lr=1.0, clip=1.0, clip_value=None, epochs=500,
          sampling="sequential", optimizer="sgd", random_truncation=None, seed=0, dtype="float32",
          parallel=False, resume=None, quiet=True, log=print, cell="rnn", layers=1, dropout=0.0):
    """Train a character-level model with d2l's recipe; the engine of the command line.

    Parameters
    ----------
    corpus : ndarray (N,) int
        Token ids of ``vocab``.
    vocab : fastbptt.data.Vocab
    steps, batch, hidden, lr, clip, clip_value, epochs, sampling, optimizer, random_truncation,
    seed, dtype, parallel, cell, layers, dropout
        As the command's flags.
    resume : str, optional
        A checkpoint to continue from (it must hold this model and vocabulary).
    quiet : bool
        No progress bar or per-epoch lines.
    log : callable
        Where per-epoch lines go when there is no progress bar (no tqdm, or not a terminal).

    Returns
    -------
    dict
        ``perplexity`` (last epoch), ``tokens_per_s`` (all epochs of this run), ``epochs``
        (in total), ``model``, ``optimizer``, ``rng``, ``history`` (perplexity per epoch),
        and with dropout ``eval_perplexity``: the perplexity of the training batches once
        more, dropout off (the model's as it is used), None without dropout.
    """
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    rng = np.random.default_rng(seed)
    # d2l's from-scratch recipe for every cell: weights from N(0, 0.01²), zero biases
    model = CELLS[cell](len(vocab), hidden, len(vocab), init="normal", seed=seed, dtype=dtype,
                        num_layers=layers, dropout=dropout)
    opt = optim.make_optimizer(optimizer, model, lr)
    start = 0
    if resume is not None:
        start = _resume(resume, model, opt, rng, vocab, optimizer, lr, epochs)
    loader = data.SeqDataLoader(corpus, steps, batch, sampling, rng=rng)
    ws = Workspace(model, steps, batch)
    with compiling(enabled=not quiet, text=COMPILE_TEXT):   # said only if it takes a while
        _warm_up(model, ws, opt, loader, parallel)

    bar = _progress(epochs, start, quiet)
    every = max(1, (epochs - start) // 10)
    history, tokens, seconds = [], 0, 0.0
    try:
        for epoch in range(start, epochs):
            try:
                with np.errstate(over="ignore", invalid="ignore"):     # divergence is reported below
                    result = train_epoch(model, loader, opt, workspace=ws, clip=clip, clip_value=clip_value,
                                         truncation_pi=random_truncation, rng=rng, parallel=parallel)
            except ValueError:
                if not np.all(np.isfinite(model.flat)):
                    raise _diverged(epoch, "the parameters became NaN or Inf") from None
                raise
            if not math.isfinite(result.perplexity):
                raise _diverged(epoch, f"the mean loss is {result.loss:.4g}, and its perplexity overflows")
            history.append(result.perplexity)
            tokens += result.tokens
            seconds += result.seconds
            rate = tokens / seconds if seconds > 0 else math.inf
            if bar is not None:
                bar.set_postfix(perplexity=format_perplexity(result.perplexity), tokens_per_s=f"{rate:,.0f}",
                                refresh=False)
                bar.update(1)
            elif not quiet and ((epoch + 1 - start) % every == 0 or epoch + 1 == epochs):
                log(f"epoch {epoch + 1:>5}/{epochs}  perplexity {format_perplexity(result.perplexity):>8}  "
                    f"tokens/s {rate:>10,.0f}")
    finally:
        if bar is not None:
            bar.close()
    if not np.all(np.isfinite(model.flat)):                   # the very last update
        raise _diverged(epochs - 1, "the parameters became NaN or Inf")
    eval_perplexity = None
    if model.dropout > 0:       # the training perplexity had dropout on: measure the model as used
        batches = data.sequential_batches(loader.corpus, loader.T, loader.B)
        with np.errstate(over="ignore", invalid="ignore"):
            eval_perplexity = evaluate(model, batches, workspace=ws, parallel=parallel).perplexity
    return {"perplexity": history[-1], "tokens_per_s": tokens / seconds if seconds > 0 else math.inf,
            "epochs": epochs, "model": model, "optimizer": opt, "rng": rng, "history": history,
            "eval_perplexity": eval_perplexity}


def _diverged(epoch, why):
    return FloatingPointError(f"training diverged at epoch {epoch + 1}: {why}; lower --lr or --clip")


def _resume(path, model, opt, rng, vocab, optimizer, lr, epochs):
    """Load a ``--save`` checkpoint into ``model``, ``opt`` and ``rng``; return the epochs it has done."""
    config = checkpoint.read_config(path)
    saved_cell = config["cell"]
    if saved_cell != model.cell:
        raise ValueError(f"checkpoint {path!r} holds a {saved_cell!r} model, not the {model.cell!r} "
                         f"cell asked for; resume it with --cell {saved_cell}")
    for key, flag, value in (("num_layers", "--layers", model.num_layers), ("dropout", "--dropout", model.dropout)):
        if config[key] != value:
            raise ValueError(f"checkpoint {path!r} was trained with {flag} {config[key]:g}, not {value:g}; "
                             f"resume it with {flag} {config[key]:g}")
    if config["bidirectional"]:
        raise ValueError(f"checkpoint {path!r} holds a bidirectional model, which cannot be a language "
                         f"model that reads left to right")
    try:
        saved = checkpoint.load(path, model)
    except checkpoint.CheckpointError:
        raise
    except ValueError as exc:
        raise ValueError(f"{exc} (resume with the --hidden and --dtype it was trained with, "
                         f"on the same text)") from None
    extra = saved.extra
    if not isinstance(extra, dict) or "vocab" not in extra or "rng" not in extra:
        raise ValueError(f"checkpoint {path!r} was not written by '{PROG} --save' "
                         f"(it lacks the vocabulary and the state of the batches)")
    if extra["vocab"] != vocab.idx_to_token:
        raise ValueError(f"checkpoint {path!r} was trained on a different vocabulary")
    if saved.optimizer is None:
        raise ValueError(f"checkpoint {path!r} holds no optimizer state")
    if not np.isfinite(model.flat).all():
        raise ValueError(f"checkpoint {path!r} holds NaN or Inf parameters (saved from a run that "
                         f"diverged?): resume from an earlier checkpoint, or start again")
    start = extra.get("epoch", 0)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise checkpoint.CheckpointError(f"checkpoint {path!r} is damaged: its epoch count {start!r} "
                                         f"is not an int >= 0")
    if start >= epochs:
        raise ValueError(f"checkpoint {path!r} has already trained {start} epochs; "
                         f"pass --epochs greater than {start}")
    try:
        opt.load_state_dict(saved.optimizer.state_dict())
    except ValueError as exc:
        raise ValueError(f"checkpoint {path!r} does not fit --optimizer {optimizer}: {exc}") from None
    try:
        rng.bit_generator.state = extra["rng"]
    except (TypeError, ValueError, KeyError) as exc:
        raise checkpoint.CheckpointError(f"checkpoint {path!r} is damaged: the state of its batches' "
                                         f"generator cannot be restored ({exc!r})") from None
    opt.lr = lr
    return start


def default_prefix(corpus, vocab, words=2):
    """The first ``words`` words of a character corpus: a prefix the model has seen."""
    head = "".join(vocab.to_tokens(corpus[:200]))
    return " ".join(head.split(" ")[:words])


def main(argv=None):
    """Run the command; returns the exit status (0 done, 1 training or sampling failed, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:               # --help (0) or an argparse error (2), already printed
        return int(exc.code or 0)
    try:
        _check_args(args)
        try:
            corpus, vocab = data.load_corpus(args.text, max_tokens=args.max_tokens or None)
        except ValueError as exc:           # not UTF-8, say: the flag it came from leads
            raise UsageError(f"--text: {exc}") from None
        need = data.min_tokens(args.steps, args.batch, args.sampling)
        if corpus.size < need:
            source = args.text or "the default text"
            raise UsageError(f"{source} gives {corpus.size} tokens (after --max-tokens), fewer than the "
                             f"{need} needed for one batch of --batch {args.batch} sequences of "
                             f"--steps {args.steps}")
        result = train(corpus, vocab, steps=args.steps, batch=args.batch, hidden=args.hidden, lr=args.lr,
                       clip=args.clip, clip_value=args.clip_value, epochs=args.epochs,
                       sampling=args.sampling, optimizer=args.optimizer,
                       random_truncation=args.random_truncation, seed=args.seed, dtype=args.dtype,
                       parallel=args.parallel, resume=args.resume, quiet=args.quiet, cell=args.cell,
                       layers=args.layers, dropout=args.dropout)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1

    # the results first: a failure while sampling must not lose them
    model = result["model"]
    stack = (f", L={args.layers}" if args.layers > 1 else "") + \
        (f", dropout={args.dropout:g}" if args.dropout > 0 else "")
    print(f"perplexity {format_perplexity(result['perplexity'])}, {result['tokens_per_s']:,.0f} tokens/s "
          f"({args.cell}, {args.sampling}, {result['epochs']} epochs, T={args.steps}, B={args.batch}, "
          f"H={args.hidden}{stack})")
    if result["eval_perplexity"] is not None:
        print(f"perplexity with dropout off {format_perplexity(result['eval_perplexity'])} "
              f"(the training batches once more)")
    failed = False
    if args.save:
        try:
            checkpoint.save(args.save, model, result["optimizer"],
                            extra={"epoch": result["epochs"], "rng": result["rng"].bit_generator.state,
                                   "vocab": vocab.idx_to_token})
            print(f"saved {args.save}")
        except (OSError, ValueError) as exc:
            print(f"{PROG}: error: --save could not write the checkpoint: {exc}", file=sys.stderr)
            failed = True
    if args.json:
        try:
            with open(args.json, "w") as f:
                doc = {"perplexity": result["perplexity"], "tokens_per_s": result["tokens_per_s"],
                       "epochs": result["epochs"]}
                if result["eval_perplexity"] is not None:
                    doc["eval_perplexity"] = result["eval_perplexity"]
                json.dump(doc, f)
            print(f"wrote {args.json}")
        except OSError as exc:
            print(f"{PROG}: error: --json could not be written: {exc}", file=sys.stderr)
            failed = True
    prefix = default_prefix(corpus, vocab) if args.prefix is None else args.prefix
    if prefix:
        try:
            sample = predict(model, vocab, prefix, args.predict, temperature=args.temperature, rng=args.seed)
        except (ValueError, FloatingPointError) as exc:
            print(f"{PROG}: error: the sample failed ({exc}); the results above are saved", file=sys.stderr)
            return 1
        print(f"sample: {sample}")
    return 1 if failed else 0
