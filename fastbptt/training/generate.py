"""Text generation from a trained token-level model (d2l's ``predict_ch8``), greedy or sampled."""

from __future__ import annotations

import numpy as np

from ..core import api
from ..core.model import RNNBase
from ..core.validation import number
from ..core.workspace import Workspace
from .data import Vocab, as_generator


def predict(model, vocab, prefix, n, *, temperature=None, rng=None, sep=None):
    """Continue ``prefix`` by ``n`` tokens.

    The state starts at zero (the LSTM's h and c both; every layer's for a stack) and is
    warmed up on the prefix; then each step feeds the last token and picks the next one:
    the most likely (greedy, d2l's ``predict_ch8``), or a draw from softmax(o / τ) with a
    temperature τ. The model runs in evaluation mode (no dropout) and is then put back in
    the mode it was in; its dropout generator is not drawn from.

    Parameters
    ----------
    model : fastbptt.RNN, GRU or LSTM
        Trained on token ids of ``vocab`` (input and output sizes ``len(vocab)``), with any
        number of layers, in one direction (a bidirectional model reads the whole sequence,
        so it cannot generate one token after another).
    vocab : fastbptt.data.Vocab
    prefix : str or list of str
        A string is split into characters; unknown tokens map to ``<unk>``.
    n : int >= 0
        Tokens to generate.
    temperature : float > 0, optional
        None (default) or 0: greedy. Else sample; small τ approaches greedy, τ = 1 samples
        the model's distribution, large τ approaches uniform.
    rng : numpy.random.Generator or int, optional
        For sampling; an int seeds a new generator, None one from the OS's entropy.
    sep : str, optional
        Joins the tokens; default "" (characters) for a string prefix, " " for a list.

    Returns
    -------
    str
        The prefix followed by the ``n`` generated tokens.
    """
    if not isinstance(model, RNNBase):
        raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
    if not isinstance(vocab, Vocab):
        raise TypeError(f"vocab must be a fastbptt.data.Vocab, got {type(vocab).__name__}")
    if model.bidirectional:
        raise ValueError("a bidirectional model's reverse direction reads the sequence from its end, "
                         "so it cannot generate text one token after another; train a model with "
                         "bidirectional=False to generate")
    if model.input_size != len(vocab) or model.output_size != len(vocab):
        raise ValueError(f"model has input size {model.input_size} and output size {model.output_size}, "
                         f"but the vocabulary has {len(vocab)} tokens")
    if isinstance(prefix, str):
        tokens = list(prefix)
        sep = "" if sep is None else sep
    elif isinstance(prefix, (list, tuple)) and all(isinstance(t, str) for t in prefix):
        tokens = list(prefix)
        sep = " " if sep is None else sep
    else:
        raise TypeError(f"prefix must be a str or a list of str, got {prefix!r}")
    if not tokens:
        raise ValueError("prefix must hold at least one token")
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if temperature is not None:
        temperature = number(temperature, "temperature", low=0.0)
    greedy = temperature is None or temperature == 0
    rng = as_generator(rng)
    if not greedy and rng is None:
        rng = np.random.default_rng()

    was = model.training
    model.eval()
    try:
        out = _generate(model, list(vocab[tokens]), n, greedy, temperature, rng)
    finally:
        model.train(was)
    return sep.join(tokens + vocab.to_tokens(out))


def _generate(model, ids, n, greedy, temperature, rng):
    """The ids of ``n`` tokens that continue ``ids`` (the model in evaluation mode)."""
    ws = Workspace(model, 1, 1)
    x = np.zeros((1, 1), dtype=np.int64)
    h = None                                 # the state: h, the LSTM's (h, c); (L, 1, H) for a stack
    for k in ids[:-1]:                                       # warm up on the prefix
        x[0, 0] = k
        _, h = api.forward(model, x, h, workspace=ws)
    out = []
    last = ids[-1]
    for _ in range(n):
        x[0, 0] = last
        o, h = api.forward(model, x, h, workspace=ws)
        logits = o[0, 0].astype(np.float64)
        if greedy:
            last = int(np.argmax(logits))
        else:
            # shift before dividing: z <= 0 with max 0, so a tiny τ gives -Inf (probability 0),
            # never Inf - Inf = NaN
            with np.errstate(over="ignore"):
                z = (logits - logits.max()) / temperature
            p = np.exp(z)
            p /= p.sum()
            last = int(rng.choice(p.size, p=p))
        out.append(last)
    return out
