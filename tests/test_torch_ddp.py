"""fastbptt.torch under torch.nn.parallel.DistributedDataParallel (issue 10).

Two CPU processes (torch.multiprocessing, the gloo backend) each take half of a batch; DDP
averages their gradients. With a loss that is a mean over the batch's sequences, that average
is the gradient of one process on the whole batch: both ranks must hold it after backward
(to 1e-10, float64), and the same parameters after two SGD steps. Run twice in one process
group: dense batch-first input with DDP's default gradient buckets, and packed sequences of
random lengths with ``gradient_as_bucket_view=True`` (the gradients are views of DDP's buffers).
"""

import datetime
import os
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import fastbptt.torch as ft  # noqa: E402

F64 = torch.float64
WORLD = 2
T, B, D, H, O = 7, 6, 3, 5, 2
VARIANTS = (("dense", False), ("packed", True))       # (input, gradient_as_bucket_view)


class Net(nn.Module):
    def __init__(self, packed):
        super().__init__()
        self.packed = packed
        self.rnn = ft.LSTM(D, H, num_layers=2, bidirectional=True, batch_first=True, dtype=F64)
        self.head = nn.Linear(2 * H, O, dtype=F64)

    def forward(self, x, lengths):
        if self.packed:
            out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        else:
            out, _ = self.rnn(x)
        return self.head(out)


def data(packed):
    """The whole batch: inputs (B, T, D), targets (B, T, O), lengths (B,), and the valid mask (B, T)."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(B, T, D)))
    y = torch.from_numpy(rng.normal(size=(B, T, O)))
    lengths = torch.from_numpy(rng.integers(1, T + 1, size=B)) if packed else torch.full((B,), T)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    return x, y, lengths, mask


def loss_fn(pred, y, mask):
    """The mean over the sequences of each one's summed squared error (so halves average to the whole)."""
    return (((pred - y) ** 2).sum(-1) * mask).sum() / pred.shape[0]


def model(packed):
    torch.manual_seed(11)
    return Net(packed)


def run(net, x, y, lengths, mask, steps=2):
    """Gradients of the first step and the parameters after `steps` SGD steps, as numpy arrays."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
    grads = None
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net(x, lengths), y, mask).backward()
        if grads is None:
            grads = [p.grad.detach().clone().numpy() for p in net.parameters()]
        opt.step()
    return grads, [p.detach().clone().numpy() for p in net.parameters()]


def worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for packed_name, as_view in VARIANTS:
            packed = packed_name == "packed"
            net = model(packed)
            if rank == 1:                          # DDP broadcasts rank 0's parameters at the start
                with torch.no_grad():
                    for p in net.parameters():
                        p.add_(1.0)
            ddp = nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=as_view)
            x, y, lengths, mask = data(packed)
            part = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
            results[packed_name] = run(ddp, x[part], y[part], lengths[part], mask[part])
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build of PyTorch")
    mp = pytest.importorskip("torch.multiprocessing")
    ctx = mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=5):            # False until every process has exited (raises if one failed)
            if time.monotonic() > deadline:
                pytest.fail("the DDP processes did not finish in 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for packed_name, _ in VARIANTS:
        packed = packed_name == "packed"
        whole = run(model(packed), *data(packed))
        with_torch = model(packed)                  # the same network with torch.nn.LSTM, one process
        lstm = nn.LSTM(D, H, num_layers=2, bidirectional=True, batch_first=True, dtype=F64)
        lstm.load_state_dict(with_torch.rnn.state_dict())
        with_torch.rnn = lstm
        torch_whole = run(with_torch, *data(packed))
        for got, want in zip(whole[0] + whole[1], torch_whole[0] + torch_whole[1]):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg="one process against torch.nn")
        for r, res in enumerate(ranks):
            for what, got_list, want_list in (("gradient", res[packed_name][0], whole[0]),
                                              ("parameter after 2 steps", res[packed_name][1], whole[1])):
                for (name, _), got, want in zip(model(packed).named_parameters(), got_list, want_list):
                    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10,
                                               err_msg=f"{packed_name}, rank {r}: {what} of {name}")
