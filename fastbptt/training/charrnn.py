"""``python -m fastbptt train``: a character-level RNN language model, d2l's recipe by default.

``--cell rnn|gru|lstm`` picks the recurrent cell (the Elman RNN by default); every other
flag means the same for each. ``--layers N`` stacks N layers, with ``--dropout p``
between them (on each layer's output but the last, while training; off for the final
evaluation and the sample). A language model reads left to right, so there is no
bidirectional flag (see ``examples/bidirectional_tagger.py``).

Defaults follow Dive into Deep Learning's from-scratch RNN on The Time Machine: the first
10,000 characters, T = 35 steps, B = 32 sequences, H = 512 hidden units, weights from
N(0, 0.01²), zero biases, plain SGD with lr = 1, gradients clipped to norm θ = 1,
500 epochs, sequential partitioning. Without ``--text`` it trains on a text that ships
with Python (``fastbptt.data.default_text``: the Zen of Python and the docstrings of a
few standard modules), so it runs offline anywhere; ``--text timemachine.txt`` gives
the book's corpus.

Every argument and path is checked before anything is trained: no output path may name
an input (``--text``, ``--resume``) or another output, also through a link. At the end it
saves the checkpoint and the JSON (``--save``, ``--json``), then prints a continuation
of the prefix (by default the text's first two words), the final perplexity (of the
last epoch) and tokens per second (over all epochs, compilation excluded).

Checkpoints and ``--resume``. A checkpoint holds the model, the optimizer, the state of
every generator, the vocabulary, a fingerprint of the corpus and every setting of the run
(``extra["train"]``). ``--resume`` continues the run the checkpoint holds: a flag not given
takes the checkpoint's value; a flag given that differs is applied and reported for the
settings that may change along a run (``RESUME_APPLIED``: --lr, --clip, --clip-value,
--random-truncation, --epochs) and refused for those that define it (``RESUME_FIXED``:
the architecture, the data and its batches, the optimizer, the seed). Checkpoints written
before the settings were stored give the architecture (the model's configuration), the
optimizer and its learning rate (the optimizer's state); the other settings then come from
the command line, as they did, and a line says which. ``--save`` may name the ``--resume``
file: it is replaced, atomically, by the continued run's checkpoint.

Ctrl-C (SIGINT) while training finishes the step under way (the signal is deferred while a
step runs, so the model, the optimizer and every generator are those after a whole step),
saves that state to ``--save`` (atomically, with its place in the epoch and the carried
hidden state), says where, and exits with status 130; ``--resume`` of that file continues
exactly as the run would have gone on. Without ``--save`` it says so in one line and exits
130. SIGTERM (a job scheduler's, ``timeout``'s, ``kill``'s) does the same and exits 143, unless the
process has a SIGTERM handler of its own. A loss, gradient or parameter that becomes NaN or Inf stops the run at once (exit 1,
naming the epoch and the step); nothing is saved, so a checkpoint from before is kept.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from .._paths import check_output_path
from .._progress import compiling
from ..core import api
from ..core.model import CELLS
from ..core.workspace import Workspace
from . import data, optim
from . import saving as checkpoint
from .generate import predict
from .tbptt import _carry_weight, evaluate, perplexity, train_step
from .tbptt import random_truncation as _draw_carry

PROG = "python -m fastbptt train"
COMPILE_TEXT = "compiling kernels (5-15 s the first time, cached afterwards)"
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as a shell reports it; 143 (128 + SIGTERM) after SIGTERM."""

DEFAULTS = {"max_tokens": 10000, "steps": 35, "batch": 32, "cell": "rnn", "hidden": 512, "layers": 1,
            "dropout": 0.0, "lr": 1.0, "clip": 1.0, "clip_value": None, "epochs": 500,
            "sampling": "sequential", "optimizer": "sgd", "random_truncation": None, "seed": 0,
            "dtype": "float32"}
"""Every setting of a run (stored in a checkpoint's ``extra["train"]``) and its default."""

RESUME_APPLIED = ("lr", "clip", "clip_value", "random_truncation", "epochs")
"""Settings a resumed run may change: given explicitly, they are applied and reported."""

RESUME_FIXED = ("cell", "hidden", "layers", "dropout", "dtype", "max_tokens", "steps", "batch", "sampling",
                "optimizer", "seed")
"""Settings that define the run a checkpoint continues: given explicitly and different, refused."""

SIGINT_HOOK = "FASTBPTT_TEST_SIGINT_AT_STEP"
"""Tests only: send this process SIGINT just before its N-th training step (0: during the warm-up)."""


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The epilog as written; the defaults are in each flag's help text."""


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
    """--dropout: a probability in [0, 1] (as torch.nn's), refused at parse time."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dropout must be a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"--dropout must be a number in [0, 1], got {text}")
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


EPILOG = """\
Without --text the corpus is a text that ships with Python (the Zen of Python and
standard-library docstrings, about 17,000 characters). The Time Machine is Project
Gutenberg's public-domain text; d2l's copy is timemachine.txt.

--resume continues the run a checkpoint holds, with the checkpoint's settings: a flag not
given takes the checkpoint's value (also --text). A flag given that differs from it is
  applied, and reported: --lr, --clip, --clip-value, --random-truncation, --epochs;
  refused: --cell, --hidden, --layers, --dropout, --dtype (the model), --text,
           --max-tokens, --steps, --batch, --sampling, --seed (the data and its batches),
           --optimizer.
A checkpoint written before settings were stored gives the model, the optimizer and its
--lr; the other settings come from the command line (a line names them). --save may name
the --resume file (it is replaced atomically); no other output may name an input or
another output.

Ctrl-C finishes the step under way, saves it to --save (resume it with --resume; it
continues exactly; --json is left to the run that completes) and exits with status 130;
SIGTERM does the same and exits 143.
A loss that becomes NaN or Inf stops the run (exit 1) and saves nothing."""


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Train a character-level RNN language model with fastbptt; the sizes and\n"
                    "hyperparameters default to Dive into Deep Learning's recipe for The Time\n"
                    "Machine (the text itself is --text).",
        epilog=EPILOG)

    def setting(*flags, help, **kwargs):       # default None: "given explicitly" is "not None"
        dest = flags[0].lstrip("-").replace("-", "_")
        default = DEFAULTS[dest]
        shown = "" if default is None else f" (default: {default})"
        p.add_argument(*flags, default=None, help=help + shown, **kwargs)

    p.add_argument("--text", metavar="PATH",
                   help="UTF-8 text file to train on (default: a text that ships with Python)")
    setting("--max-tokens", metavar="N", type=int, help="train on the first N characters (0: all)")
    setting("--steps", "-T", metavar="T", type=int, help="time steps per chunk")
    setting("--batch", "-B", metavar="B", type=int, help="sequences per batch")
    setting("--cell", choices=tuple(CELLS), help="the recurrent cell: Elman RNN, GRU or LSTM (PyTorch's gates)")
    setting("--hidden", metavar="H", type=int, help="hidden units")
    setting("--layers", metavar="N", type=int, help="stacked recurrent layers")
    setting("--dropout", metavar="P", type=_dropout,
            help="dropout between the stacked layers while training (needs --layers 2 or more)")
    setting("--lr", type=float, help="learning rate")
    setting("--clip", metavar="THETA", type=float, help="clip the gradient's global L2 norm to THETA")
    setting("--clip-value", metavar="C", type=float,
            help="also clamp every gradient element to [-C, C] (min-char-rnn uses 5)")
    setting("--epochs", type=int, help="epochs (in total, when resuming)")
    setting("--sampling", choices=("sequential", "random"),
            help="minibatches: sequential partitioning (state carried) or random sampling")
    setting("--optimizer", choices=sorted(optim.OPTIMIZERS),
            help="update rule (momentum: SGD with μ = 0.9; adagrad as min-char-rnn)")
    setting("--random-truncation", metavar="PI", type=float,
            help="randomized truncation (Tallec & Ollivier): carry the gradient back each step "
                 "with probability PI, weighted 1/PI")
    setting("--seed", type=_seed, help="seed (an integer >= 0) of the initialization, the batches and the sample")
    setting("--dtype", choices=("float32", "float64"), help="parameter dtype")
    p.add_argument("--parallel", action="store_true", help="spread the batch over Numba's threads")
    p.add_argument("--prefix", default=None,
                   help="text to continue at the end (default: the training text's first two words; "
                        "'' for no sample)")
    p.add_argument("--predict", metavar="N", type=int, default=50,
                   help="characters to generate (default: 50)")
    p.add_argument("--temperature", type=_temperature, default=None,
                   help="sample the continuation at this temperature > 0 (default and 0: greedy)")
    p.add_argument("--save", metavar="PATH",
                   help="save model and optimizer to this .npz at the end, or at Ctrl-C (checked "
                        "before training)")
    p.add_argument("--resume", metavar="PATH",
                   help="continue the run of a checkpoint written by --save, with its settings (below)")
    p.add_argument("--json", metavar="PATH",
                   help='write {"perplexity", "tokens_per_s", "epochs"} (with --dropout also '
                        '"eval_perplexity", dropout off) here (checked before training)')
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    return p


def _given(args):
    """The settings given on the command line: {name: value}."""
    return {name: getattr(args, name) for name in DEFAULTS if getattr(args, name) is not None}


def _with_defaults(args):
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _check_values(args):
    """Every setting's range (all of them filled in)."""
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


def _check_args(args):
    """Every argument and path, before anything is built or trained (settings filled in)."""
    _check_values(args)
    _check_paths(args)


def _check_paths(args, text_from=None):
    """Inputs readable, outputs writable, and no output naming an input or another output.

    ``--save`` may name the ``--resume`` file (the checkpoint is read whole before anything is
    trained, and replaced atomically); every other pair is refused, also through a symbolic
    or hard link. ``text_from`` names where ``args.text`` came from when not the command line.
    """
    text_flag = "--text" if text_from is None else text_from
    if args.text is not None:
        _as_usage(data.check_text_file, args.text, f"{text_flag}: file")
    if args.resume is not None:
        _as_usage(data.check_text_file, args.resume, "--resume: checkpoint")
    outputs = [(flag, path) for flag, path in (("--save", args.save), ("--json", args.json)) if path is not None]
    for flag, path in outputs:
        check_output_path(path, flag, replace=flag == "--save")
    inputs = [(flag, path) for flag, path in ((text_flag, args.text), ("--resume", args.resume))
              if path is not None]
    for i, (flag, path) in enumerate(outputs):
        for other, other_path in inputs + outputs[:i]:
            if (flag, other) == ("--save", "--resume"):
                continue                            # continue a run in place: read first, replaced atomically
            if _same_path(path, other_path):
                raise UsageError(f"{flag} and {other} name the same file {path!r}; give {flag} another path")


def _same_path(a, b):
    """Whether two paths name one file: the same name, the same target of links, or one inode."""
    return (os.path.abspath(a) == os.path.abspath(b) or os.path.realpath(a) == os.path.realpath(b)
            or _same_file(a, b))


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


class _DeferSigint:
    """Ctrl-C (SIGINT) and SIGTERM noted instead of acted on while the block runs (in the main
    thread; else a no-op). A SIGINT that is ignored stays ignored, and a SIGTERM handler of the
    caller's own is left in place: only SIGTERM's default (die at once) is deferred.

    A training step is never cut in two: the loop looks at ``pending`` between steps. ``status``
    is what the process then exits with, 128 + the first signal (130 for Ctrl-C, 143 for SIGTERM,
    as a shell reports a process killed by it).
    """

    def __init__(self):
        self.pending = False
        self.signum = None
        self._old = {}

    def _note(self, signum, frame):
        self.pending = True
        if self.signum is None:
            self.signum = signum

    @property
    def status(self):
        return 128 + (self.signum or signal.SIGINT)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._note)
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old = {}
        return False


def _sigint_hook():
    """The step before which tests send SIGINT (``SIGINT_HOOK``), or None."""
    value = os.environ.get(SIGINT_HOOK)
    return None if value is None else int(value)


def _encode_state(h):
    """A carried hidden state (an array, or the LSTM's pair) as JSON, bit for bit (little-endian bytes)."""
    def one(a):
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        return {"dtype": a.dtype.name, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}
    return {"pair": [one(a) for a in h]} if isinstance(h, tuple) else one(h)


def _decode_state(doc, model, batch, path):
    """The carried state ``_encode_state`` wrote, checked against the model and the batch."""
    L = model.num_layers * (2 if model.bidirectional else 1)
    shape = [batch, model.hidden_size] if L == 1 else [L, batch, model.hidden_size]

    def one(d):
        if (not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"} or d["dtype"] != model.dtype.name
                or d["shape"] != shape or not isinstance(d["data"], str)
                or len(d["data"]) != 4 * math.ceil(math.prod(shape) * model.dtype.itemsize / 3)):
            raise _damaged(path, f"its carried hidden state is not a {model.dtype.name} array of shape "
                                 f"{tuple(shape)}")
        try:
            raw = base64.b64decode(d["data"], validate=True)
        except ValueError:
            raise _damaged(path, "its carried hidden state is not base64") from None
        a = np.frombuffer(raw, dtype=model.dtype.newbyteorder("<")).astype(model.dtype).reshape(shape)
        if not np.isfinite(a).all():
            raise _damaged(path, "its carried hidden state holds NaN or Inf")
        return a
    if model.cell == "lstm":
        if not isinstance(doc, dict) or set(doc) != {"pair"} or not isinstance(doc["pair"], list) \
                or len(doc["pair"]) != 2:
            raise _damaged(path, "its carried LSTM state is not a pair (h, c)")
        return tuple(one(d) for d in doc["pair"])
    return one(doc)


def _damaged(path, what):
    return checkpoint.CheckpointError(f"checkpoint {path!r} is damaged: {what}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_position(pos, path):
    """A mid-epoch place (``extra["position"]``), of the right types; its batch count is checked later."""
    keys = {"batch", "rng_epoch", "total", "tokens", "h"}
    if not isinstance(pos, dict) or set(pos) != keys:
        raise _damaged(path, f"its place in the epoch must hold {sorted(keys)}")
    if not _is_int(pos["batch"]) or pos["batch"] < 1:
        raise _damaged(path, f"its place in the epoch, batch {str(pos['batch'])[:50]!r}, is not an int >= 1")
    if not _is_int(pos["tokens"]) or pos["tokens"] < 1:
        raise _damaged(path, f"its token count {str(pos['tokens'])[:50]!r} is not an int >= 1")
    if not isinstance(pos["total"], (int, float)) or isinstance(pos["total"], bool) \
            or not math.isfinite(pos["total"]):
        raise _damaged(path, f"its loss total {str(pos['total'])[:50]!r} is not a finite number")
    return pos


def _set_state(rng, state, path, what):
    try:    # checked in full first: NumPy's setters take out-of-range positions (a crash at the next draw)
        rng.bit_generator.state = checkpoint.check_generator_state(state, f"its {what} generator's state")
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise _damaged(path, f"the state of its {what} generator cannot be restored ({exc!r})") from None


class _Diverged(FloatingPointError):
    """The loss, the gradient or the parameters became NaN or Inf: nothing is saved."""


def _diverged(epoch, why, step=None):
    where = f"epoch {epoch + 1}" + ("" if step is None else f", step {step}")
    return _Diverged(f"training diverged at {where}: {why}; nothing was saved (an earlier checkpoint "
                     f"is left as it was); lower --lr or --clip")


def train(corpus, vocab, *, steps=35, batch=32, hidden=512, lr=1.0, clip=1.0, clip_value=None, epochs=500,
          sampling="sequential", optimizer="sgd", random_truncation=None, seed=0, dtype="float32",
          parallel=False, resume=None, quiet=True, log=print, cell="rnn", layers=1, dropout=0.0,
          _hold_sigint=False):
    """Train a character-level model with d2l's recipe; the engine of the command line.

    Parameters
    ----------
    corpus : ndarray (N,) int
        Token ids of ``vocab``.
    vocab : fastbptt.data.Vocab
    steps, batch, hidden, lr, clip, clip_value, epochs, sampling, optimizer, random_truncation,
    seed, dtype, parallel, cell, layers, dropout
        As the command's flags. When resuming, the model's (cell, hidden, layers, dropout,
        dtype) and the optimizer must be the checkpoint's; ``lr`` is applied.
    resume : str or fastbptt.checkpoint.Checkpoint, optional
        A checkpoint to continue from (it must hold this model and vocabulary): its path,
        or what ``fastbptt.checkpoint.load`` returned for it.
    quiet : bool
        No progress bar or per-epoch lines.
    log : callable
        Where per-epoch lines go when there is no progress bar (no tqdm, or not a terminal).

    Returns
    -------
    dict
        ``perplexity`` (last epoch), ``tokens_per_s`` (all epochs of this run), ``epochs``
        (in total, completed), ``model``, ``optimizer``, ``rng``, ``history`` (perplexity per
        epoch), and with dropout ``eval_perplexity``: the perplexity of the training batches
        once more, dropout off (the model's as it is used), None without dropout.
        ``interrupted``: True when Ctrl-C stopped the run between two steps; then
        ``position`` is None at the end of an epoch, else the place in the epoch (JSON) that a
        checkpoint's ``extra["position"]`` holds, and ``perplexity`` may be None.

    Raises
    ------
    FloatingPointError
        The loss, the gradient or the parameters became NaN or Inf (the message names the
        epoch and the step).
    KeyboardInterrupt
        Ctrl-C before the first step (while compiling).
    """
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    rng = np.random.default_rng(seed)
    start, position = 0, None
    if resume is not None:
        model, opt, start, position = _resume(resume, rng, vocab, {
            "cell": cell, "hidden": hidden, "layers": layers, "dropout": dropout, "dtype": dtype,
            "optimizer": optimizer, "lr": lr, "epochs": epochs, "batch": batch})
    else:
        # d2l's from-scratch recipe for every cell: weights from N(0, 0.01²), zero biases
        model = CELLS[cell](len(vocab), hidden, len(vocab), init="normal", seed=seed, dtype=dtype,
                            num_layers=layers, dropout=dropout)
        opt = optim.make_optimizer(optimizer, model, lr)
    loader = data.SeqDataLoader(corpus, steps, batch, sampling, rng=rng)
    ws = Workspace(model, steps, batch)
    hook = _sigint_hook()
    if hook == 0:
        os.kill(os.getpid(), signal.SIGINT)
    with compiling(enabled=not quiet, text=COMPILE_TEXT):   # said only when kernels compile
        _warm_up(model, ws, opt, loader, parallel)

    run = _Run(model, opt, ws, loader, rng, clip=clip, clip_value=clip_value, pi=random_truncation,
               parallel=parallel, hook=hook)
    bar = _progress(epochs, start, quiet)
    every = max(1, (epochs - start) // 10)
    history = []
    done = start
    eval_perplexity = None
    sigint = _DeferSigint().__enter__()     # to the end: a Ctrl-C in the evaluation keeps the run too
    try:
        run.sigint = sigint
        try:
            for epoch in range(start, epochs):
                result = run.epoch(epoch, position)
                position = None
                if result is None:                  # Ctrl-C within the epoch: stop at this step
                    break
                history.append(result)
                done = epoch + 1
                rate = run.rate()
                if bar is not None:
                    bar.set_postfix(perplexity=format_perplexity(result), tokens_per_s=f"{rate:,.0f}",
                                    refresh=False)
                    bar.update(1)
                elif not quiet and ((epoch + 1 - start) % every == 0 or epoch + 1 == epochs):
                    log(f"epoch {epoch + 1:>5}/{epochs}  perplexity {format_perplexity(result):>8}  "
                        f"tokens/s {rate:>10,.0f}")
                if sigint.pending:
                    break
        finally:
            if bar is not None:
                bar.close()
        if not np.all(np.isfinite(model.flat)):                   # the very last update
            raise _diverged(done if run.position is not None else max(done - 1, 0),
                            "the parameters became NaN or Inf", run.steps_in_epoch)
        if model.dropout > 0 and not sigint.pending:   # the training perplexity had dropout on: the model as used
            batches = data.sequential_batches(loader.corpus, loader.T, loader.B)
            with np.errstate(over="ignore", invalid="ignore"):
                eval_perplexity = evaluate(model, batches, workspace=ws, parallel=parallel).perplexity
            if not math.isfinite(eval_perplexity):
                raise _diverged(epochs - 1, f"with dropout off the perplexity is {eval_perplexity}")
    except BaseException:
        sigint.__exit__()
        raise
    if not _hold_sigint:
        sigint.__exit__()
    interrupted = sigint.pending and done < epochs     # a Ctrl-C in the final evaluation: the run is complete
    return {"perplexity": history[-1] if history else None, "tokens_per_s": run.rate(), "epochs": done,
            "model": model, "optimizer": opt, "rng": rng, "history": history,
            "eval_perplexity": eval_perplexity, "interrupted": interrupted,
            "position": run.position if interrupted else None, "steps_in_epoch": run.steps_in_epoch,
            **({"sigint": sigint} if _hold_sigint else {})}


class _Run:
    """The epochs of a run, step by step (``train_epoch``'s arithmetic), stoppable between any two."""

    def __init__(self, model, opt, ws, loader, rng, *, clip, clip_value, pi, parallel, hook):
        self.model, self.opt, self.ws, self.loader, self.rng = model, opt, ws, loader, rng
        self.clip, self.clip_value, self.pi, self.parallel = clip, clip_value, pi, parallel
        self.carry = None
        if pi is not None:
            _carry_weight(pi, ws.dtype)
            self.carry = np.empty((ws.T, ws.B), ws.dtype)
        self.hook, self.count = hook, 0
        self.tokens, self.seconds = 0, 0.0      # this run's, for tokens/s
        self.position = None                    # where Ctrl-C stopped it within an epoch
        self.steps_in_epoch = 0
        self.sigint = None

    def rate(self):
        return self.tokens / self.seconds if self.seconds > 0 else math.inf

    def epoch(self, epoch, position):
        """One epoch (from ``position`` within it when resuming); its perplexity, or None when stopped."""
        began = time.perf_counter()
        rng, ws = self.rng, self.ws
        if position is not None:
            now = rng.bit_generator.state
            _set_state(rng, position["rng_epoch"], position["path"], "batches'")
        at_start = rng.bit_generator.state
        batches = iter(self.loader)
        total, tokens, done, h = 0.0, 0, 0, None
        if position is not None:
            for done in range(1, position["batch"] + 1):
                if next(batches, None) is None:
                    raise _damaged(position["path"], f"its place in the epoch, batch {position['batch']}, "
                                                     f"lies beyond the epoch's {done - 1} batches")
            _set_state(rng, now, position["path"], "batches'")
            total, tokens, h = float(position["total"]), position["tokens"], position["h"]
            if (h is None) == self.loader.carries_state:
                raise _damaged(position["path"], "its carried hidden state does not fit --sampling "
                                                 f"{self.loader.sampling}")
        n = ws.T * ws.B
        batch = next(batches, None)
        with np.errstate(over="ignore", invalid="ignore"):     # divergence is reported below
            while batch is not None:
                self.count += 1
                if self.hook == self.count:
                    os.kill(os.getpid(), signal.SIGINT)          # lands within the step: deferred
                X, Y = batch
                if self.carry is not None:
                    _draw_carry(ws.T, self.pi, rng, out=self.carry)
                try:
                    value, norm, h_T = train_step(self.model, X, Y, self.opt, workspace=ws,
                                                  h0=h if self.loader.carries_state else None, clip=self.clip,
                                                  clip_value=self.clip_value, carry=self.carry,
                                                  parallel=self.parallel)
                except ValueError:
                    state = h if isinstance(h, tuple) else (h,)
                    if not np.all(np.isfinite(self.model.flat)):
                        raise _diverged(epoch, "the parameters became NaN or Inf", done + 1) from None
                    if h is not None and not all(np.isfinite(a).all() for a in state):
                        raise _diverged(epoch, "the carried hidden state became NaN or Inf", done + 1) from None
                    raise
                done += 1
                self.steps_in_epoch = done
                if not math.isfinite(value):
                    raise _diverged(epoch, f"the loss is {value}", done)
                if not math.isfinite(perplexity(value)):      # the epoch's mean would overflow too
                    raise _diverged(epoch, f"the loss is {value:.4g}, and its perplexity overflows", done)
                if not math.isfinite(norm):
                    raise _diverged(epoch, f"the gradient's norm is {norm}", done)
                h = h_T
                total += value * n
                tokens += n
                self.tokens += n
                batch = next(batches, None)             # the epoch ends where there is none
                if batch is not None and self.sigint is not None and self.sigint.pending:
                    self.seconds += time.perf_counter() - began
                    self.position = {"batch": done, "rng_epoch": at_start, "total": total, "tokens": tokens,
                                     "h": None if h is None or not self.loader.carries_state
                                     else _encode_state(h)}
                    return None
        self.seconds += time.perf_counter() - began
        if tokens == 0:
            raise ValueError("the epoch yielded no batch")
        mean = total / tokens
        result = perplexity(mean)
        if not math.isfinite(result):
            raise _diverged(epoch, f"the mean loss is {mean:.4g}, and its perplexity overflows")
        return result


def _optimizer_name(opt):
    """The --optimizer name of an optimizer (SGD with momentum is "momentum")."""
    sd_name = opt.state_dict()["name"]
    if sd_name == "sgd" and opt.hyper.get("momentum", 0) > 0:
        return "momentum"
    return sd_name


def _resume(resume, rng, vocab, want):
    """The model, optimizer, epochs done and place in the epoch of a ``--save`` checkpoint;
    ``rng`` is set to its batches' generator state."""
    if isinstance(resume, checkpoint.Checkpoint):
        saved, path = resume, getattr(resume, "path", "checkpoint")
    else:
        path = os.fspath(resume)
        saved = checkpoint.load(path)
    model, extra = saved.model, saved.extra
    if model.cell != want["cell"]:
        raise ValueError(f"checkpoint {path!r} holds a {model.cell!r} model, not the {want['cell']!r} "
                         f"cell asked for; resume it with --cell {model.cell}")
    for flag, have, asked in (("--hidden", model.hidden_size, want["hidden"]),
                              ("--layers", model.num_layers, want["layers"]),
                              ("--dropout", model.dropout, want["dropout"]),
                              ("--dtype", model.dtype.name, want["dtype"])):
        if have != asked:
            raise ValueError(f"checkpoint {path!r} was trained with {flag} {have}, not {asked}; "
                             f"resume it with {flag} {have}")
    if model.bidirectional:
        raise ValueError(f"checkpoint {path!r} holds a bidirectional model, which cannot be a language "
                         f"model that reads left to right")
    if not isinstance(extra, dict) or "vocab" not in extra or "rng" not in extra:
        raise ValueError(f"checkpoint {path!r} was not written by '{PROG} --save' "
                         f"(it lacks the vocabulary and the state of the batches)")
    if extra["vocab"] != vocab.idx_to_token:
        raise ValueError(f"checkpoint {path!r} was trained on a different vocabulary")
    config = checkpoint.model_config(model)
    if model.input_size != len(vocab) or model.output_size != len(vocab) or not model.bias \
            or config.get("activation", "tanh") != "tanh":
        raise ValueError(f"checkpoint {path!r} holds {model!r}, not a character model of this vocabulary")
    if saved.optimizer is None:
        raise ValueError(f"checkpoint {path!r} holds no optimizer state")
    if _optimizer_name(saved.optimizer) != want["optimizer"]:
        raise ValueError(f"checkpoint {path!r} does not fit --optimizer {want['optimizer']}: it was trained "
                         f"with --optimizer {_optimizer_name(saved.optimizer)}")
    if not np.isfinite(model.flat).all():
        raise ValueError(f"checkpoint {path!r} holds NaN or Inf parameters (saved from a run that "
                         f"diverged?): resume from an earlier checkpoint, or start again")
    start = extra.get("epoch", 0)
    if not _is_int(start) or start < 0:
        raise checkpoint.CheckpointError(f"checkpoint {path!r} is damaged: its epoch count {start!r} "
                                         f"is not an int >= 0")
    position = extra.get("position")
    if position is not None:
        position = dict(_check_position(position, path), path=path)
        if position["h"] is not None:
            position["h"] = _decode_state(position["h"], model, want["batch"], path)
    if start >= want["epochs"]:
        raise ValueError(f"checkpoint {path!r} has already trained {start} epochs"
                         + (" and part of the next" if position is not None else "")
                         + f"; pass --epochs greater than {start}")
    _set_state(rng, extra["rng"], path, "batches'")
    saved.optimizer.lr = want["lr"]
    return model, saved.optimizer, start, position


# ----------------------------------------------------------------------------- --resume: the settings


def _stored_settings(saved, path):
    """The settings a checkpoint holds: {name: value}, checked; and the names it lacks (old files)."""
    model, extra = saved.model, saved.extra if isinstance(saved.extra, dict) else {}
    known = {"cell": model.cell, "hidden": model.hidden_size, "layers": model.num_layers,
             "dropout": float(model.dropout), "dtype": model.dtype.name}
    if saved.optimizer is not None:
        known["optimizer"] = _optimizer_name(saved.optimizer)
        known["lr"] = float(saved.optimizer.lr)
    stored = extra.get("train")
    if stored is None:
        return known, [name for name in DEFAULTS if name not in known]
    if not isinstance(stored, dict) or set(stored) != set(DEFAULTS):
        raise _damaged(path, f"its settings (extra['train']) must hold exactly {sorted(DEFAULTS)}")
    parser = build_parser()
    for name, value in stored.items():
        default = DEFAULTS[name]
        kind = type(default) if default is not None else float
        ok = (value is None and default is None) or (
            kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            kind is not float and isinstance(value, kind) and not isinstance(value, bool))
        choices = next((a.choices for a in parser._actions if a.dest == name), None)
        if not ok or (choices and value not in choices):
            raise _damaged(path, f"its stored setting {name} = {str(value)[:50]!r} is not a valid --"
                                 f"{name.replace('_', '-')}")
    args = argparse.Namespace(**stored, predict=0)
    try:
        _check_values(args)
    except UsageError as exc:
        raise _damaged(path, f"its stored settings are out of range: {exc}") from None
    for name, value in known.items():
        if stored[name] != value:
            raise _damaged(path, f"its stored setting {name} = {stored[name]!r} disagrees with its model "
                                 f"or optimizer ({value!r})")
    return dict(stored), []


def _merge_resume(args, saved, report):
    """Fill ``args`` from the checkpoint by the --resume rule (see the module's docstring)."""
    path = args.resume
    if not isinstance(saved.extra, dict) or "vocab" not in saved.extra or "rng" not in saved.extra:
        raise ValueError(f"checkpoint {path!r} was not written by '{PROG} --save' "
                         f"(it lacks the vocabulary and the state of the batches)")
    stored, missing = _stored_settings(saved, path)
    given = _given(args)
    for name, value in stored.items():
        flag = "--" + name.replace("_", "-")
        if name not in given:
            setattr(args, name, value)
        elif given[name] != value:
            if name in RESUME_FIXED:
                raise UsageError(f"{flag} {given[name]} differs from the {value} that checkpoint {path!r} "
                                 f"was trained with, and cannot change when resuming; drop {flag} "
                                 f"(or start a new run without --resume)")
            report(f"resume: {flag} {given[name]} applied (checkpoint {path!r} has {value})")
    if missing:
        report(f"resume: checkpoint {path!r} predates stored settings; "
               + ", ".join("--" + n.replace("_", "-") for n in missing) + " come from the command line")
    _with_defaults(args)
    corpus = saved.extra.get("corpus") if isinstance(saved.extra, dict) else None
    text_from = None
    if corpus is not None:
        if not isinstance(corpus, dict) or set(corpus) != {"text", "sha256", "tokens"} \
                or not (corpus["text"] is None or isinstance(corpus["text"], str)) \
                or not isinstance(corpus["sha256"], str) or not _is_int(corpus["tokens"]):
            raise _damaged(path, "its corpus fingerprint (extra['corpus']) must hold text, sha256 and tokens")
        if args.text is None and corpus["text"] is not None:
            args.text = corpus["text"]
            text_from = f"the text of checkpoint {path!r}"
            report(f"resume: --text {corpus['text']} (from the checkpoint)")
    return corpus, text_from


def _fingerprint(corpus):
    return hashlib.sha256(np.ascontiguousarray(corpus, dtype="<i8").tobytes()).hexdigest()


def default_prefix(corpus, vocab, words=2):
    """The first ``words`` words of a character corpus: a prefix the model has seen."""
    head = "".join(vocab.to_tokens(corpus[:200]))
    return " ".join(head.split(" ")[:words])


def _extra(result, vocab, args, corpus):
    """What a checkpoint of this run stores besides the model and the optimizer."""
    extra = {"epoch": result["epochs"], "rng": result["rng"].bit_generator.state, "vocab": vocab.idx_to_token,
             "train": {name: getattr(args, name) for name in DEFAULTS},
             "corpus": {"text": None if args.text is None else os.path.abspath(args.text),
                        "sha256": _fingerprint(corpus), "tokens": int(corpus.size)}}
    if result["position"] is not None:
        extra["position"] = result["position"]
    return extra


def main(argv=None):
    """Run the command; returns the exit status (0 done, 1 training or sampling failed, 2 bad arguments,
    130 interrupted)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before training started; nothing saved", file=sys.stderr)
        return INTERRUPTED


def _main(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:               # --help (0) or an argparse error (2), already printed
        return int(exc.code or 0)
    try:
        saved, stored_corpus = None, None
        if args.resume is None:
            _with_defaults(args)
            _check_args(args)
        else:
            explicit = argparse.Namespace(**vars(args))
            _check_paths(explicit)          # the paths given, before the checkpoint is read
            saved = checkpoint.load(args.resume)
            notes = []
            stored_corpus, text_from = _merge_resume(args, saved, notes.append)
            _check_values(args)
            _check_paths(args, text_from)
            for line in notes:
                print(line, file=sys.stderr)
        try:
            corpus, vocab = data.load_corpus(args.text, max_tokens=args.max_tokens or None)
        except ValueError as exc:           # not UTF-8, say: the flag it came from leads
            raise UsageError(f"--text: {exc}") from None
        if stored_corpus is not None and (stored_corpus["sha256"] != _fingerprint(corpus)):
            source = args.text or "the default text"
            raise UsageError(f"{source} (with --max-tokens {args.max_tokens}) is not the corpus checkpoint "
                             f"{args.resume!r} was trained on ({stored_corpus['tokens']} tokens of "
                             f"{stored_corpus['text'] or 'the default text'}); pass that --text")
        need = data.min_tokens(args.steps, args.batch, args.sampling)
        if corpus.size < need:
            source = args.text or "the default text"
            raise UsageError(f"{source} gives {corpus.size} tokens (after --max-tokens), fewer than the "
                             f"{need} needed for one batch of --batch {args.batch} sequences of "
                             f"--steps {args.steps}")
        if saved is not None:
            saved = _Saved(saved, args.resume)
        result = train(corpus, vocab, steps=args.steps, batch=args.batch, hidden=args.hidden, lr=args.lr,
                       clip=args.clip, clip_value=args.clip_value, epochs=args.epochs,
                       sampling=args.sampling, optimizer=args.optimizer,
                       random_truncation=args.random_truncation, seed=args.seed, dtype=args.dtype,
                       parallel=args.parallel, resume=saved, quiet=args.quiet, cell=args.cell,
                       layers=args.layers, dropout=args.dropout, _hold_sigint=True)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before the first training step; nothing saved", file=sys.stderr)
        return INTERRUPTED
    # train() returns with Ctrl-C still deferred: from its last step until the files are written,
    # a Ctrl-C (or a second one) waits, and the run is never lost between the two
    sigint = result.pop("sigint")
    try:
        if result["interrupted"]:
            return _interrupted(args, result, vocab, corpus, sigint.status)

        # the results first: a failure while sampling must not lose them
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
            failed |= not _save(args.save, result, vocab, args, corpus)
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
    finally:
        sigint.__exit__()
    if sigint.pending:
        print(f"{PROG}: interrupted after the run was complete and its results written; no sample",
              file=sys.stderr)
        return sigint.status
    prefix = default_prefix(corpus, vocab) if args.prefix is None else args.prefix
    if prefix:
        try:
            sample = predict(result["model"], vocab, prefix, args.predict, temperature=args.temperature,
                             rng=args.seed)
        except (ValueError, FloatingPointError) as exc:
            print(f"{PROG}: error: the sample failed ({exc}); the results above are saved", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted while sampling; the results above are saved", file=sys.stderr)
            return INTERRUPTED
        print(f"sample: {sample}")
    return 1 if failed else 0


class _Saved(checkpoint.Checkpoint):
    """A loaded checkpoint that knows its path (for messages)."""

    def __new__(cls, saved, path):
        self = super().__new__(cls, *saved)
        self.path = path
        return self


def _save(path, result, vocab, args, corpus):
    try:
        checkpoint.save(path, result["model"], result["optimizer"], extra=_extra(result, vocab, args, corpus))
        print(f"saved {path}")
        return True
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: --save could not write the checkpoint: {exc}", file=sys.stderr)
        return False


def _interrupted(args, result, vocab, corpus, status=INTERRUPTED):
    """Ctrl-C (or SIGTERM) stopped the run between two steps: save it (with --save), say where, exit
    with ``status`` (130 after Ctrl-C, 143 after SIGTERM)."""
    done, pos = result["epochs"], result["position"]
    where = (f"after step {pos['batch']} of epoch {done + 1}/{args.epochs}" if pos is not None
             else f"after epoch {done}/{args.epochs}")
    if not args.save:
        print(f"{PROG}: interrupted {where}; nothing saved (pass --save PATH to keep an interrupted run)",
              file=sys.stderr)
        return status
    with _DeferSigint():
        ok = _save(args.save, result, vocab, args, corpus)
    if ok:
        print(f"{PROG}: interrupted {where}; saved it to {args.save}: continue with --resume {args.save}",
              file=sys.stderr)
    return status
