"""fastbptt.torch in real PyTorch training loops (issue 10): the loss curve equals torch.nn's.

embedding -> LSTM -> linear -> cross-entropy, torch.optim.Adam, float64, 20 steps: the same
loop with ``torch.nn.LSTM`` and with ``fastbptt.torch.LSTM`` (same initial state_dict) gives
the same losses to 1e-8 and the same final parameters. Variants: batch-first packed batches
of random lengths, a truncated-BPTT language model carrying the detached state across chunks,
and the README example (examples/torch_bridge.py) run as a script.
"""

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import fastbptt.torch as ft  # noqa: E402

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
V, E, H, C = 11, 6, 12, 11          # vocabulary, embedding, hidden and class sizes


class Tagger(nn.Module):
    """embedding -> recurrent stack -> linear, over padded or packed batches."""

    def __init__(self, rnn_cls, batch_first=False, bidirectional=True, num_layers=2):
        super().__init__()
        self.emb = nn.Embedding(V, E, dtype=F64)
        self.rnn = rnn_cls(E, H, num_layers=num_layers, batch_first=batch_first, bidirectional=bidirectional,
                           dtype=F64)
        self.out = nn.Linear(H * (2 if bidirectional else 1), C, dtype=F64)

    def forward(self, ids, lengths=None, hx=None):
        e = self.emb(ids)
        bf = self.rnn.batch_first
        if lengths is None:
            h, state = self.rnn(e, hx)
        else:
            packed = pack_padded_sequence(e, lengths, batch_first=bf, enforce_sorted=False)
            h, state = self.rnn(packed, hx)
            h, _ = pad_packed_sequence(h, batch_first=bf, total_length=ids.shape[1 if bf else 0])
        return self.out(h), state


def pair(cls_name, **kw):
    """Two taggers with the same parameters: torch.nn's recurrent layer and fastbptt.torch's."""
    torch.manual_seed(0)
    ref = Tagger(getattr(nn, cls_name), **kw)
    fb = Tagger(getattr(ft, cls_name), **kw)
    fb.load_state_dict(ref.state_dict())
    assert isinstance(fb.rnn, getattr(ft, cls_name))
    return ref, fb


def batches(n, T, B, *, batch_first=False, packed=False, seed=0):
    """n batches of (ids, targets, lengths): the target at t is the token at t-1 (a memory task)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, V, size=(T, B))
        y = np.roll(ids, 1, axis=0)
        y[0] = 0
        lengths = None
        if packed:
            lengths = rng.integers(1, T + 1, size=B)
            y[np.arange(T)[:, None] >= lengths[None, :]] = -100       # ignored by cross_entropy
        ids, y = torch.from_numpy(ids), torch.from_numpy(y)
        if batch_first:
            ids, y = ids.T.contiguous(), y.T.contiguous()
        out.append((ids, y, None if lengths is None else torch.from_numpy(lengths)))
    return out


def train(model, data, steps=20, lr=0.02, clip=None):
    """Adam over the batches in turn; returns the loss of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        ids, y, lengths = data[step % len(data)]
        opt.zero_grad()
        logits, _ = model(ids, lengths)
        loss = nn.functional.cross_entropy(logits.reshape(-1, C), y.reshape(-1), ignore_index=-100)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def assert_same_training(ref, fb, ref_losses, fb_losses):
    assert np.all(np.isfinite(ref_losses))
    assert ref_losses[-1] < ref_losses[0] - 0.1, "the loop did not learn: a weak check"
    np.testing.assert_allclose(fb_losses, ref_losses, rtol=0, atol=1e-8)
    for (n, p), q in zip(ref.named_parameters(), fb.parameters()):
        np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy(), rtol=0, atol=1e-7, err_msg=n)


def test_lstm_tagger_loss_curve_equals_torch():
    ref, fb = pair("LSTM")
    data = batches(4, T=12, B=8)
    assert_same_training(ref, fb, train(ref, data), train(fb, data))


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_batch_first_packed_loss_curve_equals_torch(cls_name):
    ref, fb = pair(cls_name, batch_first=True)
    data = batches(4, T=12, B=9, batch_first=True, packed=True, seed=1)
    assert_same_training(ref, fb, train(ref, data, clip=1.0), train(fb, data, clip=1.0))


def test_truncated_bptt_language_model_carries_detached_state():
    """The classic PyTorch LM loop: chunks of one stream, the final state detached and fed back."""
    ref, fb = pair("LSTM", bidirectional=False)
    rng = np.random.default_rng(2)
    stream = torch.from_numpy(rng.integers(0, V, size=(20 * 6 + 1, 5)))
    curves = []
    for model in (ref, fb):
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        hx, losses = None, []
        for step in range(20):
            ids, y = stream[step * 6:(step + 1) * 6], stream[step * 6 + 1:(step + 1) * 6 + 1]
            opt.zero_grad()
            logits, hx = model(ids, hx=hx)
            hx = tuple(h.detach() for h in hx)
            loss = nn.functional.cross_entropy(logits.reshape(-1, C), y.reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(np.array(losses))
    np.testing.assert_allclose(curves[1], curves[0], rtol=0, atol=1e-8)


def test_readme_example_runs(monkeypatch, capsys):
    """examples/torch_bridge.py (the README's complete example) runs as a script, and its two
    loops (fastbptt.torch.LSTM and torch.nn.LSTM) print the same losses up to float32 rounding."""
    path = ROOT / "examples" / "torch_bridge.py"
    if not path.exists():
        pytest.skip("examples/torch_bridge.py is not written yet")
    source = path.read_text()
    argv = [str(path)] + (["--iters", "4"] if "--iters" in source else [])   # a short run
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.syspath_prepend(str(path.parent))
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip(), "the example printed nothing"
    example = runpy.run_path(str(path), run_name="torch_bridge_example")
    if "train" in example:
        fast = example["train"](use_torch=False, iters=3, log=None)
        slow = example["train"](use_torch=True, iters=3, log=None)
        np.testing.assert_allclose(fast, slow, rtol=1e-4)
