"""Training on top of the core: data, optimizers, truncated BPTT, diagnostics, saving, generation.

Submodules: ``data`` (d2l's character corpus and minibatches), ``optim`` (clipping and
optimizers over the flat buffer), ``tbptt`` (truncated BPTT steps and epochs),
``diagnostics`` (gradient flow through time), ``saving`` (checkpoints: save and resume),
``generate`` (text generation), ``charrnn`` (``python -m fastbptt train``), ``warmup``
(``python -m fastbptt warmup``: every kernel into Numba's cache ahead of time).

``fastbptt.training`` was the module that is now ``tbptt``: its names stay here, so
``fastbptt.training.train_epoch`` keeps working.
"""

from ..core import api
from ..core.model import RNN
from ..core.workspace import Workspace
from .data import SeqDataLoader, as_generator
from .optim import Optimizer, clip_grad_norm, clip_grad_value, grad_norm
from .tbptt import (EpochResult, EvalResult, StepResult, _carry_weight, _check_step_args, evaluate,
                    perplexity, random_truncation, train_epoch, train_step)
