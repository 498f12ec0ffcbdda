"""Character-level text data and minibatches, built exactly as Dive into Deep Learning builds them.

Preprocessing (d2l's ``read_time_machine``): in every line each run of characters
that are not ASCII letters becomes one space, then the line is stripped and
lower-cased. The tokens are the characters of the lines, concatenated (line breaks
are dropped, not turned into spaces). The vocabulary lists ``<unk>`` first, then
every token by decreasing frequency (ties in order of first appearance); for
The Time Machine that is 28 tokens: ``<unk>``, the space and 26 letters.

Minibatches are pairs (X, Y) of integer arrays of shape (T, B), time first, with
Y the tokens that follow X, ready for ``fastbptt.loss_and_grad``:

- ``sequential_batches``: the corpus, from a random offset in [0, T], is cut into
  B contiguous rows, and each batch is the next T columns; batch k+1 continues
  batch k, so the hidden state can be carried from one to the next.
- ``random_batches``: from a random offset in [0, T), the corpus is cut into
  subsequences of T tokens, shuffled, and grouped B at a time; neighbouring batches
  are unrelated, so the state is reset for every batch.

``SeqDataLoader`` draws a new offset (and order) every time it is iterated, that is,
every epoch. With ``rng=None`` ``sequential_batches`` is a plain deterministic
iterator over a user's own token array (offset 0).

Sequences of different lengths (sentences, sessions, recordings):

- ``pad_sequences``: a list of sequences into one time-major array (T, B) (or (T, B, D)
  for dense features) plus ``lengths`` (B,), for ``loss_and_grad(..., lengths=lengths)``.
- ``bucket_indices`` and ``bucket_batches``: batches of sequences of similar length,
  so that little time is spent on padding, each with the original indices of its
  sequences.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import typing
import hashlib
import importlib
import io
import os
import re
import stat

import numpy as np

from ..core.validation import as_array, positive_int

TIME_MACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
"""SHA-1 of d2l's ``timemachine.txt``, the text its language-model chapters use."""

_NON_LETTERS = re.compile("[^A-Za-z]+")


# ----------------------------------------------------------------------------- text


def preprocess_lines(lines):
    """d2l's line cleaning: every run of non-letters becomes one space; strip; lower-case.

    Parameters
    ----------
    lines : iterable of str

    Returns
    -------
    list of str
        One cleaned line per input line (empty lines stay, empty).
    """
    return [_NON_LETTERS.sub(" ", line).strip().lower() for line in lines]


def tokenize(lines, token="char"):
    """Split cleaned lines into tokens: characters (``"char"``) or words (``"word"``).

    Returns
    -------
    list of list of str
        The tokens of each line.
    """
    if token == "char":
        return [list(line) for line in lines]
    if token == "word":
        return [line.split() for line in lines]
    raise ValueError(f"token must be 'char' or 'word', got {token!r}")


class Vocab:
    """A vocabulary: ``<unk>`` (index 0), the reserved tokens, then tokens by decreasing frequency.

    Parameters
    ----------
    tokens : list of str, or list of list of str
        The corpus (nested lists are flattened).
    min_freq : int
        Tokens seen fewer times are left out (they map to ``<unk>``).
    reserved_tokens : list of str, optional
        Placed right after ``<unk>``.

    Attributes
    ----------
    idx_to_token : list of str
    token_to_idx : dict of str to int
    token_freqs : list of (str, int)
        Every token of the corpus with its count, most frequent first.
    """

    unk = 0

    def __init__(self, tokens=(), min_freq=0, reserved_tokens=None):
        if tokens and isinstance(tokens[0], list):
            tokens = [tok for line in tokens for tok in line]
        self._build(collections.Counter(tokens), min_freq, reserved_tokens)

    @classmethod
    def from_counts(cls, counts, min_freq=0, reserved_tokens=None):
        """The vocabulary of a corpus given by its token counts (a mapping in order of first appearance)."""
        vocab = cls.__new__(cls)
        vocab._build(counts, min_freq, reserved_tokens)
        return vocab

    def _build(self, counts, min_freq, reserved_tokens):
        # sorted() is stable: ties keep the mapping's order, that of first appearance
        self.token_freqs = sorted(counts.items(), key=lambda item: item[1], reverse=True)
        self.idx_to_token = ["<unk>"] + list(reserved_tokens or [])
        self.token_to_idx = {tok: idx for idx, tok in enumerate(self.idx_to_token)}
        for tok, freq in self.token_freqs:
            if freq < min_freq:
                break
            if tok not in self.token_to_idx:
                self.idx_to_token.append(tok)
                self.token_to_idx[tok] = len(self.idx_to_token) - 1

    def __len__(self):
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        """The index of a token (0 if unknown), or a list of indices for a list or tuple."""
        if isinstance(tokens, (list, tuple)):
            return [self.token_to_idx.get(tok, self.unk) for tok in tokens]
        return self.token_to_idx.get(tokens, self.unk)

    def to_tokens(self, indices):
        """The token of an index, or a list of tokens for a sequence of indices."""
        if np.ndim(indices) == 0:
            return self.idx_to_token[int(indices)]
        return [self.idx_to_token[int(i)] for i in indices]

    def __repr__(self):
        head = "".join(self.idx_to_token[1:11]) if all(len(t) == 1 for t in self.idx_to_token[1:]) \
            else " ".join(self.idx_to_token[1:6])
        return f"Vocab({len(self)} tokens: <unk> {head!r}...)"


def default_text():
    """An English text that ships with every Python: the Zen of Python and some stdlib prose.

    The Zen of Python (``this``, decoded), the essay in ``heapq.__about__``, and the
    docstrings of a few standard-library modules (absent under ``python -OO``, when the
    first two remain, about 5,000 characters). Used when no text file is given, so
    examples run offline anywhere.
    """
    parts = []
    with contextlib.redirect_stdout(io.StringIO()):   # importing ``this`` prints the Zen
        this = importlib.import_module("this")
    parts.append(codecs.decode(this.s, "rot13"))
    heapq = importlib.import_module("heapq")
    parts.append(getattr(heapq, "__about__", ""))
    for name in ("statistics", "argparse", "json", "csv", "random", "itertools", "inspect", "socket"):
        try:
            doc = importlib.import_module(name).__doc__
        except ImportError:  # pragma: no cover - a stripped-down Python
            doc = None
        if doc:
            parts.append(doc)
    return "\n".join(parts)


def load_corpus(path=None, *, text=None, max_tokens=None, token="char"):
    """Read, clean and tokenize a text; return its token ids and vocabulary (d2l's ``load_corpus_time_machine``).

    The text is streamed, a line (or a megabyte of a longer line) at a time: memory holds
    the token counts and the tokens kept, never the whole text, so ``max_tokens`` keeps a
    small corpus of a text of any size. Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (as
    d2l's ``readlines`` sees them), for a file and for ``text`` alike.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A UTF-8 text file. With neither ``path`` nor ``text``, ``default_text()``.
    text : str, optional
        The text itself, instead of a file.
    max_tokens : int, optional
        Keep only the first ``max_tokens`` tokens (d2l uses 10,000). The vocabulary is
        built from the whole text, as in d2l (so the whole text is read, once).
    token : {"char", "word"}

    Returns
    -------
    corpus : ndarray (N,) int64
        Token ids.
    vocab : Vocab
    """
    if path is not None and text is not None:
        raise ValueError("pass either path or text, not both")
    if max_tokens is not None:
        if isinstance(max_tokens, (bool, np.bool_)) or not isinstance(max_tokens, (int, np.integer)):
            raise TypeError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens}")
        max_tokens = int(max_tokens)
    if token not in ("char", "word"):
        raise ValueError(f"token must be 'char' or 'word', got {token!r}")
    count = _count_chars if token == "char" else _count_words
    if path is None:
        if text is None:
            text = default_text()
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return count(io.StringIO(text, newline=None), max_tokens)
    path = check_text_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return count(f, max_tokens)
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path!r} is not UTF-8 text ({exc}); convert it to UTF-8") from None


def check_text_file(path, name="text file"):
    """``path`` as a str if it names a regular file; else an error that says what it is.

    A directory, a FIFO (whose ``open`` would wait forever for a writer) or a device is
    refused before anything is opened.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} {path!r} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{name} {path!r} cannot be read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{name} {path!r} is a directory; name a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{name} {path!r} is {kind}; name a regular file")
    return path


_BLOCK = 1 << 20
"""Characters read at a time."""

_BREAK = re.compile(r"[^A-Za-z\n]*\n[^A-Za-z]*")     # a run of non-letters that holds a line break
_GAP = re.compile(r"[^A-Za-z\n]+")                   # a run of non-letters within a line
_LAST_LETTER = re.compile(r"[A-Za-z][^A-Za-z]*\Z")


def _clean_blocks(f):
    """d2l's line cleaning applied to a stream, a block at a time: yields ``(piece, at_word_end)``.

    Each piece holds lower-case letters, spaces, and ``\\n`` where lines met. Without the
    ``\\n``, the pieces joined are the cleaned lines joined (d2l's character corpus): a
    run of non-letters within a line is one space, a run that holds a line break is
    nothing (the spaces at the ends of lines are stripped), and so is a run at the start
    or the end of the text. ``at_word_end`` is false when the next piece may continue the
    piece's last word. A run of non-letters that straddles two blocks is carried over,
    reduced to the one character that decides it.
    """
    carry, started = "", False
    while True:
        block = f.read(_BLOCK)
        text = carry + block
        if block:
            m = _LAST_LETTER.search(text)
            if m is None:                             # no letter: a run that goes on
                carry = "\n" if "\n" in text else (" " if text else "")
                continue
            cut = m.start() + 1
            text, carry = text[:cut], text[cut:]
            carry = "\n" if "\n" in carry else carry[:1]
        piece = _GAP.sub(" ", _BREAK.sub("\n", text)).lower()
        if not started:
            piece = piece.lstrip(" \n")
        if not block:
            piece = piece.rstrip(" \n")
        started = started or bool(piece)
        if piece or not block:
            yield piece, bool(carry) or not block
        if not block:
            return


def _count_chars(f, max_tokens):
    """Character tokens: counts of the whole stream, and its first ``max_tokens`` characters as ids.

    Cleaned text holds only lower-case ASCII letters and spaces, so every piece is
    counted as bytes with ``np.bincount``, and the kept text is one byte per token.
    """
    counts = np.zeros(128, dtype=np.int64)
    first_seen = []                                     # byte values in order of first appearance
    kept = bytearray()
    for piece, _ in _clean_blocks(f):
        raw = piece.replace("\n", "").encode("ascii")
        if not raw:
            continue
        c = np.bincount(np.frombuffer(raw, dtype=np.uint8), minlength=128)
        new = np.flatnonzero((c > 0) & (counts == 0))
        if new.size:
            first_seen.extend(int(v) for _, v in sorted((raw.index(int(v)), v) for v in new))
        counts += c
        if max_tokens is None:
            kept += raw
        elif len(kept) < max_tokens:
            kept += raw[:max_tokens - len(kept)]
    vocab = Vocab.from_counts({chr(v): int(counts[v]) for v in first_seen})
    lut = np.zeros(128, dtype=np.int64)
    for v in first_seen:
        lut[v] = vocab[chr(v)]
    return lut[np.frombuffer(bytes(kept), dtype=np.uint8)], vocab


def _count_words(f, max_tokens):
    """Word tokens: counts of the whole stream, and its first ``max_tokens`` words as ids.

    Words never span a line break (d2l splits each line).
    """
    counts = collections.Counter()
    kept = []
    partial = ""                                         # a word the next piece may continue
    for piece, at_word_end in _clean_blocks(f):
        words = (partial + piece).replace("\n", " ").split(" ")
        partial = "" if at_word_end else words.pop()
        words = [w for w in words if w]
        counts.update(words)
        if max_tokens is None or len(kept) < max_tokens:
            kept.extend(words if max_tokens is None else words[:max_tokens - len(kept)])
    vocab = Vocab.from_counts(counts)
    return np.array(vocab[kept], dtype=np.int64), vocab


def file_sha1(path):
    """The SHA-1 of a file's bytes, as hex (compare with ``TIME_MACHINE_SHA1``)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- minibatches


def _check_corpus(corpus):
    if isinstance(corpus, np.ma.MaskedArray):
        raise TypeError("corpus is a masked array, whose hidden ids would be used: pass "
                        "corpus.compressed() to drop the masked tokens")
    corpus = np.asarray(corpus)
    if corpus.ndim != 1:
        raise ValueError(f"corpus must be a 1-D array of token ids, got shape {corpus.shape}")
    if corpus.dtype.kind not in "iu":
        raise TypeError(f"corpus must hold integer token ids, got dtype {corpus.dtype}")
    return corpus


def as_generator(rng, name="rng", *, required_by=None):
    """A ``numpy.random.Generator`` from what the library accepts as ``rng``.

    A Generator is used as it is (and advanced); an int seed >= 0 makes a new one
    (``numpy.random.default_rng(seed)``); None is returned as None, or refused when
    ``required_by`` names what needs it. Anything else is a ``TypeError`` that names ``name``.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        if required_by:
            raise TypeError(f"{required_by} needs {name}: a numpy.random.Generator or an int seed")
        return None
    if isinstance(rng, (bool, np.bool_)) or not isinstance(rng, (int, np.integer)):
        raise TypeError(f"{name} must be a numpy.random.Generator, an int seed or None, got {rng!r}")
    if rng < 0:
        raise ValueError(f"{name} must be a seed >= 0 (or a numpy.random.Generator), got {rng}")
    return np.random.default_rng(int(rng))


def min_tokens(T, B, sampling="sequential"):
    """The fewest tokens that give at least one batch whatever the random offset.

    Sequential partitioning draws an offset in [0, T] and needs T·B + 1 tokens after it;
    random sampling draws one in [0, T) and needs B subsequences of T plus one token.
    """
    T, B = positive_int(T, "T"), positive_int(B, "B")
    if sampling == "sequential":
        return T * (B + 1) + 1
    if sampling == "random":
        return T * (B + 1)
    raise ValueError(f"sampling must be 'sequential' or 'random', got {sampling!r}")


def _too_short(n, need, T, B):
    return ValueError(f"corpus has {n} tokens, fewer than the {need} needed for one batch of "
                      f"B={B} sequences of T={T} steps; use a longer text or smaller T or B")


def sequential_batches(corpus, T, B, rng=None):
    """Sequential partitioning: B contiguous rows, read T columns at a time.

    d2l's ``seq_data_iter_sequential``: with offset k (drawn from [0, T] when ``rng`` is
    given, else 0), the n = ⌊(N - k - 1) / B⌋·B tokens after it become B rows of n/B
    tokens, Y shifted by one. Row b of batch i+1 continues row b of batch i, so carry
    h_T from one batch to the next.

    Parameters
    ----------
    corpus : ndarray (N,) of int
    T, B : int
        Steps per batch and sequences per batch.
    rng : numpy.random.Generator or int, optional
        Draws the offset (an int seeds a new generator). None: offset 0, a plain
        deterministic iterator.

    Yields
    ------
    X, Y : ndarray (T, B) int64
        Inputs and next-token targets, time first, C-contiguous (new arrays).
    """
    corpus = _check_corpus(corpus)
    T, B = positive_int(T, "T"), positive_int(B, "B")
    rng = as_generator(rng)
    need = min_tokens(T, B, "sequential") if rng is not None else T * B + 1
    if corpus.size < need:
        raise _too_short(corpus.size, need, T, B)
    return _sequential(corpus, T, B, 0 if rng is None else int(rng.integers(0, T + 1)))


def _sequential(corpus, T, B, offset):
    n = (corpus.size - offset - 1) // B * B
    Xs = corpus[offset:offset + n].reshape(B, -1)
    Ys = corpus[offset + 1:offset + 1 + n].reshape(B, -1)
    for i in range(0, Xs.shape[1] // T * T, T):
        yield (np.ascontiguousarray(Xs[:, i:i + T].T, dtype=np.int64),
               np.ascontiguousarray(Ys[:, i:i + T].T, dtype=np.int64))


def random_batches(corpus, T, B, rng):
    """Random sampling: shuffled subsequences of T tokens, B per batch.

    d2l's ``seq_data_iter_random``: from an offset k drawn from [0, T), the corpus is cut
    into ⌊(N - k - 1) / T⌋ subsequences of T tokens whose starts are shuffled; each batch
    takes the next B of them. Neighbouring batches are unrelated: start every batch from
    a fresh state.

    Parameters
    ----------
    corpus : ndarray (N,) of int
    T, B : int
    rng : numpy.random.Generator or int
        Draws the offset and the order (an int seeds a new generator).

    Yields
    ------
    X, Y : ndarray (T, B) int64
    """
    corpus = _check_corpus(corpus)
    T, B = positive_int(T, "T"), positive_int(B, "B")
    rng = as_generator(rng, required_by="random_batches")
    need = min_tokens(T, B, "random")
    if corpus.size < need:
        raise _too_short(corpus.size, need, T, B)
    offset = int(rng.integers(0, T))
    n_sub = (corpus.size - offset - 1) // T
    starts = np.arange(0, n_sub * T, T) + offset
    rng.shuffle(starts)
    return _random(corpus, T, B, starts)


def _random(corpus, T, B, starts):
    steps = np.arange(T)
    for i in range(0, starts.size // B * B, B):
        idx = starts[i:i + B][None, :] + steps[:, None]         # (T, B) positions
        yield corpus[idx].astype(np.int64), corpus[idx + 1].astype(np.int64)


class SeqDataLoader:
    """Minibatches of a corpus, drawn afresh every time it is iterated (every epoch).

    Parameters
    ----------
    corpus : ndarray (N,) of int
    T, B : int
    sampling : {"sequential", "random"}
    rng : numpy.random.Generator or int or None
        Source of offsets and order; an int seeds a new one, None one from the OS's entropy.

    Attributes
    ----------
    carries_state : bool
        True for sequential partitioning: pass h_T on from batch to batch within an
        epoch. False for random sampling: reset the state for every batch.
    """

    def __init__(self, corpus, T, B, sampling="sequential", rng=None):
        self.corpus = _check_corpus(corpus)
        self.T, self.B = positive_int(T, "T"), positive_int(B, "B")
        need = min_tokens(self.T, self.B, sampling)
        if self.corpus.size < need:
            raise _too_short(self.corpus.size, need, self.T, self.B)
        self.sampling = sampling
        rng = as_generator(rng)
        self.rng = np.random.default_rng() if rng is None else rng
        self.carries_state = sampling == "sequential"

    def __iter__(self):
        if self.sampling == "sequential":
            return sequential_batches(self.corpus, self.T, self.B, self.rng)
        return random_batches(self.corpus, self.T, self.B, self.rng)

    def __repr__(self):
        return (f"SeqDataLoader({self.corpus.size} tokens, T={self.T}, B={self.B}, "
                f"sampling={self.sampling!r})")


# ----------------------------------------------------------------------------- variable lengths


def _as_sequences(sequences, name):
    """Each sequence as a 1-D or 2-D ndarray (not copied), checked; and whether they hold ids.

    Returns
    -------
    arrays : list of ndarray
        Each (len,) or (len, D), len >= 1, all of the same ndim (and D).
    integer : bool
        True when every sequence holds integers (token ids), False when any holds floats.
    """
    if isinstance(sequences, (str, bytes)):
        raise TypeError(f"{name} is a string; tokenize it first (e.g. vocab[list(text)]) and pass a "
                        f"list of token-id sequences")
    if isinstance(sequences, np.ndarray) and sequences.ndim != 1:
        raise TypeError(f"{name} is already an array of shape {sequences.shape}; pass a list of "
                        f"sequences (for sequences that all have T steps, X is that array, time first, "
                        f"and lengths is np.full(B, T))")
    try:
        sequences = list(sequences)
    except TypeError:
        raise TypeError(f"{name} must be a list of sequences, got {type(sequences).__name__}") from None
    if not sequences:
        raise ValueError(f"{name} is empty; pass at least one sequence")
    arrays = []
    for i, seq in enumerate(sequences):
        arrays.append(_as_sequence(seq, f"{name}[{i}]"))
        if arrays[-1].ndim != arrays[0].ndim or arrays[-1].shape[1:] != arrays[0].shape[1:]:
            want = "1-D token ids" if arrays[0].ndim == 1 else f"{arrays[0].shape[1]} features a step"
            raise ValueError(f"{name}[{i}] has shape {arrays[-1].shape}, but {name}[0] has shape "
                             f"{arrays[0].shape}: every sequence must hold {want}")
    return arrays, all(a.dtype.kind in "iu" for a in arrays)


def _as_sequence(seq, name):
    if isinstance(seq, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose hidden values would be used: pass "
                        f"{name}.compressed() (ids) or the steps you mean to keep")
    if isinstance(seq, (str, bytes)):
        raise TypeError(f"{name} is a string; tokenize it first (e.g. vocab[list(text)])")
    try:
        a = np.asarray(seq)
    except Exception as exc:  # ragged nested lists and the like
        raise TypeError(f"{name} must be a sequence of token ids or of feature vectors: {exc}") from None
    if a.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D (token ids) or 2-D (steps, features), got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty; every sequence needs at least one step "
                         f"(drop empty sequences before padding)")
    if a.ndim == 2 and a.shape[1] == 0:
        raise ValueError(f"{name} has shape {a.shape}: steps with no features")
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold integer token ids or float features, got dtype {a.dtype}")
    return a                    # whether its values fit the dtype asked for: _check_values_fit


def _output_dtype(dtype, integer, arrays):
    """The dtype of X: int64 for ids and the common float dtype for features, unless ``dtype`` says."""
    if dtype is None:
        return np.dtype(np.int64) if integer else np.result_type(*[a.dtype for a in arrays
                                                                     if a.dtype.kind == "f"])
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a NumPy integer or float dtype, got {dtype!r}") from None
    if dt.kind not in "iuf" or dt == np.float16:
        raise TypeError(f"dtype must be an integer dtype (token ids) or float32/float64, got {dt}")
    if dt.kind in "iu" and not integer:
        raise TypeError(f"dtype is {dt} but the sequences hold floats; nothing is rounded silently: "
                        f"pass dtype=None (or a float dtype) or round them yourself")
    return dt


def _check_pad(pad, dt, name):
    """The padding value, as a scalar of ``dt``: an int within range for ids, any real (NaN too) for floats."""
    if isinstance(pad, (bool, np.bool_)) or not isinstance(pad, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {pad!r}")
    if dt.kind in "iu":
        if not isinstance(pad, (int, np.integer)):
            raise TypeError(f"{name} must be an int for integer token ids, got {pad!r}")
        info = np.iinfo(dt)
        if not info.min <= pad <= info.max:
            raise ValueError(f"{name} = {pad} does not fit dtype {dt}")
    return dt.type(pad)


def _check_values_fit(arrays, dt, name):
    """Refuse values of ``arrays`` that ``dt`` cannot hold: ids outside an integer dtype's range
    (they would wrap: 300 -> 44 in int8), ids beyond the integers a float dtype holds exactly, or
    finite floats beyond its largest (they would become inf). Nothing is converted silently."""
    for i, a in enumerate(arrays):
        if a.size == 0 or a.dtype == dt:
            continue
        if dt.kind in "iu":
            info = np.iinfo(dt)
            lo, hi, what = info.min, info.max, f"the range of dtype {dt}, [{info.min}, {info.max}]"
        elif a.dtype.kind in "iu":
            bits = np.finfo(dt).nmant + 1
            lo, hi = -2 ** bits, 2 ** bits             # every integer in between is exact in dt
            what = f"the integers dtype {dt} holds exactly, [-2**{bits}, 2**{bits}]"
        else:
            hi = float(np.finfo(dt).max)
            lo, what = -hi, f"the range of dtype {dt} (largest {hi:.6g}; beyond it would become inf)"
        if a.dtype.kind == "f":
            finite = a[np.isfinite(a)]              # NaN and inf stay what they are in any float dtype
            if finite.size == 0 or (float(finite.min()) >= lo and float(finite.max()) <= hi):
                continue
            bad = finite.min() if float(finite.min()) < lo else finite.max()
        else:
            small, big = int(a.min()), int(a.max())  # Python ints: exact for every integer dtype
            if small >= lo and big <= hi:
                continue
            bad = a.dtype.type(small if small < lo else big)
        where = tuple(int(k) for k in np.argwhere(a == bad)[0])
        raise ValueError(f"{name}[{i}] holds {bad} at index {where[0] if len(where) == 1 else where}, outside "
                         f"{what}; pass a dtype that holds it (dtype=None keeps int64 ids or the sequences' "
                         f"float dtype), or map the values into range first")


def _check_lengths_fit(lengths, T, truncate, name):
    """T as an int (the longest length when None); refuse sequences longer than T unless truncating."""
    longest = int(lengths.max())
    if T is None:
        return longest
    T = positive_int(T, "T")
    if longest > T and not truncate:
        i = int(np.argmax(lengths))
        raise ValueError(f"{name}[{i}] has {longest} steps, more than T={T}; pass a larger T, "
                         f"T=None (the longest length), or truncate=True to keep the first T steps")
    return T


def pad_sequences(sequences, T=None, *, pad=0, truncate=False, dtype=None):
    """Pad sequences of different lengths into one time-major array, with their lengths.

    Sequence b fills ``X[:lengths[b], b]``; the steps after it hold ``pad`` (padding is
    at the end, as ``loss_and_grad(..., lengths=lengths)`` expects: sequence b uses steps
    0 .. lengths[b]-1 and never reads the rest, so ``pad`` may be any value).

    Parameters
    ----------
    sequences : list of array-like
        B sequences, each (len_b,) integer token ids or (len_b, D) float features
        (lists, tuples or arrays; all of one kind and D). Each needs len_b >= 1.
        They are copied, never changed.
    T : int, optional
        Steps of the result. None: the longest length. A larger T pads further (one shape
        for every batch, e.g. to reuse one ``Workspace``). A T shorter than a sequence is
        refused, unless ``truncate``.
    pad : int or float
        The value of the padding steps (default 0); an int in the dtype's range for ids.
    truncate : bool
        Keep only the first T steps of longer sequences (their lengths become T) instead
        of refusing them. Truncation drops data, so it is never silent.
    dtype : dtype, optional
        Of X. None: int64 for token ids, the sequences' common float dtype for features.
        Ids may be given a float dtype (one-hot rows as features); floats never become ints.
        Values the dtype cannot hold are refused, never wrapped or rounded: ids outside an
        integer dtype's range (300 in int8), ids a float dtype does not hold exactly (beyond
        2**24 in float32), finite floats beyond its largest.

    Returns
    -------
    X : ndarray (T, B) or (T, B, D)
        C-contiguous, a new array.
    lengths : ndarray (B,) int64
        Steps of each sequence in X, in [1, T].

    Examples
    --------
    >>> X, lengths = pad_sequences([[3, 1, 4], [1], [5, 9]])
    >>> X.T
    array([[3, 1, 4],
           [1, 0, 0],
           [5, 9, 0]])
    >>> lengths
    array([3, 1, 2])
    """
    arrays, integer = _as_sequences(sequences, "sequences")
    dt = _output_dtype(dtype, integer, arrays)
    pad = _check_pad(pad, dt, "pad")
    if not isinstance(truncate, (bool, np.bool_)):
        raise TypeError(f"truncate must be True or False, got {truncate!r}")
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    T = _check_lengths_fit(lengths, T, truncate, "sequences")
    _check_values_fit([a[:T] for a in arrays], dt, "sequences")      # the steps X will hold
    return _pad(arrays, T, pad, dt), np.minimum(lengths, T)


def _pad(arrays, T, pad, dt):
    X = np.full((T, len(arrays)) + arrays[0].shape[1:], pad, dtype=dt)
    for b, a in enumerate(arrays):
        n = min(a.shape[0], T)
        X[:n, b] = a[:n]
    return X


def bucket_indices(lengths, batch_size, *, rng=None, window=None, drop_last=False):
    """Group sequences of similar length into batches; return each batch's indices.

    The sequences (in a random order when ``rng`` is given) are cut into windows of
    ``window`` batches, sorted by decreasing length within each window (the longest
    first, ties in that order), and cut into batches of ``batch_size``; the batches are
    then shuffled when ``rng`` is given. Sorting over the whole data set
    (``window=None``) wastes the least time on padding; a small window mixes more
    (different batches every epoch).

    Parameters
    ----------
    lengths : array-like (N,) of int
        Length of every sequence, each >= 1.
    batch_size : int
    rng : numpy.random.Generator or int, optional
        Shuffles the sequences and then the batches (an int seeds a new generator; pass
        one Generator to draw a new order every epoch). None: no shuffling, the batches
        in order of decreasing length.
    window : int, optional
        Batches per sorting window; None sorts all at once.
    drop_last : bool
        Make every batch full: leave out N mod ``batch_size`` sequences, the last ones of
        the (shuffled) order before sorting, so random ones when ``rng`` is given.

    Returns
    -------
    list of ndarray (b,) int64
        Indices into the data set of each batch's sequences, longest first; every
        index appears once (but those ``drop_last`` leaves out). Only the last batch
        before shuffling may be smaller than ``batch_size``.
    """
    lengths = as_array(lengths, "lengths")
    if lengths.ndim != 1 or lengths.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D array of sequence lengths, got shape "
                         f"{lengths.shape}")
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.min() < 1:
        i = int(np.argmin(lengths))
        raise ValueError(f"lengths must be >= 1, got {lengths[i]} at index {i}")
    batch_size = positive_int(batch_size, "batch_size")
    window = None if window is None else positive_int(window, "window")
    if not isinstance(drop_last, (bool, np.bool_)):
        raise TypeError(f"drop_last must be True or False, got {drop_last!r}")
    rng = as_generator(rng)
    if drop_last and lengths.size < batch_size:
        raise ValueError(f"{lengths.size} sequences make no batch of batch_size={batch_size} with "
                         f"drop_last=True; pass a smaller batch_size or drop_last=False")
    return _buckets(lengths.astype(np.int64), batch_size, rng, window, drop_last)


def _buckets(lengths, batch_size, rng, window, drop_last):
    n = lengths.size
    order = np.arange(n) if rng is None else rng.permutation(n)
    if drop_last:   # before sorting, so that the sequences left out are random ones, not the shortest
        n -= n % batch_size
        order = order[:n]
    span = n if window is None else window * batch_size
    for start in range(0, n, span):
        part = order[start:start + span]
        # stable: equal lengths keep the (shuffled) order
        order[start:start + span] = part[np.argsort(-lengths[part], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return [np.array(b, dtype=np.int64) for b in batches]


class PaddedBatch(typing.NamedTuple):
    """One batch of ``bucket_batches``.

    Attributes
    ----------
    X : ndarray (T, B) or (T, B, D)
        The batch's sequences, padded (T is this batch's longest length unless a T was given).
    Y : ndarray (T, B) or (T, B, ...) or None
        The targets, padded the same way (None without ``targets``).
    lengths : ndarray (B,) int64
    indices : ndarray (B,) int64
        Column b holds sequence ``indices[b]`` of the data set: ``out[indices] = ...``
        puts per-sequence results back in the data set's order.
    """
    X: np.ndarray
    Y: typing.Optional[np.ndarray]
    lengths: np.ndarray
    indices: np.ndarray


def bucket_batches(sequences, batch_size, *, targets=None, rng=None, window=None, drop_last=False,
                   T=None, pad=0, target_pad=0, dtype=None, target_dtype=None):
    """Padded batches of sequences of similar length (``bucket_indices`` then ``pad_sequences``).

    Everything is checked (and every sequence converted) when it is called; the
    batches are padded as they are iterated.

    Parameters
    ----------
    sequences : list of array-like
        As for ``pad_sequences``.
    batch_size : int
    targets : list of array-like, optional
        One per sequence, with the same number of steps (labels of a tagger: ids; or
        (len, O) float targets), padded with ``target_pad``.
    rng, window, drop_last
        As for ``bucket_indices``.
    T : int, optional
        Pad every batch to T steps (one shape for all); None: each batch to its longest
        sequence. Sequences longer than T are refused.
    pad, target_pad : int or float
        Padding values of X and Y.
    dtype, target_dtype : dtype, optional
        Of X and Y, as for ``pad_sequences``.

    Returns
    -------
    iterator of PaddedBatch
        ``(X, Y, lengths, indices)`` per batch.
    """
    arrays, integer = _as_sequences(sequences, "sequences")
    dt = _output_dtype(dtype, integer, arrays)
    pad = _check_pad(pad, dt, "pad")
    _check_values_fit(arrays, dt, "sequences")
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    if T is not None:
        T = _check_lengths_fit(lengths, T, False, "sequences")
    tgt = None
    if targets is not None:
        tgt, tgt_integer = _as_sequences(targets, "targets")
        if len(tgt) != len(arrays):
            raise ValueError(f"targets has {len(tgt)} sequences but sequences has {len(arrays)}; "
                             f"pass one target sequence per input sequence")
        for i, (a, y) in enumerate(zip(arrays, tgt)):
            if y.shape[0] != a.shape[0]:
                raise ValueError(f"targets[{i}] has {y.shape[0]} steps but sequences[{i}] has "
                                 f"{a.shape[0]}; each target needs one entry per step")
        tdt = _output_dtype(target_dtype, tgt_integer, tgt)
        target_pad = _check_pad(target_pad, tdt, "target_pad")
        _check_values_fit(tgt, tdt, "targets")
    batches = bucket_indices(lengths, batch_size, rng=rng, window=window, drop_last=drop_last)
    return _padded_batches(arrays, tgt, lengths, batches, T, (pad, dt),
                           None if tgt is None else (target_pad, tdt))


def _padded_batches(arrays, tgt, lengths, batches, T, x_pad, y_pad):
    for idx in batches:
        T_b = int(lengths[idx].max()) if T is None else T
        X = _pad([arrays[i] for i in idx], T_b, *x_pad)
        Y = None if tgt is None else _pad([tgt[i] for i in idx], T_b, *y_pad)
        yield PaddedBatch(X, Y, lengths[idx].copy(), idx)
