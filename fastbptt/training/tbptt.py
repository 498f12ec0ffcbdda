"""Training steps: truncated BPTT with the hidden state carried across chunks, and randomized truncation.

A long sequence is cut into chunks of T steps. Each chunk starts from the state
the previous one ended in (``h0=h_T``) but no gradient flows back across the cut:
that is what ``state.detach_()`` does in Dive into Deep Learning, and what passing
``h_T`` on as ``h0`` does here, since ``loss_and_grad`` only differentiates with
respect to the parameters. The same holds for every cell: the LSTM's state is the
pair (h_T, c_T), passed on whole as the next chunk's ``h0``; and for stacks, whose
state is (L·dirs, B, H) (the LSTM's a pair of them), every layer's carried at once.

Steps and epochs run with the model in training mode (dropout on, for a stacked model
with ``dropout > 0``), ``evaluate`` in evaluation mode (dropout off); each puts the
model back in the mode it found it in.

Within a chunk, ``random_truncation`` draws the estimator of Tallec & Ollivier
(2017) that d2l's BPTT section describes: the gradient step t sends back through
time is weighted by ξ_t, with P(ξ_t = 0) = 1 - π and P(ξ_t = 1/π) = π. Then
E[ξ_t] = 1, the ξ_t are independent, and the expected gradient is the full one,
while a 0 ends the sum early.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import NamedTuple

import numpy as np

from ..core import api
from ..core.model import RNNBase
from ..core.validation import check_dtype, number, positive_int
from ..core.workspace import Workspace
from .data import SeqDataLoader, as_generator
from .optim import Optimizer, clip_grad_norm, clip_grad_value, grad_norm


def random_truncation(T, pi, rng, B=None, dtype=np.float64, out=None):
    """Carry weights ξ for ``loss_and_grad(..., carry=ξ)``: 0 with probability 1 - π, else 1/π.

    Parameters
    ----------
    T : int
        Steps.
    pi : float in (0, 1]
        π, the probability of carrying the gradient one step further back. π = 1 is full
        BPTT. 1/π must be finite in the weights' dtype (π > 2.9e-39 for float32).
    rng : numpy.random.Generator or int
        The source of the draws; an int seeds a new generator (the same weights every call).
    B : int, optional
        Draw independent weights for each of B sequences: shape (T, B); else (T,).
    dtype : float32 or float64
    out : ndarray (T,) or (T, B), optional
        Filled in place instead of allocating (its shape and dtype decide).

    Returns
    -------
    ndarray (T,) or (T, B)
    """
    pi = number(pi, "pi", low=0.0, low_open=True, high=1.0)
    rng = as_generator(rng, required_by="random_truncation")
    if out is None:
        T = positive_int(T, "T")
        dt = check_dtype(dtype)
        out = np.empty((T,) if B is None else (T, positive_int(B, "B")), dtype=dt)
    elif type(out) is not np.ndarray or out.dtype not in (np.float32, np.float64) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise TypeError("out must be a plain (not masked), contiguous, writable float32 or float64 ndarray")
    weight = _carry_weight(pi, out.dtype)
    rng.random(dtype=out.dtype, out=out)
    # u < π with probability π: carry 1/π; else cut
    np.less(out, pi, out=out)
    out *= weight
    return out


def _carry_weight(pi, dtype):
    """1/π in ``dtype``, checked after the cast: an Inf weight would make 0·Inf = NaN carries."""
    with np.errstate(over="ignore"):
        weight = np.dtype(dtype).type(1.0 / pi)
    if not np.isfinite(weight):
        tiny = 1.0 / float(np.finfo(dtype).max)
        raise ValueError(f"pi = {pi:g} is too small for {np.dtype(dtype).name} carry weights: 1/pi "
                         f"overflows; use pi > {tiny:.2g}, or float64 weights")
    return weight


def _check_step_args(model, optimizer, workspace, caller):
    """What must hold before any work: the step's gradient is read from ``workspace``."""
    if not isinstance(model, RNNBase):
        raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a fastbptt.optim.Optimizer, got {type(optimizer).__name__}")
    if optimizer.model is not model:
        raise ValueError("optimizer updates a different model")
    if not isinstance(workspace, Workspace):
        raise TypeError(f"{caller} needs workspace=fastbptt.Workspace(model, T, B), made once and passed "
                        f"to every step (the optimizer reads the gradient from it), got "
                        f"{type(workspace).__name__}")


@contextlib.contextmanager
def _mode(model, training):
    """``model.train(training)`` for the block, then the mode it was in."""
    was = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was)


def perplexity(mean_loss):
    """exp(mean loss per token); Inf when that overflows a float (a mean loss above about 709.78)."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


class StepResult(NamedTuple):
    """What ``train_step`` returns."""

    loss: float
    grad_norm: float
    h_T: np.ndarray       # (B, H) or a stack's (L·dirs, B, H); the LSTM's: the pair (h_T, c_T)


def train_step(model, X, Y, optimizer, *, workspace, h0=None, clip=None, clip_value=None, carry=None,
               parallel=False, loss="cross_entropy", lengths=None, loss_weights=None):
    """One step of truncated BPTT: gradients of this chunk from ``h0``, clipping, an update.

    The model runs in training mode (dropout on, if it has any) and is then put back in
    the mode it was in.

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    X, Y : ndarray (T, B) token ids and targets, or as ``loss_and_grad`` takes them
    optimizer : fastbptt.optim.Optimizer
        Bound to ``model``.
    workspace : fastbptt.Workspace
    h0 : ndarray (B, H) or (L·dirs, B, H), or for the LSTM a pair of them, optional
        The state the chunk starts from (the previous chunk's ``h_T``); zeros if None.
        (L·dirs, B, H) for a stacked or bidirectional model. No gradient flows into it.
    clip : float, optional
        θ: clip the gradient's global L2 norm to θ (d2l).
    clip_value : float, optional
        Clamp every gradient element to [-c, c] (min-char-rnn); after ``clip`` if both.
    carry : ndarray (T,) or (T, B), optional
        Carry weights, such as ``random_truncation(T, π, rng, B)``.
    parallel : bool
    loss : {"cross_entropy", "mse"}
    lengths : ndarray (B,) of int, optional
        Sequences of different lengths (``fastbptt.data.pad_sequences``), as ``loss_and_grad``.
    loss_weights : ndarray (T, B), optional
        As ``loss_and_grad``.

    Returns
    -------
    StepResult
        ``(loss, grad_norm, h_T)``: the chunk's mean loss, the gradient's L2 norm before
        clipping, and the final state (computed with the parameters before the update; a
        view into the workspace, to pass as the next chunk's ``h0``; for the LSTM the
        pair (h_T, c_T) of such views).
    """
    _check_step_args(model, optimizer, workspace, "train_step")
    with _mode(model, True):
        value, _, h_T = api.loss_and_grad(model, X, Y, h0, loss, workspace=workspace, parallel=parallel,
                                          carry=carry, lengths=lengths, loss_weights=loss_weights)
    grad = workspace.grad_flat
    norm = None
    if clip is not None:
        norm = clip_grad_norm(grad, clip)
    if clip_value is not None:
        n = clip_grad_value(grad, clip_value)
        norm = n if norm is None else norm
    if norm is None:
        norm = grad_norm(grad)
    optimizer.step(grad)
    return StepResult(value, norm, h_T)


class EpochResult(NamedTuple):
    """What ``train_epoch`` returns."""

    loss: float           # mean loss per token over the epoch
    perplexity: float     # exp(loss); Inf when that overflows (a diverged run)
    tokens: int           # tokens processed (T·B per batch)
    seconds: float        # wall time of the epoch
    tokens_per_s: float
    max_grad_norm: float  # the largest gradient norm seen, before clipping


def train_epoch(model, batches, optimizer, *, workspace, carry_state=None, clip=None, clip_value=None,
                truncation_pi=None, rng=None, parallel=False):
    """One epoch over ``batches``, d2l's ``train_epoch_ch8`` with the steps of ``train_step``.

    The state starts at zero; with ``carry_state`` each batch then starts from the previous
    batch's h_T (the LSTM's (h_T, c_T); every layer's for a stack) (sequential
    partitioning), else from zero (random sampling). The model runs in training mode and
    is then put back in the mode it was in.

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    batches : iterable of (X, Y), each (T, B), such as a ``fastbptt.data.SeqDataLoader``
    optimizer : fastbptt.optim.Optimizer
    workspace : fastbptt.Workspace
        For the batches' (T, B).
    carry_state : bool, optional
        Default: ``batches.carries_state`` for a ``SeqDataLoader``, else True.
    clip, clip_value : float, optional
        As in ``train_step``.
    truncation_pi : float in (0, 1], optional
        Randomized truncation with this π, drawn per step and sequence from ``rng``.
    rng : numpy.random.Generator or int, optional
        Needed with ``truncation_pi``; an int seeds a new generator for this epoch.
    parallel : bool

    Returns
    -------
    EpochResult
    """
    _check_step_args(model, optimizer, workspace, "train_epoch")
    if carry_state is None:
        carry_state = batches.carries_state if isinstance(batches, SeqDataLoader) else True
    carry = None
    if truncation_pi is not None:
        rng = as_generator(rng, required_by="truncation_pi")
        truncation_pi = number(truncation_pi, "truncation_pi", low=0.0, low_open=True, high=1.0)
        _carry_weight(truncation_pi, workspace.dtype)
        carry = np.empty((workspace.T, workspace.B), workspace.dtype)
    total, tokens, max_norm, h = 0.0, 0, 0.0, None
    start = time.perf_counter()
    with _mode(model, True):
        for X, Y in batches:
            if carry is not None:
                random_truncation(workspace.T, truncation_pi, rng, out=carry)
            value, norm, h_T = train_step(model, X, Y, optimizer, workspace=workspace,
                                          h0=h if carry_state else None, clip=clip, clip_value=clip_value,
                                          carry=carry, parallel=parallel)
            h = h_T
            n = workspace.T * workspace.B
            total += value * n
            tokens += n
            max_norm = max(max_norm, norm)
    seconds = time.perf_counter() - start
    if tokens == 0:
        raise ValueError("batches yielded no batch")
    mean = total / tokens
    return EpochResult(mean, perplexity(mean), tokens, seconds, tokens / seconds if seconds > 0 else math.inf,
                       max_norm)


class EvalResult(NamedTuple):
    """What ``evaluate`` returns."""

    loss: float           # mean loss per token
    perplexity: float     # exp(loss); Inf when that overflows
    tokens: int


def evaluate(model, batches, *, workspace=None, carry_state=None, loss="cross_entropy", parallel=False):
    """The mean loss and perplexity of ``model`` over ``batches``, in evaluation mode (dropout off).

    The parameters are not changed (the gradients the workspace receives are not used),
    nor is the dropout generator drawn from; the model is put back in the mode it was in.

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
    batches : iterable of (X, Y), each (T, B)
        Such as ``fastbptt.data.sequential_batches(corpus, T, B)``.
    workspace : fastbptt.Workspace, optional
        For the batches' (T, B); None makes one for the first batch.
    carry_state : bool, optional
        Start each batch from the previous one's final state; default as in ``train_epoch``.
    loss : {"cross_entropy", "mse"}
    parallel : bool

    Returns
    -------
    EvalResult
        ``(loss, perplexity, tokens)``.
    """
    if not isinstance(model, RNNBase):
        raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
    if workspace is not None and not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be a fastbptt.Workspace or None, got {type(workspace).__name__}")
    if carry_state is None:
        carry_state = batches.carries_state if isinstance(batches, SeqDataLoader) else True
    total, tokens, h = 0.0, 0, None
    with _mode(model, False):
        for X, Y in batches:
            if workspace is None:
                T, B = np.shape(X)[:2]
                workspace = Workspace(model, T, B)
            value, _, h_T = api.loss_and_grad(model, X, Y, h if carry_state else None, loss,
                                              workspace=workspace, parallel=parallel)
            h = h_T
            n = workspace.T * workspace.B
            total += value * n
            tokens += n
    if tokens == 0:
        raise ValueError("batches yielded no batch")
    mean = total / tokens
    return EvalResult(mean, perplexity(mean), tokens)
