"""``python -m fastbptt warmup`` (fastbptt.training.warmup): after it, nothing a program runs compiles.

The kernels list is derived from the package itself (every Numba dispatcher of fastbptt), and one
fresh process after ``warmup --cell C --dtype D`` runs the cell C in dtype D with every feature the
API has: compiling anything there (counted with Numba's "numba:compile" event) is a kernel, or a
specialization of one, that warmup missed.
"""

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import numpy as np
import pytest
from numba.core.dispatcher import Dispatcher

import fastbptt
from fastbptt.training import warmup

HERE = os.path.dirname(os.path.abspath(__file__))


def frozen(a):
    """A read-only copy of ``a``."""
    if a is None:
        return None
    a = np.array(a)
    a.flags.writeable = False
    return a


def every_feature(cell, dtype):
    """Run ``cell`` in ``dtype`` through every feature a user reaches; sizes not those of warmup."""
    import warnings

    from fastbptt import data, diagnostics, optim, training
    from fastbptt.generate import predict
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(11)
    warnings.simplefilter("ignore")       # parallel=True without threadpoolctl warns; not the point here
    T, D, H, O = 6, 5, 7, 4
    for B in (1, 5):
        for layers, bidir, p, bias in ((1, False, 0.0, True), (2, False, 0.5, False), (1, True, 0.0, False),
                                       (3, True, 0.3, True)):
            m = fastbptt.CELLS[cell](D, H, O, dtype=dtype, bias=bias, num_layers=layers,
                                     bidirectional=bidir, dropout=p, seed=3)
            Xt = rng.integers(0, D, (T, B)).astype(np.int32)
            Xd = rng.normal(size=(T, B, D)).astype(dtype)
            Xf = np.asfortranarray(Xd)
            Xr = Xd.copy()
            Xr.flags.writeable = False
            Y = rng.integers(0, O, (T, B))
            Ym = rng.normal(size=(T, B, O)).astype(dtype)
            Yr = Ym.copy()
            Yr.flags.writeable = False
            lengths = rng.integers(1, T + 1, B)
            w = rng.random((T, B))
            wr = w.astype(dtype)
            wr.flags.writeable = False
            # carry weights: one direction only (a reverse direction has no earlier chunk)
            carry = None if bidir else training.random_truncation(T, 0.5, rng, B=B, dtype=dtype)
            carry1 = None if bidir else frozen(training.random_truncation(T, 0.5, rng, dtype=dtype))
            n_states = layers * (2 if bidir else 1)
            h0 = rng.normal(size=(n_states, B, H)).astype(dtype)
            if n_states == 1:
                h0 = h0[0]
            if cell == "lstm":
                h0 = (h0, h0.copy())
            h0r = tuple(map(frozen, h0)) if cell == "lstm" else frozen(h0)
            for method in ("auto", "fused", "blas"):
                for parallel in (False, True):
                    run = {"parallel": parallel, "method": method}
                    for X in (Xt, Xd, Xf, Xr):
                        fastbptt.loss_and_grad(m, X, Y, h0, return_dX=X is not Xt, return_dh0=True, **run)
                        fastbptt.loss_and_grad(m, X, Y, lengths=lengths, loss_weights=w,
                                               carry=carry, **run)
                        for Yx in (Ym, Yr):
                            fastbptt.loss_and_grad(m, X, Yx, loss="mse", lengths=lengths, **run)
                            fastbptt.loss_and_grad(m, X, Yx, h0, loss="mse", loss_weights=wr, **run)
                        fastbptt.loss_and_grad(m, X, Ym, loss="mse", carry=carry1, **run)
                        for lens, state in ((None, h0), (lengths, h0r), (lengths, None)):
                            ws = fastbptt.Workspace(m, T, B)
                            out, _ = fastbptt.forward(m, X, state, lengths=lens, workspace=ws, **run)
                            fastbptt.backward(m, frozen(np.ones_like(out)), workspace=ws, return_dh0=True,
                                              return_dX=X is not Xt, carry=carry, **run)
                            hs, _ = fastbptt.layer_forward(m, X, state, lengths=lens, workspace=ws, **run)
                            fastbptt.layer_backward(m, np.ones_like(hs), state, workspace=ws,
                                                    return_dX=X is not Xt, **run)
                            fastbptt.layer_forward(m, X, lengths=lens, workspace=ws, **run)
                            fastbptt.layer_backward(m, frozen(np.ones_like(hs)), None if state is h0 else h0r,
                                                    workspace=ws, return_dX=X is not Xt, carry=carry1, **run)
            ws = fastbptt.Workspace(m, T, B)
            fastbptt.loss_and_grad(m, Xt, Y, workspace=ws, lengths=lengths)
            diagnostics.hidden_grad_norms(m, ws, per_sequence=True)
            if cell == "lstm":
                diagnostics.cell_grad_norms(m, ws)
            diagnostics.hidden_states(m, ws)
            diagnostics.gradient_flow(m, Xd, Y, lengths=lengths)
            for name in optim.OPTIMIZERS:
                training.train_step(m, Xt, Y, optim.make_optimizer(name, m, 0.01), workspace=ws,
                                    clip=0.5, clip_value=0.1, carry=carry, lengths=lengths,
                                    loss_weights=w)
            training.train_step(m, Xd, Ym, optim.make_optimizer("adam", m, 0.01), workspace=ws,
                                loss="mse", parallel=True)
    # big enough that the products of calls with lengths take their packed path (api.PACKED_MIN_FLOPS)
    T, B, D, H = 8, 16, 512, 128
    Xt = rng.integers(0, D, (T, B))
    Xd = frozen(rng.normal(size=(T, B, D)).astype(dtype))
    lengths = rng.integers(1, T + 1, B)
    for bidir in (False, True):
        m = fastbptt.CELLS[cell](D, H, D, dtype=dtype, num_layers=2, bidirectional=bidir, dropout=0.2)
        for X in (Xt, Xd):
            for method, parallel in (("fused", False), ("fused", True), ("blas", False)):
                fastbptt.loss_and_grad(m, X, Xt, lengths=lengths, method=method, parallel=parallel,
                                       return_dX=X is Xd, return_dh0=True)
                fastbptt.loss_and_grad(m, X, frozen(Xd), loss="mse", lengths=lengths, method=method,
                                       parallel=parallel)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:                       # the bridge passes PyTorch's arrays to the core
        import fastbptt.torch as ft
        tdtype = getattr(torch, dtype.name)
        for layers, bidir, p in ((1, False, 0.0), (2, True, 0.5)):
            for batch_first in (False, True):
                m = getattr(ft, cell.upper())(D, H, num_layers=layers, bidirectional=bidir, dropout=p,
                                              batch_first=batch_first, dtype=tdtype)
                x = torch.randn(5, 3, D, dtype=tdtype, requires_grad=True)
                for parallel in (False, True):
                    m.parallel = parallel
                    out, _ = m(x)
                    out.sum().backward()
                    out, _ = m(x[:, :, :])
                    (out[:2] * 3).sum().backward()          # a gradient with zero rows, strided
                    if not batch_first:
                        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 4, 2]))
                        out, _ = m(packed)
                        out.data.sum().backward()
                    m.eval()
                    with torch.no_grad():
                        m(x)
                    m.train()
    vocab = data.Vocab(list("abcdefg"))
    for layers in (1, 2):
        m = fastbptt.CELLS[cell](len(vocab), 8, len(vocab), dtype=dtype, num_layers=layers)
        predict(m, vocab, "abc", 5)
        predict(m, vocab, "abc", 5, temperature=1.0, rng=0)


PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from numba.core import event
compiled = []
class Listener(event.Listener):
    def on_start(self, ev):
        d = ev.data["dispatcher"]
        compiled.append(f"{d.py_func.__module__}.{d.py_func.__qualname__}{tuple(map(str, ev.data['args']))}")
    def on_end(self, ev):
        pass
event.register("numba:compile", Listener())
import test_warmup
test_warmup.every_feature(sys.argv[2], sys.argv[3])
print(json.dumps(compiled))
"""


def package_dispatchers():
    """Every Numba dispatcher defined in fastbptt's modules (found by walking the package)."""
    found = set()
    for info in pkgutil.walk_packages(fastbptt.__path__, "fastbptt."):
        try:
            module = importlib.import_module(info.name)
        except ImportError as exc:                    # fastbptt.torch without PyTorch
            if exc.name == "torch":
                continue
            raise
        for value in vars(module).values():
            if isinstance(value, Dispatcher) and value.py_func.__module__ == info.name:
                found.add(f"{info.name}.{value.py_func.__qualname__}")
    return found


def test_warmup_list_is_every_dispatcher_of_the_package():
    listed = {f"{d.py_func.__module__}.{d.py_func.__qualname__}" for d in warmup.kernels()}
    assert listed == package_dispatchers()
    assert len(listed) > 40


def test_kernels_left_out_of_warmup_are_not_called_by_the_api():
    """warmup skips only kernels no module of fastbptt calls (else a user would compile them)."""
    import re
    for name in warmup.NOT_CALLED_BY_THE_API:
        module, func = name.rsplit(".", 1)
        defining = importlib.import_module(module).__file__
        for root, _, files in os.walk(os.path.dirname(fastbptt.__file__)):
            for file in files:
                path = os.path.join(root, file)
                if file.endswith(".py") and path not in (defining, warmup.__file__):
                    with open(path, encoding="utf-8") as f:
                        assert not re.search(rf"\b{func}\b", f.read()), (func, path)


def test_warmup_refuses_to_leave_a_kernel_uncompiled(monkeypatch, capsys):
    """A kernel that no path of warmup reaches makes it fail (exit 1), naming the kernel."""
    from numba import njit

    @njit(cache=True)
    def forgotten(a):
        return a + 1

    forgotten.py_func.__module__ = "fastbptt.core.kernels.sweep"
    real = warmup.kernels
    monkeypatch.setattr(warmup, "kernels", lambda: real() + [forgotten])
    monkeypatch.setattr(warmup, "warm_cell", lambda cell, dtype: None)
    monkeypatch.setattr(warmup, "warm_optim", lambda dtype: None)
    problems = dict(warmup.unreached())
    assert "no call of warmup reached it" in problems["fastbptt.core.kernels.sweep.test_warmup_refuses_to_leave_a_"
                                                      "kernel_uncompiled.<locals>.forgotten"]
    assert warmup.main(["--cell", "rnn", "--dtype", "float32", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m fastbptt warmup: error: warmup left kernels to compile later")
    assert "forgotten (no call of warmup reached it)" in err


@pytest.mark.parametrize("cell, dtype", [("rnn", "float32")])
def test_after_warmup_every_feature_compiles_nothing(tmp_path, cell, dtype):
    """A fresh NUMBA_CACHE_DIR, ``warmup --cell C --dtype D``, then another process that runs every
    feature of C in D: no compilation at all."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("NUMBA_DISABLE_JIT", None)
    proc = subprocess.run([sys.executable, "-m", "fastbptt", "warmup", "--cell", cell, "--dtype", dtype],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-c", PROBE, HERE, cell, dtype], capture_output=True, text=True,
                          timeout=900, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    compiled = json.loads(proc.stdout.splitlines()[-1])
    assert compiled == [], f"{len(compiled)} compilations after warmup:\n" + "\n".join(compiled)
