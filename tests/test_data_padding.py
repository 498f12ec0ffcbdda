"""fastbptt.data's tools for sequences of different lengths: pad_sequences, bucket_indices, bucket_batches."""

import re

import numpy as np
import pytest

from fastbptt import data

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None


def unpad(X, lengths):
    """The sequences back out of a padded (T, B, ...) array."""
    return [X[:n, b] for b, n in enumerate(lengths)]


# ----------------------------------------------------------------------------- pad_sequences


def test_pad_time_major_with_lengths():
    X, lengths = data.pad_sequences([[3, 1, 4], [1], [5, 9]])
    np.testing.assert_array_equal(X, [[3, 1, 5], [1, 0, 9], [4, 0, 0]])
    np.testing.assert_array_equal(lengths, [3, 1, 2])
    assert X.dtype == np.int64 and lengths.dtype == np.int64
    assert X.flags.c_contiguous


def test_pad_value_is_configurable():
    X, _ = data.pad_sequences([np.array([7, 8], dtype=np.int32), [2]], pad=-1)
    np.testing.assert_array_equal(X, [[7, 2], [8, -1]])
    assert X.dtype == np.int64          # ids become int64, whatever they came as


def test_pad_to_a_larger_T():
    X, lengths = data.pad_sequences([[1, 2], [3]], T=4, pad=9)
    np.testing.assert_array_equal(X, [[1, 3], [2, 9], [9, 9], [9, 9]])
    np.testing.assert_array_equal(lengths, [2, 1])


def test_shorter_T_is_refused_unless_truncating():
    seqs = [[1, 2], [3, 4, 5, 6], [7]]
    with pytest.raises(ValueError, match=r"sequences\[1\] has 4 steps, more than T=3.*truncate=True"):
        data.pad_sequences(seqs, T=3)
    X, lengths = data.pad_sequences(seqs, T=3, truncate=True)
    np.testing.assert_array_equal(X, [[1, 3, 7], [2, 4, 0], [0, 5, 0]])
    np.testing.assert_array_equal(lengths, [2, 3, 1])


def test_dense_features_keep_their_dtype():
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.full((1, 2), 5.0, dtype=np.float32)
    X, lengths = data.pad_sequences([a, b])
    assert X.shape == (3, 2, 2) and X.dtype == np.float32
    np.testing.assert_array_equal(X[:, 0], a)
    np.testing.assert_array_equal(X[0, 1], b[0])
    assert not X[1:, 1].any()
    np.testing.assert_array_equal(lengths, [3, 1])
    X64, _ = data.pad_sequences([a, b.astype(np.float64)])
    assert X64.dtype == np.float64                        # the common dtype
    X32, _ = data.pad_sequences([a.astype(np.float64), b], dtype=np.float32)
    assert X32.dtype == np.float32


def test_float_padding_may_be_nan():
    X, _ = data.pad_sequences([[[1.0]], [[2.0], [3.0]]], pad=np.nan)
    assert np.isnan(X[1, 0, 0]) and X[1, 1, 0] == 3.0


def test_ids_as_floats_on_request():
    X, _ = data.pad_sequences([[[0, 1]], [[1, 0], [0, 1]]], dtype=np.float64)
    assert X.dtype == np.float64
    np.testing.assert_array_equal(X[:, 1], [[1, 0], [0, 1]])


def test_callers_sequences_are_copied_never_changed():
    a, b = np.array([1, 2, 3]), np.array([4])
    X, _ = data.pad_sequences([a, b], pad=7)
    X[...] = -5
    np.testing.assert_array_equal(a, [1, 2, 3])
    np.testing.assert_array_equal(b, [4])
    X, _ = data.pad_sequences((s for s in [a]))           # any iterable
    assert not np.shares_memory(X, a)


@pytest.mark.parametrize("sequences, err, msg", [
    ([], ValueError, r"sequences is empty"),
    ([[1, 2], []], ValueError, r"sequences\[1\] is empty"),
    ("hello", TypeError, r"sequences is a string; tokenize"),
    (["ab", "c"], TypeError, r"sequences\[0\] is a string"),
    (np.zeros((3, 2), dtype=int), TypeError, r"already an array of shape \(3, 2\)"),
    ([[1, 2], [[1, 2]]], ValueError, r"sequences\[1\] has shape \(1, 2\).*1-D token ids"),
    ([np.zeros((2, 3)), np.zeros((2, 4))], ValueError, r"sequences\[1\].*3 features a step"),
    ([[True, False]], TypeError, r"sequences\[0\] must hold integer.*bool"),
    ([["a", "b"]], TypeError, r"sequences\[0\] must hold integer"),
    ([np.zeros((1, 2, 3))], ValueError, r"sequences\[0\] must be 1-D .* or 2-D"),
    ([np.zeros((2, 0))], ValueError, r"steps with no features"),
    ([[1, [2, 3]]], TypeError, r"sequences\[0\] must be a sequence"),
    ([np.ma.array([1, 2], mask=[0, 1])], TypeError, r"sequences\[0\] is a masked array"),
    (5, TypeError, r"sequences must be a list of sequences, got int"),
    ([np.array([2 ** 64 - 1], dtype=np.uint64)], ValueError, r"outside the range of dtype int64"),
])
def test_bad_sequences_are_refused_by_name(sequences, err, msg):
    with pytest.raises(err, match=msg):
        data.pad_sequences(sequences)


@pytest.mark.parametrize("kwargs, err, msg", [
    ({"T": 0}, ValueError, "T must be a positive int"),
    ({"T": 2.0}, TypeError, "T must be a positive int"),
    ({"pad": 0.5}, TypeError, "pad must be an int for integer token ids"),
    ({"pad": True}, TypeError, "pad must be a number"),
    ({"pad": "0"}, TypeError, "pad must be a number"),
    ({"pad": 300, "dtype": np.int8}, ValueError, "pad = 300 does not fit dtype int8"),
    ({"truncate": 1}, TypeError, "truncate must be True or False"),
    ({"dtype": np.float16}, TypeError, "dtype must be an integer dtype"),
    ({"dtype": "banana"}, TypeError, "dtype must be a NumPy"),
    ({"dtype": np.bool_}, TypeError, "dtype must be an integer dtype"),
])
def test_bad_options_are_refused_by_name(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        data.pad_sequences([[1, 2], [3]], **kwargs)


def test_floats_never_become_ids():
    with pytest.raises(TypeError, match="nothing is rounded silently"):
        data.pad_sequences([[0.5, 1.0]], dtype=np.int64)


# ----------------------------------------------------------------------------- values that fit the dtype


INTEGER_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def edges(dt):
    """(kept, refused): the dtype's own ends, and the values one past them (as int64 or uint64
    arrays' values, or None where no integer array of NumPy holds them)."""
    info = np.iinfo(dt)
    below = info.min - 1 if info.min - 1 >= np.iinfo(np.int64).min else None
    above = info.max + 1 if info.max + 1 <= np.iinfo(np.uint64).max else None
    return (info.min, info.max), [v for v in (below, above) if v is not None]


def ids(values, n=300, seed=0):
    """A realistic sequence of ids with ``values`` placed inside it (in an array that holds them)."""
    rng = np.random.default_rng(seed)
    dt = np.uint64 if max(values) > np.iinfo(np.int64).max else np.int64
    a = rng.integers(0, 100, n).astype(dt)
    a[np.linspace(10, n - 10, len(values)).astype(int)] = values
    return a


@pytest.mark.parametrize("dt", INTEGER_DTYPES)
def test_ids_at_the_ends_of_an_integer_dtype_are_kept_exactly(dt):
    kept, _ = edges(dt)
    seqs = [ids(kept, seed=s) for s in range(6)] + [np.array([1, 2, 3])]
    X, lengths = data.pad_sequences(seqs, dtype=dt)
    assert X.dtype == dt
    for b, s in enumerate(seqs):
        assert [int(v) for v in X[:lengths[b], b]] == [int(v) for v in s]
    for batch in data.bucket_batches(seqs, 3, targets=seqs, dtype=dt, target_dtype=dt):
        for b, i in enumerate(batch.indices):
            assert [int(v) for v in batch.X[:batch.lengths[b], b]] == [int(v) for v in seqs[i]]


@pytest.mark.parametrize("dt", INTEGER_DTYPES)
def test_ids_one_past_the_ends_of_an_integer_dtype_are_refused_not_wrapped(dt):
    _, refused = edges(dt)
    info = np.iinfo(dt)
    for v in refused:
        seqs = [ids([5], seed=1), ids([v], seed=2)]
        before = [s.copy() for s in seqs]
        where = int(np.argmax(seqs[1] == seqs[1].dtype.type(v)))
        msg = rf"sequences\[1\] holds {v} at index {where}, outside the range of dtype {np.dtype(dt)}, " \
              rf"\[{info.min}, {info.max}\]"
        with pytest.raises(ValueError, match=msg):
            data.pad_sequences(seqs, dtype=dt)
        with pytest.raises(ValueError, match=msg):
            data.bucket_batches(seqs, 2, dtype=dt)                 # refused when called
        with pytest.raises(ValueError, match=msg.replace("sequences", "targets")):
            data.bucket_batches([np.zeros(len(s), int) for s in seqs], 2, targets=seqs, target_dtype=dt)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(seqs, before))


@pytest.mark.parametrize("value, dt", [(300, np.int8), (-1, np.uint8), (2 ** 40, np.int32),
                                       (2 ** 63, np.int64), (-(2 ** 31) - 1, np.int32)])
def test_the_issues_examples_are_refused(value, dt):
    with pytest.raises(ValueError, match=f"holds {value} at index 2, outside the range of dtype"):
        data.pad_sequences([np.array([0, 1, value, 3], dtype=np.uint64 if value >= 2 ** 63 else np.int64)],
                           dtype=dt)


def test_values_dropped_by_truncation_need_not_fit():
    X, lengths = data.pad_sequences([[1, 2, 300], [4]], T=2, truncate=True, dtype=np.int8)
    assert X.T.tolist() == [[1, 2], [4, 0]] and lengths.tolist() == [2, 1]
    with pytest.raises(ValueError, match="holds 300"):
        data.pad_sequences([[1, 2, 300], [4]], T=3, truncate=True, dtype=np.int8)


@pytest.mark.parametrize("dt, bits", [(np.float32, 24), (np.float64, 53)])
def test_ids_as_floats_must_be_exact(dt, bits):
    X, _ = data.pad_sequences([np.array([2 ** bits, -(2 ** bits), 7])], dtype=dt)
    assert X[:, 0].tolist() == [2 ** bits, -(2 ** bits), 7]
    with pytest.raises(ValueError, match=rf"holds {2 ** bits + 1} at index 1, outside the integers dtype"):
        data.pad_sequences([np.array([3, 2 ** bits + 1])], dtype=dt)
    with pytest.raises(ValueError, match=rf"holds {-(2 ** bits) - 1} at index 1, outside the integers dtype"):
        data.pad_sequences([np.array([3, -(2 ** bits) - 1])], dtype=dt)


def test_features_beyond_float32_are_refused_not_made_inf():
    big = float(np.finfo(np.float32).max)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    a[[3, 7]] = [[big, -big, 0.5, np.nan], [np.inf, -np.inf, 1.25, 2.5]]   # all of these are kept as they are
    X, _ = data.pad_sequences([a, a[:10]], dtype=np.float32)
    assert X.dtype == np.float32 and np.array_equal(X[:, 0], a.astype(np.float32), equal_nan=True)
    b = a.copy()
    b[20, 1] = -1e39
    with pytest.raises(ValueError, match=r"sequences\[1\] holds -1e\+39 at index \(20, 1\), outside the range "
                                         r"of dtype float32"):
        data.pad_sequences([a, b], dtype=np.float32)
    assert np.array_equal(b[20], [b[20, 0], -1e39, b[20, 2], b[20, 3]])
    with pytest.raises(ValueError, match="targets"):
        data.bucket_batches([np.zeros(50, int), np.zeros(50, int)], 2, targets=[a, b], target_dtype=np.float32)


@pytest.mark.parametrize("values, bad", [([np.nan, 1e39], "1e+39 at index 1"),        # the only finite value
                                         ([-float(np.finfo(np.float32).max), 1e39], "1e+39 at index 1"),
                                         ([-1e39, float(np.finfo(np.float32).max)], "-1e+39 at index 0")])
def test_the_float_beyond_float32_is_named_whatever_else_the_sequence_holds(values, bad):
    with pytest.raises(ValueError, match=rf"sequences\[0\] holds {re.escape(bad)}, outside the range"):
        data.pad_sequences([np.array(values)], dtype=np.float32)

def test_non_integer_floats_never_become_ids():
    for dt in INTEGER_DTYPES:
        with pytest.raises(TypeError, match="nothing is rounded silently"):
            data.pad_sequences([np.array([1.0, 2.5])], dtype=dt)
        with pytest.raises(TypeError, match="nothing is rounded silently"):
            data.bucket_batches([[1, 2]], 1, targets=[np.array([0.5, 1.0])], target_dtype=dt)


# ----------------------------------------------------------------------------- bucket_indices


LENGTHS = np.array([5, 1, 3, 2, 4, 6, 1, 7, 2, 2, 3, 8, 1])


def test_buckets_without_rng_are_sorted_longest_first():
    batches = data.bucket_indices(LENGTHS, 4)
    # a stable sort by decreasing length, cut into batches of 4
    expected = sorted(range(LENGTHS.size), key=lambda i: -LENGTHS[i])
    assert [b.tolist() for b in batches] == [expected[i:i + 4] for i in range(0, 13, 4)]
    assert all(b.dtype == np.int64 for b in batches)


def check_partition(batches, n, batch_size, lengths, dropped=0):
    flat = np.concatenate(batches)
    assert flat.size == n - dropped and np.unique(flat).size == flat.size   # each index once
    sizes = [b.size for b in batches]
    assert sum(s < batch_size for s in sizes) <= (0 if dropped or n % batch_size == 0 else 1)
    assert max(sizes) <= batch_size
    for b in batches:                                      # longest first within a batch
        assert np.all(np.diff(lengths[b]) <= 0)


@pytest.mark.parametrize("window", [None, 1, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_buckets_partition_the_data(window, drop_last):
    batches = data.bucket_indices(LENGTHS, 3, rng=0, window=window, drop_last=drop_last)
    check_partition(batches, LENGTHS.size, 3, LENGTHS, dropped=LENGTHS.size % 3 if drop_last else 0)
    if drop_last:
        assert all(b.size == 3 for b in batches)


def test_buckets_are_seeded_and_a_generator_moves_on():
    a = data.bucket_indices(LENGTHS, 3, rng=5)
    b = data.bucket_indices(LENGTHS, 3, rng=np.random.default_rng(5))
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    gen = np.random.default_rng(0)
    epochs = [[x.tolist() for x in data.bucket_indices(LENGTHS, 3, rng=gen)] for _ in range(6)]
    assert len({str(e) for e in epochs}) > 1                # a new order every epoch


def test_global_sort_groups_similar_lengths():
    # window=None: each batch holds consecutive lengths of the sorted list, whatever the shuffle
    lengths = np.repeat(np.arange(1, 6), 4)                  # 4 sequences of each length 1..5
    for seed in range(5):
        for b in data.bucket_indices(lengths, 4, rng=seed):
            assert np.unique(lengths[b]).size == 1


def test_window_sorts_only_within_it():
    lengths = np.arange(1, 9)                                # increasing
    batches = data.bucket_indices(lengths, 2, window=2)      # windows {0..3} and {4..7}
    assert [b.tolist() for b in batches] == [[3, 2], [1, 0], [7, 6], [5, 4]]


def test_drop_last_leaves_out_random_sequences_not_the_shortest():
    lengths = np.arange(1, 8)                                # 7 sequences, batches of 3: one left out
    left_out = set()
    for seed in range(30):
        kept = np.concatenate(data.bucket_indices(lengths, 3, rng=seed, drop_last=True))
        left_out |= set(range(7)) - set(kept.tolist())
    assert len(left_out) > 2


@pytest.mark.parametrize("args, kwargs, err, msg", [
    (([], 2), {}, ValueError, "lengths must be a non-empty 1-D"),
    (([[1, 2]], 2), {}, ValueError, "lengths must be a non-empty 1-D"),
    (([1.0, 2.0], 2), {}, TypeError, "lengths must hold integers"),
    (([3, 0, 2], 2), {}, ValueError, "lengths must be >= 1, got 0 at index 1"),
    (([3, 2], 0), {}, ValueError, "batch_size must be a positive int"),
    (([3, 2], 1), {"window": 0}, ValueError, "window must be a positive int"),
    (([3, 2], 1), {"drop_last": "yes"}, TypeError, "drop_last must be True or False"),
    (([3, 2], 1), {"rng": 1.5}, TypeError, "rng must be"),
    (([3, 2], 3), {"drop_last": True}, ValueError, "2 sequences make no batch of batch_size=3"),
])
def test_bad_bucket_arguments(args, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        data.bucket_indices(*args, **kwargs)


# ----------------------------------------------------------------------------- bucket_batches


def make_tagging_data(n=11, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 20, size=rng.integers(1, 9)) for _ in range(n)]
    tags = [(s % 3).astype(np.int64) for s in seqs]
    return seqs, tags


def test_batches_are_the_padded_buckets_and_map_back():
    seqs, tags = make_tagging_data()
    batches = list(data.bucket_batches(seqs, 4, targets=tags, rng=3, pad=0, target_pad=-1))
    expected = data.bucket_indices([len(s) for s in seqs], 4, rng=3)
    assert [b.indices.tolist() for b in batches] == [e.tolist() for e in expected]
    for X, Y, lengths, idx in batches:
        X_ref, len_ref = data.pad_sequences([seqs[i] for i in idx])
        np.testing.assert_array_equal(X, X_ref)
        np.testing.assert_array_equal(lengths, len_ref)
        assert X.shape[0] == lengths.max()                   # each batch to its own longest
        for b, i in enumerate(idx):                          # column b is sequence idx[b]
            np.testing.assert_array_equal(X[:lengths[b], b], seqs[i])
            np.testing.assert_array_equal(Y[:lengths[b], b], tags[i])
            assert np.all(Y[lengths[b]:, b] == -1)
    # per-sequence results go back to the data set's order
    out = np.zeros(len(seqs), dtype=np.int64)
    for batch in batches:
        out[batch.indices] = batch.lengths
    np.testing.assert_array_equal(out, [len(s) for s in seqs])


def test_batches_to_one_T_and_without_targets():
    seqs, _ = make_tagging_data()
    for batch in data.bucket_batches(seqs, 4, T=10):
        assert batch.X.shape == (10, batch.indices.size) and batch.Y is None
    with pytest.raises(ValueError, match="more than T=3"):
        data.bucket_batches(seqs, 4, T=3)


def test_bad_batches_are_refused_when_called_not_when_iterated():
    seqs, tags = make_tagging_data()
    with pytest.raises(ValueError, match=r"targets has 10 sequences but sequences has 11"):
        data.bucket_batches(seqs, 4, targets=tags[:-1])
    bad = list(tags)
    bad[2] = np.append(bad[2], 0)                            # one step too many
    with pytest.raises(ValueError, match=r"targets\[2\] has \d+ steps but sequences\[2\] has"):
        data.bucket_batches(seqs, 4, targets=bad)
    with pytest.raises(ValueError, match=r"sequences\[1\] is empty"):
        data.bucket_batches([[1], []], 1)
    with pytest.raises(TypeError, match="target_pad must be an int"):
        data.bucket_batches(seqs, 4, targets=tags, target_pad=0.5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        data.bucket_batches(seqs, 0)


def test_dense_targets():
    rng = np.random.default_rng(1)
    seqs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (2, 5, 1)]
    tgts = [rng.normal(size=(n, 2)).astype(np.float32) for n in (2, 5, 1)]
    (X, Y, lengths, idx), = data.bucket_batches(seqs, 3, targets=tgts)
    assert X.shape == (5, 3, 3) and Y.shape == (5, 3, 2) and Y.dtype == np.float32
    np.testing.assert_array_equal(idx, [1, 0, 2])
    np.testing.assert_array_equal(Y[:2, 1], tgts[0])


# ----------------------------------------------------------------------------- properties

if given is not None:
    sequences_st = st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=12), min_size=1, max_size=15)

    @settings(max_examples=60, deadline=None)
    @given(sequences_st, st.integers(-3, 3), st.integers(0, 4))
    def test_pad_round_trips(seqs, pad, extra):
        T = max(map(len, seqs)) + extra
        X, lengths = data.pad_sequences(seqs, T=T, pad=pad)
        assert X.shape == (T, len(seqs))
        assert [list(s) for s in unpad(X, lengths)] == seqs
        for b, n in enumerate(lengths):
            assert np.all(X[n:, b] == pad)

    @settings(max_examples=60, deadline=None)
    @given(sequences_st, st.integers(1, 12))
    def test_truncation_keeps_the_first_T_steps(seqs, T):
        X, lengths = data.pad_sequences(seqs, T=T, truncate=True)
        assert X.shape == (T, len(seqs))
        assert [list(s) for s in unpad(X, lengths)] == [s[:T] for s in seqs]

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(1, 30), min_size=1, max_size=40), st.integers(1, 7),
           st.one_of(st.none(), st.integers(1, 3)), st.booleans(), st.integers(0, 2 ** 32))
    def test_buckets_always_partition(lengths, batch_size, window, drop_last, seed):
        lengths = np.array(lengths)
        if drop_last and lengths.size < batch_size:
            with pytest.raises(ValueError, match="make no batch"):
                data.bucket_indices(lengths, batch_size, rng=seed, window=window, drop_last=True)
            return
        batches = data.bucket_indices(lengths, batch_size, rng=seed, window=window, drop_last=drop_last)
        check_partition(batches, lengths.size, batch_size, lengths,
                        dropped=lengths.size % batch_size if drop_last else 0)
