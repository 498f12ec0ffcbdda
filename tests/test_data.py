"""Text preprocessing, vocabulary and minibatches against d2l's own definitions."""

import collections
import io
import os
import random
import re
import tracemalloc

import numpy as np
import pytest

from fastbptt import data

from helpers import TIME_MACHINE  # noqa: E402
needs_time_machine = pytest.mark.skipif(not TIME_MACHINE.is_file(),
                                        reason=f"{TIME_MACHINE} is absent")


# ----------------------------------------------------------------------------- d2l, restated
# Plain-Python restatements of the algorithms d2l describes (lists and slices, the random
# draws made explicit), written as an independent oracle for fastbptt.data.


def d2l_read(lines):
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def d2l_vocab(tokens):
    counter = collections.Counter(tok for line in tokens for tok in line)
    freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
    idx_to_token = ["<unk>"] + [tok for tok, _ in freqs]
    return idx_to_token


def d2l_sequential(corpus, batch_size, num_steps, offset):
    """seq_data_iter_sequential with ``offset`` given; yields (B, T) lists."""
    corpus = list(corpus)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = np.array(corpus[offset: offset + num_tokens]).reshape(batch_size, -1)
    Ys = np.array(corpus[offset + 1: offset + 1 + num_tokens]).reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield Xs[:, i: i + num_steps], Ys[:, i: i + num_steps]


def d2l_random(corpus, batch_size, num_steps, offset, permutation):
    """seq_data_iter_random with the offset and the shuffle given."""
    corpus = list(corpus)[offset:]
    num_subseqs = (len(corpus) - 1) // num_steps
    initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
    initial_indices = [initial_indices[k] for k in permutation]
    num_batches = num_subseqs // batch_size
    for i in range(0, batch_size * num_batches, batch_size):
        chosen = initial_indices[i: i + batch_size]
        yield (np.array([corpus[j: j + num_steps] for j in chosen]),
               np.array([corpus[j + 1: j + 1 + num_steps] for j in chosen]))


# ----------------------------------------------------------------------------- text and vocabulary


def test_preprocess_lines():
    lines = ["The Time Machine, by H. G. Wells [1898]\n", "\n", "  -- 42 --  \n", "I've  it's\tOK"]
    assert data.preprocess_lines(lines) == ["the time machine by h g wells", "", "", "i ve it s ok"]
    assert data.preprocess_lines(lines) == d2l_read(lines)


def test_vocab_order_and_corpus_by_hand():
    # lines "ab b" and "ba c": b ×3, a ×2, space ×2 (a seen first), c ×1; line breaks vanish
    corpus, vocab = data.load_corpus(text="ab b\nba!!C")
    assert vocab.idx_to_token == ["<unk>", "b", "a", " ", "c"]
    np.testing.assert_array_equal(corpus, [2, 1, 3, 1, 1, 2, 3, 4])
    assert corpus.dtype == np.int64
    assert vocab["b"] == 1 and vocab["?"] == 0 and vocab[["c", "zz"]] == [4, 0]
    assert vocab.to_tokens([4, 3, 0]) == ["c", " ", "<unk>"] and vocab.to_tokens(np.int64(1)) == "b"
    assert vocab.token_freqs[:2] == [("b", 3), ("a", 2)]


def test_word_tokens_and_reserved():
    corpus, vocab = data.load_corpus(text="the cat the dog\nthe end", token="word")
    assert vocab.idx_to_token[:2] == ["<unk>", "the"]
    assert vocab.to_tokens(corpus) == ["the", "cat", "the", "dog", "the", "end"]
    v = data.Vocab(["a", "b", "b"], reserved_tokens=["<bos>"], min_freq=2)
    assert v.idx_to_token == ["<unk>", "<bos>", "b"]


def test_max_tokens_keeps_the_vocabulary_of_the_whole_text():
    full, vocab = data.load_corpus(text="aaa bbb\nzzzz")
    head, vocab2 = data.load_corpus(text="aaa bbb\nzzzz", max_tokens=3)
    np.testing.assert_array_equal(head, full[:3])
    assert vocab2.idx_to_token == vocab.idx_to_token and "z" in vocab2.token_to_idx


def test_default_text_is_long_enough_for_the_default_recipe():
    text = data.default_text()
    assert "Beautiful is better than ugly." in text
    corpus, vocab = data.load_corpus()
    assert corpus.size >= data.min_tokens(35, 32, "sequential")
    assert len(vocab) == 28                    # <unk>, space, 26 letters
    np.testing.assert_array_equal(corpus, data.load_corpus(text=text)[0])


@needs_time_machine
def test_time_machine_as_d2l():
    assert data.file_sha1(TIME_MACHINE) == data.TIME_MACHINE_SHA1
    corpus, vocab = data.load_corpus(TIME_MACHINE)
    assert len(vocab) == 28 and corpus.size == 170580          # d2l: len(corpus), len(vocab)
    assert vocab.idx_to_token[:11] == ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h", "r"]
    with open(TIME_MACHINE) as f:
        lines = d2l_read(f.readlines())
    assert lines[0] == "the time machine by h g wells"
    assert vocab.idx_to_token == d2l_vocab([list(line) for line in lines])
    head, _ = data.load_corpus(TIME_MACHINE, max_tokens=10000)
    assert head.size == 10000
    assert "".join(vocab.to_tokens(head[:29])) == "the time machine by h g wells"


def test_load_corpus_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        data.load_corpus(text="abc", max_tokens=0)
    with pytest.raises(ValueError, match="either path or text"):
        data.load_corpus(tmp_path, text="abc")
    with pytest.raises(ValueError, match="token must be"):
        data.load_corpus(text="abc", token="byte")


# ----------------------------------------------------------------------------- minibatches


@pytest.mark.parametrize("N,T,B", [(35, 5, 2), (100, 7, 3), (41, 4, 4)])
def test_sequential_matches_d2l_for_every_offset(N, T, B):
    corpus = np.arange(N) * 3 + 1
    for offset in range(T + 1):
        ours = list(data._sequential(corpus, T, B, offset))
        theirs = list(d2l_sequential(corpus, B, T, offset))
        assert len(ours) == len(theirs) > 0
        for (X, Y), (Xd, Yd) in zip(ours, theirs):
            assert X.shape == (T, B) and X.dtype == np.int64 and X.flags.c_contiguous
            np.testing.assert_array_equal(X, Xd.T)
            np.testing.assert_array_equal(Y, Yd.T)


@pytest.mark.parametrize("N,T,B", [(35, 5, 2), (100, 7, 3), (41, 4, 4)])
def test_random_matches_d2l_for_every_offset(N, T, B):
    corpus = np.arange(N) * 3 + 1
    rng = np.random.default_rng(0)
    for offset in range(T):
        n_sub = (N - offset - 1) // T
        perm = rng.permutation(n_sub)
        starts = np.arange(0, n_sub * T, T)[perm] + offset
        ours = list(data._random(corpus, T, B, starts))
        theirs = list(d2l_random(corpus, B, T, offset, perm))
        assert len(ours) == len(theirs) > 0
        for (X, Y), (Xd, Yd) in zip(ours, theirs):
            np.testing.assert_array_equal(X, Xd.T)
            np.testing.assert_array_equal(Y, Yd.T)


def test_sequential_rows_continue_and_offsets_cover_0_to_T():
    T, B = 5, 3
    corpus = np.arange(200)
    offsets = set()
    rng = np.random.default_rng(1)
    for _ in range(200):
        batches = list(data.sequential_batches(corpus, T, B, rng))
        offsets.add(int(batches[0][0][0, 0]))
        for (X, Y), (X2, _) in zip(batches, batches[1:]):
            np.testing.assert_array_equal(Y, X + 1)
            np.testing.assert_array_equal(X2[0], X[-1] + 1)   # row b goes on where it stopped
    assert offsets == set(range(T + 1))
    # no generator: offset 0, the same batches every time
    first = [X for X, _ in data.sequential_batches(corpus, T, B)]
    assert first[0][0, 0] == 0
    np.testing.assert_array_equal(np.stack(first), np.stack([X for X, _ in data.sequential_batches(corpus, T, B)]))


def test_random_sampling_uses_distinct_subsequences_and_offsets_cover_0_to_T_minus_1():
    T, B = 4, 3
    corpus = np.arange(103)
    offsets = set()
    rng = np.random.default_rng(2)
    for _ in range(100):
        starts = np.concatenate([X[0] for X, _ in data.random_batches(corpus, T, B, rng)])
        assert starts.size == ((103 - starts.min() % T - 1) // T) // B * B
        assert np.unique(starts).size == starts.size
        assert len(set(starts % T)) == 1
        offsets.add(int(starts[0] % T))
    assert offsets == set(range(T))


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_min_tokens_is_exactly_enough(sampling):
    T, B = 5, 3
    need = data.min_tokens(T, B, sampling)
    offsets = range(T + 1) if sampling == "sequential" else range(T)
    for N, enough in ((need, True), (need - 1, False)):
        corpus = np.arange(N)
        counts = []
        for offset in offsets:
            if sampling == "sequential":
                counts.append(len(list(data._sequential(corpus, T, B, offset))))
            else:
                n_sub = (N - offset - 1) // T
                counts.append(len(list(data._random(corpus, T, B, np.arange(n_sub) * T + offset))))
        assert (min(counts) >= 1) == enough
    loader = data.SeqDataLoader(np.arange(need), T, B, sampling, rng=0)
    assert len(list(loader)) >= 1
    with pytest.raises(ValueError, match=f"corpus has {need - 1} tokens, fewer than the {need} needed"):
        data.SeqDataLoader(np.arange(need - 1), T, B, sampling)


def test_loader_draws_afresh_each_epoch_and_is_reproducible():
    corpus = np.arange(500)
    a = data.SeqDataLoader(corpus, 5, 4, "random", rng=7)
    b = data.SeqDataLoader(corpus, 5, 4, "random", rng=np.random.default_rng(7))
    epochs_a = [np.stack([X for X, _ in a]) for _ in range(3)]
    epochs_b = [np.stack([X for X, _ in b]) for _ in range(3)]
    for ea, eb in zip(epochs_a, epochs_b):
        np.testing.assert_array_equal(ea, eb)
    assert not np.array_equal(epochs_a[0], epochs_a[1])
    assert data.SeqDataLoader(corpus, 5, 4).carries_state and not a.carries_state


@pytest.mark.parametrize("call,exc,match", [
    (lambda: data.sequential_batches(np.arange(10.0), 2, 2), TypeError, "corpus must hold integer"),
    (lambda: data.sequential_batches(np.zeros((3, 40), int), 2, 2), ValueError, "corpus must be a 1-D"),
    (lambda: data.sequential_batches(np.arange(40), 0, 2), ValueError, "T must be a positive int"),
    (lambda: data.sequential_batches(np.arange(40), 2, 2.0), TypeError, "B must be a positive int"),
    (lambda: data.sequential_batches(np.arange(40), 2, 2, rng=2.5), TypeError, "rng must be"),
    (lambda: data.sequential_batches(np.arange(40), 2, 2, rng=-1), ValueError, "rng must be a seed >= 0"),
    (lambda: data.random_batches(np.arange(40), 2, 2, None), TypeError, "random_batches needs rng"),
    (lambda: data.SeqDataLoader(np.arange(99), 2, 2, rng=-3), ValueError, "rng must be a seed >= 0"),
    (lambda: data.sequential_batches(np.arange(6), 2, 3), ValueError, "corpus has 6 tokens, fewer than the 7"),
    (lambda: data.SeqDataLoader(np.arange(99), 2, 2, "shuffled"), ValueError, "sampling must be"),
])
def test_batches_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_an_int_seed_is_a_generator_everywhere():
    corpus = np.arange(200)
    for make in (lambda r: list(data.sequential_batches(corpus, 5, 3, r)),
                 lambda r: list(data.random_batches(corpus, 5, 3, r))):
        a, b = make(4), make(np.random.default_rng(4))
        assert len(a) == len(b) > 0
        for (Xa, Ya), (Xb, Yb) in zip(a, b):
            np.testing.assert_array_equal(Xa, Xb)
            np.testing.assert_array_equal(Ya, Yb)


# ----------------------------------------------------------------------------- streaming


def lines_oracle(text, token):
    """The old, whole-text implementation: every line in memory, d2l's cleaning per line."""
    lines = d2l_read(io.StringIO(text, newline=None).readlines())
    tokens = [list(line) if token == "char" else line.split() for line in lines]
    vocab = d2l_vocab(tokens)
    return [vocab.index(tok) for line in tokens for tok in line], vocab


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 20])
def test_streaming_in_blocks_equals_cleaning_whole_lines(monkeypatch, block):
    """Blocks may end inside a word, a run of non-letters or a line break: the result never changes."""
    monkeypatch.setattr(data, "_BLOCK", block)
    rng = random.Random(block)
    alphabet = "ab Zx,.\n\r-é  "
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 50)))
        for token in ("char", "word"):
            ids, vocab = lines_oracle(text, token)
            corpus, got = data.load_corpus(text=text, token=token)
            assert got.idx_to_token == vocab, (text, token)
            assert corpus.tolist() == ids, (text, token)
            head, _ = data.load_corpus(text=text, token=token, max_tokens=3)
            assert head.tolist() == ids[:3]


def test_a_file_is_streamed_the_same_as_text(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_BLOCK", 5)
    text = "The Time Machine, by H. G. Wells [1898]\r\n\nI\n The Time  Traveller (for so)\rwas -- here"
    (tmp_path / "t.txt").write_bytes(text.encode())
    for token in ("char", "word"):
        a, va = data.load_corpus(tmp_path / "t.txt", token=token)
        b, vb = data.load_corpus(text=text, token=token)
        np.testing.assert_array_equal(a, b)
        assert va.idx_to_token == vb.idx_to_token
    chars, vocab = data.load_corpus(tmp_path / "t.txt")
    assert "".join(vocab.to_tokens(chars)) == "the time machine by h g wellsithe time traveller for sowas here"
    assert va.to_tokens(a) == ["the", "time", "machine", "by", "h", "g", "wells", "i", "the", "time", "traveller",
                               "for", "so", "was", "here"]


def test_max_tokens_streams_a_big_file(tmp_path, monkeypatch):
    """32 MB of text, 10,000 characters kept: memory stays at a block, never the whole text.

    Before streaming, every line and every token of the file were held at once (about
    28 bytes a character: some 900 MB here).
    """
    monkeypatch.setattr(data, "_BLOCK", 1 << 16)
    line = "timetraveller" * 60 + " expounding a recondite matter, to us\n"
    path = tmp_path / "big.txt"
    with open(path, "w") as f:
        for _ in range(32_000_000 // len(line)):
            f.write(line)
    size = os.path.getsize(path)
    tracemalloc.start()
    try:
        corpus, vocab = data.load_corpus(path, max_tokens=10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert corpus.size == 10_000 and len(vocab) == 19
    assert "".join(vocab.to_tokens(corpus[:26])) == "timetraveller" * 2
    assert peak < size / 8, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"


def test_text_file_that_is_not_a_file_or_not_utf8(tmp_path):
    with pytest.raises(ValueError, match="is a directory; name a file"):
        data.load_corpus(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="is a FIFO"):           # opening it would block forever
        data.load_corpus(tmp_path / "pipe")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        data.load_corpus(tmp_path / "latin1.txt")
