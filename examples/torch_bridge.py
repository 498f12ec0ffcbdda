"""A PyTorch character language model whose LSTM is fastbptt's: one changed import.

    python examples/torch_bridge.py             # fastbptt.torch.LSTM
    python examples/torch_bridge.py --torch     # the same loop with torch.nn.LSTM

An ordinary PyTorch training loop (embedding -> LSTM -> linear -> cross-entropy, Adam,
gradient clipping, a learning-rate schedule) over the text that ships with Python
(``fastbptt.data.default_text``), so it runs offline. Both runs start from the same weights
and see the same batches; they print the same losses up to float32 rounding, and the
fastbptt run takes less time.
"""

import argparse
import time

import numpy as np
import torch
from torch import nn

import fastbptt.torch
from fastbptt import data


class CharModel(nn.Module):
    def __init__(self, vocab, hidden, layers, lstm=fastbptt.torch.LSTM):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = lstm(32, hidden, num_layers=layers, batch_first=True)   # the one changed line
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids, state=None):
        out, state = self.rnn(self.embed(ids), state)
        return self.head(out), state


def batches(ids, batch, steps, rng):
    """Random windows of ``steps + 1`` characters: inputs and next-character targets (B, steps)."""
    starts = rng.integers(0, len(ids) - steps - 1, size=batch)
    window = np.stack([ids[s:s + steps + 1] for s in starts])
    return torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])


def train(use_torch=False, iters=60, batch=32, steps=35, hidden=128, layers=2, seed=0, log=print):
    """Train and return the list of losses (one per step)."""
    text = data.default_text()
    vocab = sorted(set(text))
    ids = np.array([vocab.index(c) for c in text], dtype=np.int64)
    torch.manual_seed(seed)
    model = CharModel(len(vocab), hidden, layers, nn.LSTM if use_torch else fastbptt.torch.LSTM)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, iters // 2), gamma=0.5)
    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    for it in range(iters):
        x, y = batches(ids, batch, steps, rng)
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (it % 10 == 0 or it == iters - 1):
            log(f"step {it:3d}  loss {loss.item():.4f}")
    if log:
        log(f"{'torch.nn' if use_torch else 'fastbptt.torch'}.LSTM: {iters} steps in "
            f"{time.perf_counter() - start:.2f} s")
    return losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", action="store_true", help="use torch.nn.LSTM instead")
    ap.add_argument("--iters", type=int, default=60)
    args = ap.parse_args(argv)
    train(use_torch=args.torch, iters=args.iters)


if __name__ == "__main__":
    main()
