"""Checkpoints from untrusted files: a damaged or crafted file either loads correctly or raises
``CheckpointError``; it costs memory near what it declares; it never crashes the process; and the
files ``save`` writes get the permissions the user's umask (or the file replaced) gives."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastbptt
from fastbptt import checkpoint, optim
from helpers import members, npy

ROOT = Path(__file__).resolve().parents[1]
BIT_GENERATORS = ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"]




def write_zip(path, arrays, compression=zipfile.ZIP_STORED):
    """arrays: {key: array or raw .npy bytes}, written as members key + '.npy'."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for key, value in arrays.items():
            zf.writestr(key + ".npy", value if isinstance(value, bytes) else npy(value))
    return path


def with_json(path, out, key, value, raw=False):
    """A copy of the checkpoint at ``path`` whose JSON member ``key`` holds ``value``."""
    arrays = members(path)
    arrays[key] = np.array(value if raw else json.dumps(value))
    return write_zip(out, arrays)


def config_of(path, key):
    return json.loads(str(members(path)[key][()]))


def model_with_generator(kind, seed=3):
    """A two-layer LSTM with dropout whose dropout generator is a ``kind`` part way through its
    buffers (has_uint32 set where the generator has it)."""
    model = fastbptt.LSTM(3, 5, 2, num_layers=2, dropout=0.3, seed=seed)
    model.generator = np.random.Generator(getattr(np.random, kind)(seed))
    model.generator.random(7)
    model.generator.integers(0, 10, dtype=np.uint32)
    return model


def draws(generator):
    return (generator.random(5).tolist(), generator.integers(0, 2 ** 31, 5, dtype=np.uint32).tolist(),
            generator.integers(0, 2 ** 62, 5).tolist())


def plain(value):
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return int(value) if isinstance(value, np.integer) else value


# ------------------------------------------------------------------- the dropout generator's state


@pytest.mark.parametrize("kind", BIT_GENERATORS)
def test_every_bit_generator_round_trips(tmp_path, kind):
    model = model_with_generator(kind)
    checkpoint.save(tmp_path / "g.npz", model)
    got = checkpoint.load(tmp_path / "g.npz").model
    assert type(got.generator.bit_generator).__name__ == kind
    assert draws(got.generator) == draws(model.generator)


def edge(kind, change):
    """The state of a ``kind`` with ``change`` ({path tuple: value}) applied, as JSON."""
    state = plain(model_with_generator(kind).generator.bit_generator.state)
    for spot, value in change.items():
        parent = state
        for step in spot[:-1]:
            parent = parent[step]
        parent[spot[-1]] = value
    return state


U32, U64, U128 = 2 ** 32 - 1, 2 ** 64 - 1, 2 ** 128 - 1
VALID_EDGES = [
    ("MT19937", {("state", "pos"): 0}), ("MT19937", {("state", "pos"): 624}),
    ("MT19937", {("state", "key"): [U32] * 624}),
    ("Philox", {("buffer_pos",): 0}), ("Philox", {("buffer_pos",): 4}),
    ("Philox", {("state", "counter"): [U64] * 4, ("state", "key"): [U64, 0], ("buffer",): [U64] * 4}),
    ("Philox", {("has_uint32",): 1, ("uinteger",): U32}),
    ("PCG64", {("state", "state"): U128, ("state", "inc"): U128}),
    ("PCG64", {("state", "state"): 0, ("state", "inc"): 1, ("has_uint32",): 0, ("uinteger",): 0}),
    ("PCG64DXSM", {("state", "state"): U128, ("has_uint32",): 1, ("uinteger",): U32}),
    ("SFC64", {("state", "state"): [U64, 0, U64, 1], ("has_uint32",): 1, ("uinteger",): U32}),
]


@pytest.mark.parametrize("kind, change", VALID_EDGES, ids=[f"{k}-{'-'.join(map(str, c))}" for k, c in VALID_EDGES])
def test_a_generator_state_at_the_edge_of_its_range_loads_and_draws(tmp_path, kind, change):
    model = model_with_generator(kind)
    checkpoint.save(tmp_path / "g.npz", model)
    state = edge(kind, change)
    got = checkpoint.load(with_json(tmp_path / "g.npz", tmp_path / "edge.npz", "model.generator", state)).model
    assert plain(got.generator.bit_generator.state) == state
    reference = np.random.Generator(getattr(np.random, kind)())
    reference.bit_generator.state = state
    assert draws(got.generator) == draws(reference)


INVALID = [(k, {("state", "pos"): v}) for k in ["MT19937"] for v in (-1, 625, 2 ** 31 - 1, -(2 ** 31), True, 1.0, "3")]
INVALID += [("MT19937", {("state", "key"): [1] * n}) for n in (623, 625, 0)]
INVALID += [("MT19937", {("state", "key", 0): v}) for v in (2 ** 32, -1, 1.5, True, None)]
INVALID += [("Philox", {("buffer_pos",): v}) for v in (-1, 5, 2 ** 31 - 1, -(2 ** 31), False, 4.0)]
INVALID += [("Philox", {("state", "counter"): [1] * 3}), ("Philox", {("state", "counter"): [1] * 5}),
            ("Philox", {("state", "counter", 0): 2 ** 64}), ("Philox", {("state", "counter", 3): -1}),
            ("Philox", {("state", "key"): [1]}), ("Philox", {("state", "key"): [1] * 3}),
            ("Philox", {("buffer",): [1] * 3}), ("Philox", {("buffer", 0): 2 ** 64}),
            ("Philox", {("has_uint32",): 2}), ("Philox", {("uinteger",): 2 ** 32})]
INVALID += [(k, c) for k in ("PCG64", "PCG64DXSM") for c in (
    {("state", "state"): 2 ** 128}, {("state", "state"): -1}, {("state", "inc"): 2 ** 128},
    {("state", "inc"): 1.0}, {("has_uint32",): 2}, {("has_uint32",): -1}, {("uinteger",): 2 ** 32},
    {("uinteger",): -1}, {("state", "extra"): 1}, {("has_uint32",): True})]
INVALID += [("SFC64", {("state", "state"): [1] * 3}), ("SFC64", {("state", "state"): [1] * 5}),
            ("SFC64", {("state", "state", 1): 2 ** 64}), ("SFC64", {("has_uint32",): 7})]
INVALID += [(k, {("bit_generator",): v}) for k in ("PCG64",)
            for v in ("RandomState", "BitGenerator", "SeedSequence", "Generator", ["PCG64"], None, "pcg64")]
INVALID += [("Philox", {("buffer_pos",): None}), ("MT19937", {("state",): [1, 2]}), ("SFC64", {("state",): None})]

CHILD = """
import json, sys, warnings
import numpy as np
from fastbptt import checkpoint
warnings.simplefilter("ignore")
for i, path in enumerate(json.load(open(sys.argv[1]))):
    try:
        model = checkpoint.load(path).model
    except checkpoint.CheckpointError:
        print(i, "refused", flush=True)
        continue
    model.generator.random(10_000)                  # where a crafted state crashes
    model.generator.integers(0, 2 ** 31, 10_000, dtype=np.uint32)
    print(i, "loaded", flush=True)
"""


def test_a_crafted_generator_state_is_refused_and_never_crashes(tmp_path):
    """Out-of-range positions, words too wide, keys of the wrong length, flags that are not 0/1,
    bools and floats for ints, missing or extra keys, no bit generator: each a CheckpointError.
    Loaded and drawn from in a child process, so a crash fails this test instead of pytest."""
    files = []
    for kind in BIT_GENERATORS:
        checkpoint.save(tmp_path / f"{kind}.npz", model_with_generator(kind))
    for i, (kind, change) in enumerate(INVALID):
        if len(next(iter(change))) == 1 and next(iter(change))[0] == "state":      # the whole 'state'
            state = plain(model_with_generator(kind).generator.bit_generator.state)
            state["state"] = change["state",]
        else:
            state = edge(kind, change)
        files.append(str(with_json(tmp_path / f"{kind}.npz", tmp_path / f"bad{i}.npz", "model.generator", state)))
    (tmp_path / "files.json").write_text(json.dumps(files))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "files.json")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, check=False)
    done = dict(line.split() for line in proc.stdout.split("\n") if line)
    crashed = None if proc.returncode == 0 else INVALID[len(done)]
    assert proc.returncode == 0, f"the child died (rc {proc.returncode}) loading {crashed}: {proc.stderr[-500:]}"
    loaded = [INVALID[int(i)] for i, what in done.items() if what != "refused"]
    assert len(done) == len(INVALID) and loaded == []


def test_check_generator_state_is_public_for_other_generators():
    """What the loader checks ``model.generator`` with, for a program's own generators (the
    batches' ``rng`` a training script keeps in ``extra``)."""
    state = plain(np.random.default_rng(5).bit_generator.state)
    rng = np.random.default_rng()
    rng.bit_generator.state = checkpoint.check_generator_state(state)
    assert rng.random() == np.random.default_rng(5).random()
    with pytest.raises(ValueError, match=r"\['state'\]\['inc'\] must be an int in \[0, "):
        checkpoint.check_generator_state(dict(state, state={"state": 1, "inc": 2 ** 128}))


@pytest.mark.parametrize("kind, field, bits", [
    ("PCG64", ("uinteger",), 32), ("MT19937", ("state", "key", 5), 32), ("SFC64", ("state", "state", 0), 64),
    ("Philox", ("buffer", 3), 64), ("PCG64", ("state", "inc"), 128)])
def test_a_word_of_a_generator_state_is_an_int_from_0_to_its_largest(kind, field, bits):
    state = plain(getattr(np.random, kind)(1).state)
    *outer, last = field
    holder = state
    for key in outer:
        holder = holder[key]
    for value in (0, 2 ** bits - 1):
        holder[last] = value
        checkpoint.check_generator_state(state)
    for value in (-1, 2 ** bits):
        holder[last] = value
        with pytest.raises(ValueError, match=rf"must be an int in \[0, {2 ** bits - 1}\], got {value}$"):
            checkpoint.check_generator_state(state)

@pytest.mark.parametrize("kind", BIT_GENERATORS)
def test_check_generator_state_takes_a_live_state_with_its_arrays(kind):
    """A ``.state`` as NumPy gives it (MT19937's key and Philox's words as arrays), unconverted."""
    bit_generator = getattr(np.random, kind)(4)
    rng = np.random.Generator(getattr(np.random, kind)())
    rng.bit_generator.state = checkpoint.check_generator_state(bit_generator.state)
    assert rng.random() == np.random.Generator(bit_generator).random()


def test_a_generator_state_takes_numpy_ints_and_names_a_list_of_the_wrong_length():
    state = plain(np.random.PCG64(1).state)
    state["uinteger"], state["has_uint32"] = np.uint32(7), np.int64(1)
    checkpoint.check_generator_state(state)
    state = plain(np.random.MT19937(1).state)
    state["state"]["key"] = state["state"]["key"][:-1]
    with pytest.raises(ValueError, match=r"\['state'\]\['key'\] must be a list of 624 ints, got \["):
        checkpoint.check_generator_state(state)

def test_a_generator_state_of_other_keys_is_refused_naming_them():
    state = plain(np.random.PCG64(1).state)
    state["state"]["more"] = 1
    with pytest.raises(ValueError, match=r"\['state'\] must hold exactly \['inc', 'state'\], "
                                         r"got \['inc', 'more', 'state'\]"):
        checkpoint.check_generator_state(state)

# --------------------------------------------------------- every failure of a file: CheckpointError


@pytest.fixture
def saved(tmp_path):
    model = fastbptt.GRU(4, 6, 4, num_layers=2, seed=1)
    opt = optim.Adam(model, lr=0.01)
    sd = opt.state_dict()
    sd["state"] = {k: np.full_like(v, 0.5) for k, v in sd["state"].items()}
    sd["t"] = 2
    opt.load_state_dict(sd)
    checkpoint.save(tmp_path / "good.npz", model, opt, extra={"epoch": 2, "vocab": ["a", "b"]})
    return tmp_path / "good.npz"


def central_records(raw):
    """{member name: offset of its central directory record}."""
    out, at = {}, raw.find(b"PK\x01\x02")
    while at >= 0:
        n = int.from_bytes(raw[at + 28:at + 30], "little")
        out[bytes(raw[at + 46:at + 46 + n]).decode("cp437")] = at
        at = raw.find(b"PK\x01\x02", at + 1)
    return out


def local_header(raw, name):
    at = central_records(raw)[name]
    return int.from_bytes(raw[at + 42:at + 46], "little")


def patch(raw, at, value, size=2):
    raw[at:at + size] = value.to_bytes(size, "little")


def damage_local_name(raw):          # BadZipFile: the names in the directory and the header differ
    at = local_header(raw, "model.config.npy")
    raw[at + 30 + 2] ^= 0x20


def damage_local_magic(raw):         # BadZipFile: bad magic number for file header
    raw[local_header(raw, "model.flat.npy") + 2] = 0


def damage_version(raw):             # NotImplementedError: zip file version 7.0, at ZipFile()
    patch(raw, central_records(raw)["extra.npy"] + 6, 70)


def damage_encrypted(raw):           # RuntimeError: the file is encrypted, password required
    for name in ("model.config.npy", "model.flat.npy"):
        at = central_records(raw)[name]
        patch(raw, at + 8, int.from_bytes(raw[at + 8:at + 10], "little") | 0x1)


def damage_patched_data(raw):        # NotImplementedError: compressed patched data (flag 0x20)
    patch(raw, central_records(raw)["model.flat.npy"] + 8, 0x20)


def damage_utf8_name(raw):           # UnicodeDecodeError, at ZipFile(): a UTF-8 flag on a non-UTF-8 name
    at = central_records(raw)["format.npy"]
    patch(raw, at + 8, 0x800)
    raw[at + 46] = 0xFF


def damage_central_offset(raw):      # OSError (a negative seek): the end record's offset of the directory
    end = raw.rfind(b"PK\x05\x06")      # moved on, so zipfile shifts every member's offset back before 0
    offset = int.from_bytes(raw[end + 16:end + 20], "little")
    patch(raw, end + 16, offset + 4096, 4)


def damage_deflate(raw):             # zlib.error: invalid block type, in a deflated member
    at = local_header(raw, "model.flat.npy")
    n, m = (int.from_bytes(raw[at + k:at + k + 2], "little") for k in (26, 28))
    raw[at + 30 + n + m] = 0x07                              # BFINAL, BTYPE = 11 (reserved)


ZIP_DAMAGE = {f.__name__[len("damage_"):]: f for f in (
    damage_local_name, damage_local_magic, damage_version, damage_encrypted, damage_patched_data,
    damage_utf8_name, damage_central_offset, damage_deflate)}


@pytest.mark.parametrize("kind", list(ZIP_DAMAGE))
def test_a_damaged_zip_raises_checkpoint_error(saved, tmp_path, kind):
    source = saved
    if kind == "deflate":
        source = write_zip(tmp_path / "deflated.npz", members(saved), zipfile.ZIP_DEFLATED)
    raw = bytearray(source.read_bytes())
    ZIP_DAMAGE[kind](raw)
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    target = fastbptt.GRU(4, 6, 4, num_layers=2, seed=9)
    before = target.flat.copy()
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(tmp_path / "bad.npz", target)
    np.testing.assert_array_equal(target.flat, before)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(tmp_path / "bad.npz")
    try:
        checkpoint.read_config(tmp_path / "bad.npz")        # it reads only format and model.config
    except checkpoint.CheckpointError:
        pass


def damage_sizes(raw):               # both sizes of a stored member, equal, past the end of the file
    at = central_records(raw)["extra.npy"]
    for k in (20, 24):                              # compressed and uncompressed size
        patch(raw, at + k, len(raw), 4)


@pytest.mark.parametrize("damage", [damage_sizes, damage_central_offset])
def test_a_member_declaring_data_beyond_the_file_is_refused_from_the_directory(saved, tmp_path, damage):
    """Sizes past the end of the file, or offsets before its start (the directory moved on):
    refused by the directory check, before anything reads the member."""
    raw = bytearray(saved.read_bytes())
    damage(raw)
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="declares more data than the file holds"):
        checkpoint.load(tmp_path / "bad.npz")


def test_an_encrypted_member_is_named_as_such(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    damage_encrypted(raw)
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="'model.config.npy' is encrypted"):
        checkpoint.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("length", [97, 98, 99, 200])
def test_a_value_quoted_in_a_message_is_cut_past_100_characters(saved, tmp_path, length):
    """A message quotes a value's repr whole up to 100 characters, else its first 97 and '...'."""
    cell = "c" * length
    bad = with_json(saved, tmp_path / "bad.npz", "model.config", dict(config_of(saved, "model.config"), cell=cell))
    quoted = repr(cell) if len(repr(cell)) <= 100 else repr(cell)[:97] + "..."
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(bad)
    assert f"cell {quoted} is not one of" in str(info.value)

def test_a_damaged_zip_found_outside_a_member_read_names_the_file(saved, monkeypatch):
    """The last resort: what the zip layers raise anywhere else is a CheckpointError naming the file."""
    def damaged(path, zf):
        raise zipfile.BadZipFile("a damaged directory")
    monkeypatch.setattr(checkpoint, "_open_members", damaged)
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"^{re.escape(repr(str(saved)))} .*its zip structure is damaged "
                             r"\(BadZipFile: a damaged directory\)"):
        checkpoint.load(saved)


def test_optimizer_state_without_optim_config_is_refused(tmp_path):
    checkpoint.save(tmp_path / "m.npz", fastbptt.RNN(2, 3, 2, seed=1))
    arrays = members(tmp_path / "m.npz")
    arrays["optim.state.exp_avg"] = np.zeros_like(arrays["model.flat"])
    write_zip(tmp_path / "bad.npz", arrays)
    with pytest.raises(checkpoint.CheckpointError, match="unexpected member 'optim.state.exp_avg.npy'"):
        checkpoint.load(tmp_path / "bad.npz")


def test_a_file_without_model_generator_loads(tmp_path):
    """Files written before there were stacks have no model.generator: the model keeps its own."""
    model = fastbptt.RNN(2, 3, 2, seed=1)
    checkpoint.save(tmp_path / "m.npz", model)
    arrays = members(tmp_path / "m.npz")
    del arrays["model.generator"]
    got = checkpoint.load(write_zip(tmp_path / "old.npz", arrays)).model
    assert np.array_equal(got.flat, model.flat) and isinstance(got.generator, np.random.Generator)


def test_the_layer_bound_is_8_bytes_per_layer_and_direction_as_stored(tmp_path):
    """model.flat as stored takes 16 * L bytes: L bidirectional layers pass the bound (and fail on
    the array's shape), L + 1 are refused by it."""
    model = fastbptt.RNN(2, 4, 2, bidirectional=True, dtype="float64", seed=1)     # 74 parameters
    checkpoint.save(tmp_path / "m.npz", model)
    arrays = members(tmp_path / "m.npz")
    stored = len(npy(arrays["model.flat"]))                                          # 128 + 8 * 74
    assert stored % 16 == 0
    config = json.loads(str(arrays["model.config"][()]))
    for layers, match in [(stored // 16, "'model.flat.npy': holds dtype"),
                          (stored // 16 + 1, f"declares {stored // 16 + 1} layers in both directions")]:
        arrays["model.config"] = np.array(json.dumps(dict(config, num_layers=layers)))
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.load(write_zip(tmp_path / "bad.npz", arrays))

def raw_npy(header, version=(1, 0)):
    """A .npy file whose header is ``header`` (bytes) as it is, padded as numpy pads it."""
    pad = -(10 + len(header) + 1) % 64
    return np.lib.format.magic(*version) + (len(header) + pad + 1).to_bytes(2, "little") + header + \
        b" " * pad + b"\n"


NPY_HEADERS = {
    "unclosed brackets": b"{'descr': [((((((((((('<f4', 'fortran_order': False, 'shape': (3,), }",  # TokenError
    "not a dict": b"[1, 2, 3]",
    "negative shape": b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
    "shape of floats": b"{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,), }",
    "unknown dtype": b"{'descr': '<q9', 'fortran_order': False, 'shape': (3,), }",
    "a call": b"{'descr': __import__('os').getcwd(), 'fortran_order': False, 'shape': (3,), }",
    "too deep": b"{'descr': " + b"[" * 300 + b"]" * 300 + b", 'fortran_order': False, 'shape': (3,), }",
    "not text": bytes(range(128, 200)),
}


@pytest.mark.parametrize("member", ["model.flat", "model.config", "optim.state.exp_avg"])
@pytest.mark.parametrize("kind", list(NPY_HEADERS))
def test_a_npy_header_numpy_cannot_parse_raises_checkpoint_error(saved, tmp_path, kind, member):
    arrays = {k: npy(v) for k, v in members(saved).items()}
    arrays[member] = raw_npy(NPY_HEADERS[kind]) + b"\0" * 64
    write_zip(tmp_path / "bad.npz", arrays)
    with pytest.raises(checkpoint.CheckpointError, match=f"member '{member}.npy'"):
        checkpoint.load(tmp_path / "bad.npz")


WRONG_JSON = {
    "optimizer name a list": ("optim.config", lambda c: dict(c, name=["adam"]), "name must be a string"),
    "optimizer name a dict": ("optim.config", lambda c: dict(c, name={"adam": 1}), "name must be a string"),
    "lr too large for a float": ("optim.config", lambda c: dict(c, hyper=dict(c["hyper"], lr=10 ** 400)),
                                 "hyper 'lr' must be a number"),
    "betas nested": ("optim.config", lambda c: dict(c, hyper=dict(c["hyper"], betas=[[0.9], 0.99])),
                     "hyper 'betas' must be a number or a list"),
    "beta too large": ("optim.config", lambda c: dict(c, hyper=dict(c["hyper"], betas=[0.9, 10 ** 400])),
                       "hyper 'betas'"),
    "hyper a list": ("optim.config", lambda c: dict(c, hyper=[0.01]), "hyper must be a JSON object"),
    "step count a list": ("optim.config", lambda c: dict(c, t=[2]), "step count t must be an int"),
    "optim.config a list": ("optim.config", lambda c: [c], "optim.config must hold name, hyper and t"),
    "optim.config another key": ("optim.config", lambda c: dict(c, lr=1),
                                 r"must hold name, hyper and t, got \['hyper', 'lr', 'name', 't'\]"),
    "activation a list": ("model.config", lambda c: dict(c, cell="rnn", activation=["tanh"]), "activation"),
    "dtype a list": ("model.config", lambda c: dict(c, dtype=["float32"]), "dtype must be"),
    "cell a list": ("model.config", lambda c: dict(c, cell=["gru"]), "cell"),
    "num_layers a bool": ("model.config", lambda c: dict(c, num_layers=True), "num_layers must be a positive int"),
    "num_layers huge": ("model.config", lambda c: dict(c, num_layers=10 ** 30), "layers"),
    "hidden size huge": ("model.config", lambda c: dict(c, hidden_size=2 ** 70), "model.flat.npy"),
    "dropout a list": ("model.config", lambda c: dict(c, dropout=[0.1]), r"dropout must be a number in \[0, 1\]"),
    "dropout above 1": ("model.config", lambda c: dict(c, dropout=1.5), r"dropout must be a number in \[0, 1\]"),
    "dropout NaN": ("model.config", lambda c: dict(c, dropout=float("nan")), "dropout must be"),
    "extra a list": ("extra", lambda c: [c], "'extra.npy' must hold a JSON object"),
    "extra a string": ("extra", lambda c: "epoch", "'extra.npy' must hold a JSON object"),
    "generator a list": ("model.generator", lambda c: [c], "model.generator must be the state"),
    "generator name a list": ("model.generator", lambda c: dict(c, bit_generator=["PCG64"]),
                              "model.generator must be the state"),
}


@pytest.mark.parametrize("kind", list(WRONG_JSON))
def test_json_of_the_wrong_type_raises_checkpoint_error(saved, tmp_path, kind):
    key, change, match = WRONG_JSON[kind]
    bad = with_json(saved, tmp_path / "bad.npz", key, change(config_of(saved, key)))
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load(bad)
    if key == "model.config":
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.read_config(bad)


def test_an_int_hyperparameter_a_float_can_hold_loads(saved, tmp_path):
    config = config_of(saved, "optim.config")
    hyper = dict(config["hyper"], lr=10 ** 300)
    good = with_json(saved, tmp_path / "lr.npz", "optim.config", dict(config, hyper=hyper))
    assert checkpoint.load(good).optimizer.state_dict()["hyper"]["lr"] == 1e300

def test_save_refuses_an_extra_that_load_would_refuse(tmp_path):
    with pytest.raises(TypeError, match="extra must be a dict"):
        checkpoint.save(tmp_path / "e.npz", fastbptt.RNN(2, 3, 2), extra=[1, 2])
    assert not (tmp_path / "e.npz").exists()


def load_fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_checkpoint", ROOT / "scripts" / "fuzz_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_fuzz_of_the_loader_gives_only_correct_loads_and_checkpoint_errors(capsys):
    """scripts/fuzz_checkpoint.py, small: 400 cases of byte changes, truncations, crafted JSON
    members and .npy headers over checkpoints of every cell (the full run: --cases 10000)."""
    fuzz = load_fuzz()
    code = fuzz.main(["--cases", "400", "--seed", "16", "--chunk", "400"])
    out = capsys.readouterr().out
    assert code == 0, out
    counts = {line.split()[0]: int(line.split()[-1]) for line in out.splitlines()[1:3]}
    assert out.startswith("400 cases") and counts.keys() == {"CheckpointError", "load"}, out


def test_train_resume_of_a_damaged_zip_exits_2_with_one_line(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    damage_local_name(raw)
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    proc = subprocess.run([sys.executable, "-m", "fastbptt", "train", "--hidden", "8", "--steps", "5",
                           "--batch", "2", "--max-tokens", "500", "--quiet", "--epochs", "2",
                           "--resume", str(tmp_path / "bad.npz")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and "CheckpointError" not in errors[0] and "model.config.npy" in errors[0], proc.stderr


# ------------------------------------------------------------------------- small files, large costs


def peak_of(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("with_optimizer", [False, True], ids=["model", "model and Adam"])
@pytest.mark.parametrize("deflated", [False, True], ids=["stored", "deflated"])
def test_loading_costs_about_the_bytes_the_file_declares(tmp_path, with_optimizer, deflated):
    """A model of 4 M parameters (16 MB of float32; a 16 kB file when deflated, as its weights are
    zeros): loading allocates the arrays the file declares once, not a randomly initialized model
    to overwrite (which cost 5x)."""
    model = fastbptt.RNN(1, 2000, 1, seed=0)
    model.flat[:] = 0
    opt = optim.Adam(model, lr=0.01) if with_optimizer else None
    checkpoint.save(tmp_path / "big.npz", model, opt)
    path = tmp_path / "big.npz"
    if deflated:
        path = write_zip(tmp_path / "small.npz", members(path), zipfile.ZIP_DEFLATED)
    declared = model.flat.nbytes * (3 if with_optimizer else 1)
    got, peak = peak_of(lambda: checkpoint.load(path))
    assert got.model.n_params == model.n_params and (got.optimizer is not None) == with_optimizer
    assert peak <= 1.5 * declared + 2_000_000, f"{peak / declared:.2f}x the {declared / 1e6:.0f} MB declared"
    target = fastbptt.RNN(1, 2000, 1, seed=1)               # into a model: one copy of the parameters
    _, peak = peak_of(lambda: checkpoint.load(path, target))
    assert peak <= 1.5 * declared + 2_000_000, f"{peak / declared:.2f}x the {declared / 1e6:.0f} MB declared"
    np.testing.assert_array_equal(target.flat, 0)


def deep(tmp_path, num_layers, stored_bytes=None):
    """A tiny deflated file declaring an Elman RNN(1, 1, 1) without bias of ``num_layers`` layers
    (its parameters zeros: 8 bytes a layer, deflated about 1000:1)."""
    base = fastbptt.RNN(1, 1, 1, bias=False, num_layers=2)
    checkpoint.save(tmp_path / "base.npz", base)
    arrays = members(tmp_path / "base.npz")
    config = config_of(tmp_path / "base.npz", "model.config")
    arrays["model.config"] = np.array(json.dumps(dict(config, num_layers=num_layers)))
    arrays["model.flat"] = np.zeros(2 * num_layers + 1, np.float32)
    return write_zip(tmp_path / "deep.npz", arrays, zipfile.ZIP_DEFLATED)


def test_a_tiny_file_declaring_100000_layers_is_refused_before_it_is_built(tmp_path):
    """The 4.5 kB file that took 33 s and 560 MB (100,000 layers' views, dicts, random draws): its
    800 kB of parameters take 1 kB of the file, less than the 8 bytes any layer takes at the least."""
    path = deep(tmp_path, 100_000)
    assert path.stat().st_size < 10_000
    for fn in (lambda: checkpoint.load(path), lambda: checkpoint.read_config(path)):
        tracemalloc.start()
        try:
            with pytest.raises(checkpoint.CheckpointError, match="declares 100000 layers"):
                fn()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 5_000_000, f"{peak / 1e6:.0f} MB to refuse a {path.stat().st_size} byte file"


def test_a_deep_model_whose_file_holds_its_layers_loads(tmp_path):
    """The bound is the least a layer takes: a stored file of 300 layers of H = 1 loads."""
    model = fastbptt.RNN(1, 1, 1, bias=False, num_layers=300, seed=2)
    checkpoint.save(tmp_path / "deep.npz", model)
    got = checkpoint.load(tmp_path / "deep.npz").model
    assert got.num_layers == 300 and np.array_equal(got.flat, model.flat)


def with_extra_text(tmp_path, text):
    base = fastbptt.RNN(2, 3, 2)
    checkpoint.save(tmp_path / "base.npz", base)
    arrays = members(tmp_path / "base.npz")
    arrays["extra"] = np.array(text)
    return write_zip(tmp_path / "extra.npz", arrays, zipfile.ZIP_DEFLATED)


def test_a_small_file_whose_json_would_cost_5x_its_size_is_refused(tmp_path):
    """16 MB of UTF-32 JSON, [[], [], ...], deflated to 30 kB, parsed to 90 MB of empty lists:
    refused from the text, at about the memory the member declares."""
    path = with_extra_text(tmp_path, '{"x": [' + "[]," * 1_333_333 + "[]]}")
    declared = members(path)["extra"].nbytes
    tracemalloc.start()
    try:
        with pytest.raises(checkpoint.CheckpointError, match="JSON arrays and objects in .* characters"):
            checkpoint.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 1.5 * declared + 2_000_000, f"{peak / declared:.2f}x the {declared / 1e6:.0f} MB declared"


def test_json_of_ordinary_density_loads(tmp_path):
    """A history of pairs (json.dumps writes '[1, 2.5], ': 10 characters a list) and a small
    JSON of nothing but containers load."""
    extra = {"history": [[i, 2.5] for i in range(20_000)], "nested": [[[[[]]]]] * 20}
    assert checkpoint.load(with_extra_text(tmp_path, json.dumps(extra))).extra == extra


def json_of(containers, length):
    """An extra of exactly ``containers`` arrays and objects in exactly ``length`` characters."""
    text = '{"a": [' + ", ".join(["[]"] * (containers - 2)) + '], "p": ""}'
    assert len(text) <= length
    return text[:-2] + "x" * (length - len(text)) + '"}'


@pytest.mark.parametrize("objects", [False, True])
def test_the_json_bound_is_256_containers_and_one_per_8_characters(tmp_path, objects):
    """The most a member may hold loads; one container more is refused (arrays or objects)."""
    for length in (8 * 400, 8 * 400 + 7):
        most = 256 + length // 8
        text = json_of(most, length)
        if objects:
            text = text.replace("[]", "{}")
        assert len(text) == length and text.count("[") + text.count("{") == most
        assert checkpoint.load(with_extra_text(tmp_path, text)).extra == json.loads(text)
        text = json_of(most + 1, length)
        if objects:
            text = text.replace("[]", "{}")
        with pytest.raises(checkpoint.CheckpointError, match=f"holds {most + 1} JSON arrays and objects"):
            checkpoint.load(with_extra_text(tmp_path, text))

# ------------------------------------------------------------------------------- file permissions


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_checkpoint_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        checkpoint.save(tmp_path / "m.npz", fastbptt.RNN(2, 3, 2))
    finally:
        os.umask(old)
    assert oct((tmp_path / "m.npz").stat().st_mode & 0o777) == oct(mode)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]           # no temporary file left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o664])
def test_replacing_a_checkpoint_keeps_its_mode(tmp_path, mode):
    path = tmp_path / "m.npz"
    checkpoint.save(path, fastbptt.RNN(2, 3, 2, seed=1))
    os.chmod(path, mode)
    old = os.umask(0o077)
    try:
        checkpoint.save(path, fastbptt.RNN(2, 3, 2, seed=2))
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(mode)
    assert np.array_equal(checkpoint.load(path).model.flat, fastbptt.RNN(2, 3, 2, seed=2).flat)


def test_a_temporary_name_already_taken_is_left_alone_and_another_one_tried(tmp_path, monkeypatch):
    """save's temporary file is created exclusively: a file already at the name it drew (another
    process's) is neither written nor moved; the next name is used."""
    names = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(checkpoint, "secrets", type("S", (), {"token_hex": staticmethod(lambda n: next(names))}))
    taken = tmp_path / f".fastbptt-{'0' * 16}.npz.tmp"
    taken.write_bytes(b"another process's file")
    model = fastbptt.RNN(2, 3, 2, seed=1)
    checkpoint.save(tmp_path / "m.npz", model)
    assert taken.read_bytes() == b"another process's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.npz", taken.name])
    assert np.array_equal(checkpoint.load(tmp_path / "m.npz").model.flat, model.flat)

# ------------------------------------------------------------------------------------ dropout 1


def test_a_checkpoint_of_dropout_1_loads(tmp_path):
    """torch.nn's range of dropout is [0, 1]: a stack saved with dropout=1 loads with it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fastbptt.GRU(3, 4, 2, num_layers=2, dropout=1.0)
    checkpoint.save(tmp_path / "d.npz", model)
    assert checkpoint.read_config(tmp_path / "d.npz")["dropout"] == 1.0
    assert checkpoint.load(tmp_path / "d.npz").model.dropout == 1.0


def test_save_makes_the_file_and_its_rename_durable(tmp_path, monkeypatch):
    """fsync of the new file before it replaces the old one, then of the folder (a crash right after
    'saved' must not leave the name pointing at an empty file)."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")),
                                                 real(fd))[1])
    model = fastbptt.RNN(3, 4, 3)
    checkpoint.save(tmp_path / "a.npz", model)
    assert len(synced) == 2 and synced[0].endswith(".npz.tmp") and synced[1] == os.path.realpath(tmp_path)
