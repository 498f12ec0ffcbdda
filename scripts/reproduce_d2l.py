"""Reproduce Dive into Deep Learning's from-scratch RNN on The Time Machine, with fastbptt and PyTorch.

The recipe (d2l zh v2 / en 0.17, section "RNN from scratch"): the first 10,000
characters of d2l's ``timemachine.txt``, T = 35, B = 32, H = 512, weights from
N(0, 0.01²), zero biases, SGD with lr = 1 on the mean cross-entropy, gradients
clipped to global norm θ = 1, 500 epochs, once with sequential partitioning (state
carried, detached) and once with random sampling (state reset every batch). The book
reports perplexity 1.0 (sequential) and 1.5 (random) at about 67,000 tokens/s on a GPU.

Run from the repository root::

    python scripts/reproduce_d2l.py                       # the full recipe (minutes)
    python scripts/reproduce_d2l.py --epochs 5 --hidden 64   # a smoke test

``timemachine.txt`` is d2l's copy of Project Gutenberg's public-domain text of H. G.
Wells's *The Time Machine* (sha1 090b5e7e70c295757f55df93cb0a180b9691891a); a file
with another sha1 gets a warning.

When PyTorch is installed it also runs the same recipe with ``torch.nn.RNN`` on this
CPU (the same batches, initialization, loss, clipping and update); ``--no-torch``
skips it. Perplexity is that of the last epoch, as d2l prints it; tokens/s counts
every epoch of the run (after a warm-up step that compiles the kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastbptt import charrnn, data  # noqa: E402
from fastbptt._paths import check_output_path  # noqa: E402
from fastbptt.training import perplexity  # noqa: E402

DEFAULT_TEXT = ROOT / ".." / "shared" / "data" / "timemachine.txt"
BOOK = {"sequential": (1.0, 67000), "random": (1.5, None)}   # d2l's reported perplexity, tokens/s (GPU)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--text", metavar="PATH", default=str(DEFAULT_TEXT),
                   help="d2l's timemachine.txt (Project Gutenberg's public-domain text of The Time Machine)")
    p.add_argument("--max-tokens", metavar="N", type=int, default=10000,
                   help="train on the first N characters")
    p.add_argument("--steps", metavar="T", type=int, default=35, help="time steps per chunk")
    p.add_argument("--batch", metavar="B", type=int, default=32, help="sequences per batch")
    p.add_argument("--hidden", metavar="H", type=int, default=512, help="hidden units")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate of plain SGD")
    p.add_argument("--clip", metavar="THETA", type=float, default=1.0,
                   help="clip the gradient's global L2 norm to THETA")
    p.add_argument("--epochs", type=int, default=500, help="epochs of each run")
    p.add_argument("--sampling", choices=("sequential", "random", "both"), default="both",
                   help="minibatches: sequential partitioning, random sampling, or one run of each")
    p.add_argument("--seed", type=charrnn._seed, default=0,
                   help="seed (an integer >= 0) of the initialization and the batches")
    p.add_argument("--parallel", action="store_true", help="fastbptt: spread the batch over Numba's threads")
    p.add_argument("--torch", dest="torch", action=argparse.BooleanOptionalAction, default=None,
                   help="also run PyTorch nn.RNN (default: when torch is installed)")
    p.add_argument("--json", metavar="PATH",
                   help="write every row of the table here (checked before training)")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def check_args(args):
    """Every argument and path before the minutes of training; a message naming the flag, or None."""
    for name in ("max_tokens", "steps", "batch", "hidden", "epochs"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}"
    for name in ("lr", "clip"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            return f"--{name} must be a positive number, got {getattr(args, name)}"
    try:
        data.check_text_file(args.text, "--text: file")
        if args.json is not None:
            check_output_path(args.json, "--json")
    except (FileNotFoundError, ValueError) as exc:
        hint = "; pass --text PATH to d2l's timemachine.txt" if not os.path.exists(args.text) else ""
        return f"{exc}{hint}"
    return None


# ----------------------------------------------------------------------------- PyTorch, d2l's recipe


def train_torch(corpus, vocab, args, sampling):
    """d2l's ``train_ch8`` with an ``nn.RNN`` (one-hot inputs, linear readout), on the same batches."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(args.seed)
    V, H = len(vocab), args.hidden
    rnn = nn.RNN(V, H)                                     # tanh, time first, bias_ih + bias_hh
    head = nn.Linear(H, V)
    params = list(rnn.parameters()) + list(head.parameters())
    with torch.no_grad():
        for name, p in list(rnn.named_parameters()) + list(head.named_parameters()):
            if "weight" in name:
                p.normal_(0.0, 0.01)
            else:
                p.zero_()

    def grad_clipping(theta):                             # d2l's, verbatim in spirit
        norm = torch.sqrt(sum(torch.sum(p.grad ** 2) for p in params))
        if norm > theta:
            for p in params:
                p.grad[:] *= theta / norm

    loader = data.SeqDataLoader(corpus, args.steps, args.batch, sampling, rng=args.seed)
    loss_fn = nn.CrossEntropyLoss()

    def epoch():
        state, total, n = None, 0.0, 0
        for X, Y in loader:
            if state is None or sampling == "random":
                state = torch.zeros(1, args.batch, H)
            else:
                state = state.detach()
            inputs = F.one_hot(torch.from_numpy(X), V).float()          # (T, B, V)
            out, state = rnn(inputs, state)
            logits = head(out.reshape(-1, H))
            loss = loss_fn(logits, torch.from_numpy(Y).reshape(-1))
            for p in params:
                p.grad = None
            loss.backward()
            grad_clipping(args.clip)
            with torch.no_grad():
                for p in params:
                    p -= args.lr * p.grad
            total += float(loss.detach()) * Y.size
            n += Y.size
        return total / n, n

    warm = data.SeqDataLoader(corpus, args.steps, args.batch, "sequential", rng=args.seed)
    with torch.no_grad():                                  # warm-up, parameters untouched
        X, _ = next(iter(warm))
        rnn(F.one_hot(torch.from_numpy(X), V).float())
    tokens, seconds, ppl = 0, 0.0, math.nan
    for _ in range(args.epochs):
        start = time.perf_counter()
        mean, n = epoch()
        seconds += time.perf_counter() - start
        tokens += n
        ppl = perplexity(mean)
    return {"perplexity": ppl, "tokens_per_s": tokens / seconds, "epochs": args.epochs,
            "threads": torch.get_num_threads(), "version": torch.__version__}


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    problem = check_args(args)
    if problem is not None:
        print(f"reproduce_d2l: error: {problem}", file=sys.stderr)
        return 2
    sha1 = data.file_sha1(args.text)
    if sha1 != data.TIME_MACHINE_SHA1:
        print(f"warning: {args.text} has sha1 {sha1}, not d2l's {data.TIME_MACHINE_SHA1}", file=sys.stderr)
    try:
        corpus, vocab = data.load_corpus(args.text, max_tokens=args.max_tokens)
    except ValueError as exc:
        print(f"reproduce_d2l: error: --text: {exc}", file=sys.stderr)
        return 2
    need = data.min_tokens(args.steps, args.batch, "sequential")
    if corpus.size < need:
        print(f"reproduce_d2l: error: {args.text} gives {corpus.size} tokens (after --max-tokens), "
              f"fewer than the {need} needed for one batch of --batch {args.batch} sequences of "
              f"--steps {args.steps}", file=sys.stderr)
        return 2
    use_torch = args.torch
    if use_torch is None:
        try:
            import torch  # noqa: F401
            use_torch = True
        except ImportError:
            use_torch = False
    samplings = ("sequential", "random") if args.sampling == "both" else (args.sampling,)
    print(f"{len(corpus)} tokens, vocabulary {len(vocab)}, T={args.steps}, B={args.batch}, H={args.hidden}, "
          f"lr={args.lr}, θ={args.clip}, {args.epochs} epochs; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs", flush=True)

    rows = []
    for sampling in samplings:
        ppl, rate = BOOK[sampling]
        rows.append({"implementation": "d2l from scratch (book, GPU)", "sampling": sampling,
                     "epochs": 500, "perplexity": ppl, "tokens_per_s": rate})
    for sampling in samplings:
        print(f"fastbptt, {sampling} ...", flush=True)
        try:
            r = charrnn.train(corpus, vocab, steps=args.steps, batch=args.batch, hidden=args.hidden,
                              lr=args.lr, clip=args.clip, epochs=args.epochs, sampling=sampling,
                              seed=args.seed, parallel=args.parallel, quiet=False)
        except FloatingPointError as exc:
            print(f"reproduce_d2l: {exc}", file=sys.stderr)
            return 1
        rows.append({"implementation": "fastbptt (this CPU)", "sampling": sampling, "epochs": args.epochs,
                     "perplexity": r["perplexity"], "tokens_per_s": r["tokens_per_s"]})
    if use_torch:
        for sampling in samplings:
            print(f"PyTorch nn.RNN, {sampling} ...", flush=True)
            r = train_torch(corpus, vocab, args, sampling)
            rows.append({"implementation": f"PyTorch {r['version']} nn.RNN (this CPU, {r['threads']} threads)",
                         "sampling": sampling, "epochs": args.epochs,
                         "perplexity": r["perplexity"], "tokens_per_s": r["tokens_per_s"]})

    print()
    print("| implementation | sampling | epochs | perplexity | tokens/s |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        rate = "—" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}"
        print(f"| {row['implementation']} | {row['sampling']} | {row['epochs']} | "
              f"{charrnn.format_perplexity(row['perplexity'])} | {rate} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
