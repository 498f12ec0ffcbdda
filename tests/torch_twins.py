"""Twin modules for the tests of fastbptt.torch: torch.nn's module and fastbptt's with the same random
float64 parameters (torch.nn's is the oracle), and seeded float64 inputs. Import after
``pytest.importorskip("torch")``."""

import torch
from torch import nn

import fastbptt.torch as ft

F64 = torch.float64


def pair(cell="LSTM", D=8, H=16, seed=0, fbkw=None, **kw):
    """(torch.nn module, fastbptt.torch module) of ``cell`` with the same random float64 parameters;
    ``kw`` go to both constructors, ``fbkw`` to fastbptt's alone (``method``, ``parallel``)."""
    ref = getattr(nn, cell)(D, H, dtype=F64, **kw)
    fb = getattr(ft, cell)(D, H, dtype=F64, **kw, **(fbkw or {}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * (1.2 / H ** 0.5))
    fb.load_state_dict(ref.state_dict())
    return ref, fb


def rnd(*shape, seed=0, grad=False, scale=1.0):
    """A seeded float64 tensor of N(0, scale²) entries."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale
    return t.requires_grad_(grad)
