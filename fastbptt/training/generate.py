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
    vocab : fastbptt.data.Vocab, or a list or tuple of str
        A sequence is the tokens by id, ``Vocab.idx_to_token`` (what ``python -m fastbptt
        train`` saves as a checkpoint's ``extra["vocab"]``): distinct strings, one per
        input of the model.
    prefix : str or list of str
        A string is split into characters; unknown tokens map to ``<unk>`` (a ``ValueError``
        names them when the vocabulary has no ``"<unk>"`` at id 0).
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
    vocab = as_vocab(vocab)
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

    if vocab.idx_to_token[Vocab.unk] != "<unk>":
        unknown = [t for t in dict.fromkeys(tokens) if t not in vocab.token_to_idx]
        if unknown:
            raise ValueError(f"prefix holds tokens the vocabulary lacks, and it has no '<unk>' to map them "
                             f"to: {unknown[:10]!r}")
    was = model.training
    model.eval()
    try:
        out = _generate(model, list(vocab[tokens]), n, greedy, temperature, rng)
    finally:
        model.train(was)
    return sep.join(tokens + vocab.to_tokens(out))


def as_vocab(vocab, name="vocab"):
    """``vocab`` as a ``fastbptt.data.Vocab``: itself, or the vocabulary whose tokens by id are the
    list or tuple ``vocab`` (as a checkpoint's ``extra["vocab"]`` holds ``Vocab.idx_to_token``).

    Raises a TypeError for anything else or for a token that is not a str, and a ValueError for an
    empty sequence or a token that appears twice (ids would be ambiguous).
    """
    if isinstance(vocab, Vocab):
        return vocab
    if not isinstance(vocab, (list, tuple)):
        raise TypeError(f"{name} must be a fastbptt.data.Vocab or a list of str (its tokens by id, as "
                        f"Vocab.idx_to_token), got {type(vocab).__name__}")
    for i, tok in enumerate(vocab):
        if not isinstance(tok, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(tok).__name__} {str(tok)[:50]!r}")
        if not tok:
            raise ValueError(f"{name}[{i}] is the empty string: a token must hold at least one character "
                             f"(generated text would silently lose it)")
    if not vocab:
        raise ValueError(f"{name} is empty: it must hold at least one token")
    token_to_idx = {}
    for i, tok in enumerate(vocab):
        if token_to_idx.setdefault(tok, i) != i:
            raise ValueError(f"{name} holds {tok!r} twice (ids {token_to_idx[tok]} and {i}): each token "
                             f"must have one id")
    out = Vocab.__new__(Vocab)              # the ids as given, not re-sorted by frequency
    out.idx_to_token = list(vocab)
    out.token_to_idx = token_to_idx
    out.token_freqs = []                    # the counts of the corpus are not known
    return out


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
