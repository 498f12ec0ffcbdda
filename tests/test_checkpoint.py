"""Damaged and hostile checkpoints: refused from the zip directory and the .npy headers, before
anything is built, allocated or decompressed, with a message that names the bad member."""

import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest

import fastbptt
from fastbptt import checkpoint, optim
from helpers import members, npy


def write_zip(path, entries, compression=zipfile.ZIP_STORED):
    """entries: {member name: bytes}, written as they are."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, raw in entries.items():
            zf.writestr(name, raw)


def rewrite(path, out, change=None, drop=(), add=None):
    """A copy of a checkpoint with arrays changed (key -> array), dropped or added (name -> bytes)."""
    arrays = members(path)
    arrays.update(change or {})
    entries = {k + ".npy": npy(v) for k, v in arrays.items() if k not in drop}
    entries.update(add or {})
    write_zip(out, entries)
    return out


@pytest.fixture
def saved(tmp_path):
    model = fastbptt.RNN(5, 8, 5, seed=1)
    opt = optim.Adam(model, lr=0.01)
    opt.step(np.ones(model.n_params, np.float32))
    path = tmp_path / "good.npz"
    checkpoint.save(path, model, opt, extra={"epoch": 3})
    return path


def config_with(path, **change):
    config = json.loads(str(members(path)["model.config"]))
    config.update(change)
    return np.array(json.dumps(config))


def optim_config_with(path, **change):
    config = json.loads(str(members(path)["optim.config"]))
    config.update(change)
    return np.array(json.dumps(config))


DAMAGE = {
    "member missing": (lambda p, o: rewrite(p, o, drop=("optim.state.exp_avg",)),
                       r"optimizer state \['exp_avg'\] is missing"),
    "extra missing": (lambda p, o: rewrite(p, o, drop=("extra",)), "member 'extra.npy' is missing"),
    "flat missing": (lambda p, o: rewrite(p, o, drop=("model.flat",)), "member 'model.flat.npy' is missing"),
    "wrong dtype": (lambda p, o: rewrite(p, o, change={"model.flat": members(p)["model.flat"].astype(np.float64)}),
                    "holds dtype float64 and shape .*, not float32"),
    "wrong shape": (lambda p, o: rewrite(p, o, change={"model.flat": np.zeros(7, np.float32)}),
                    r"holds dtype float32 and shape \(7,\), not float32 and \(157,\)"),
    "state of the wrong dtype": (lambda p, o: rewrite(p, o, change={"optim.state.exp_avg_sq": np.zeros(157)}),
                                 "member 'optim.state.exp_avg_sq.npy': holds dtype float64"),
    "object array": (lambda p, o: write_zip(o, {**{k + ".npy": npy(v) for k, v in members(p).items()},
                                                "model.flat.npy": np.lib.format.magic(1, 0) + b"x"}) or o,
                     "member 'model.flat.npy'"),
    "huge hidden size": (lambda p, o: rewrite(p, o, change={"model.config": config_with(p, hidden_size=8000)}),
                         r"not float32 and \(64088005,\)"),
    "size not an int": (lambda p, o: rewrite(p, o, change={"model.config": config_with(p, hidden_size="8")}),
                        "hidden_size must be a positive int"),
    "activation": (lambda p, o: rewrite(p, o, change={"model.config": config_with(p, activation="sigmoid")}),
                   "activation 'sigmoid' is not one of"),
    "dtype": (lambda p, o: rewrite(p, o, change={"model.config": config_with(p, dtype="float16")}),
              "dtype must be 'float32' or 'float64'"),
    "config not JSON": (lambda p, o: rewrite(p, o, change={"model.config": np.array("{hidden")}),
                        "member 'model.config.npy' is not JSON"),
    "config nested too deep": (lambda p, o: rewrite(p, o, change={"extra": np.array("[        " * 100000)}),
                               "member 'extra.npy' is not JSON"),
    "negative step count": (lambda p, o: rewrite(p, o, change={"optim.config": optim_config_with(p, t=-4)}),
                            "optim.config: the step count t must be an int"),
    "step count not an int": (lambda p, o: rewrite(p, o, change={"optim.config": optim_config_with(p, t=2.5)}),
                              "the step count t must be an int"),
    "huge step count": (lambda p, o: rewrite(p, o, change={"optim.config": optim_config_with(p, t=10 ** 30)}),
                        "the step count t must be an int"),
    "unknown optimizer": (lambda p, o: rewrite(p, o, change={"optim.config": optim_config_with(p, name="lbfgs")}),
                          "unknown optimizer 'lbfgs'"),
    "bad hyperparameter": (lambda p, o: rewrite(p, o, change={"optim.config": optim_config_with(
        p, hyper={"lr": -1.0})}), "lr must be > 0"),
    "extra member": (lambda p, o: rewrite(p, o, add={"payload.npy": npy(np.zeros(3))}),
                     "unexpected member 'payload.npy'"),
    "extra state member": (lambda p, o: rewrite(p, o, add={"optim.state.velocity.npy": npy(np.zeros(157, np.float32))}),
                           "unexpected member 'optim.state.velocity.npy'"),
    "member not .npy": (lambda p, o: rewrite(p, o, add={"notes.txt": b"hello"}), "unexpected member 'notes.txt'"),
    "format": (lambda p, o: rewrite(p, o, change={"format": np.array("other-format-9")}),
               "is not a fastbptt checkpoint"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_and_the_model_untouched(saved, tmp_path, kind):
    make, match = DAMAGE[kind]
    bad = make(saved, tmp_path / "bad.npz")
    target = fastbptt.RNN(5, 8, 5, seed=9)
    before = target.flat.copy()
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load(bad, target if kind not in ("huge hidden size", "activation") else None)
    np.testing.assert_array_equal(target.flat, before)
    with pytest.raises(ValueError):                       # CheckpointError is a ValueError
        checkpoint.load(bad)


def test_the_good_checkpoint_still_loads(saved):
    got = checkpoint.load(saved)
    assert got.extra == {"epoch": 3} and got.optimizer.t == 1


def test_a_huge_declared_model_is_refused_without_allocating_it(saved, tmp_path):
    """A small file whose config declares H = 20,000 (1.6 GB of float32) and whose flat header declares
    that many values: refused from the sizes, with almost no memory used."""
    n = 5 * 20000 + 20000 ** 2 + 20000 + 5 * 20000 + 5
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
    entries = {k + ".npy": npy(v) for k, v in members(saved).items() if not k.startswith("optim")}
    entries["model.config.npy"] = npy(config_with(saved, hidden_size=20000))
    entries["model.flat.npy"] = header.getvalue() + b"\0" * 1024
    write_zip(tmp_path / "bomb.npz", entries)
    tracemalloc.start()
    try:
        with pytest.raises(checkpoint.CheckpointError, match="model.flat.npy"):
            checkpoint.load(tmp_path / "bomb.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak / 1e6:.0f} MB allocated to refuse a 2 kB file"


def patch_central_directory(raw, name, offset, value):
    """Overwrite 4 bytes at ``offset`` of member ``name``'s central-directory record."""
    start = 0
    while True:
        start = raw.index(b"PK\x01\x02", start)
        name_len = int.from_bytes(raw[start + 28:start + 30], "little")
        if raw[start + 46:start + 46 + name_len] == name.encode():
            raw[start + offset:start + offset + 4] = value.to_bytes(4, "little")
            return raw
        start += 4


def test_a_member_that_claims_more_than_the_file_holds(saved, tmp_path):
    """The zip directory's declared size is checked against the file before the member is read."""
    raw = bytearray(saved.read_bytes())
    for offset in (20, 24):                               # compressed and uncompressed sizes: 1 GB
        patch_central_directory(raw, "model.flat.npy", offset, 1 << 30)
    (tmp_path / "claims.npz").write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="declares more data than the file holds"):
        checkpoint.load(tmp_path / "claims.npz")


def test_a_corrupted_byte_is_caught_by_the_crc(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    flat = members(saved)["model.flat"]
    at = raw.find(flat.tobytes()[:16])
    raw[at + 8] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="model.flat.npy"):
        checkpoint.load(tmp_path / "flipped.npz")


def test_an_unknown_zip_bomb_member_is_never_decompressed(saved, tmp_path, monkeypatch):
    """64 MB of zeros deflated to 64 kB under an unknown name: refused by name, unread."""
    entries = {k + ".npy": npy(v) for k, v in members(saved).items()}
    entries["bomb.npy"] = b"\0" * (64 << 20)
    write_zip(tmp_path / "bomb.npz", entries, zipfile.ZIP_DEFLATED)
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)
    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(checkpoint.CheckpointError, match="unexpected member 'bomb.npy'"):
        checkpoint.load(tmp_path / "bomb.npz")
    assert "bomb.npy" not in opened and opened == []        # refused from the directory alone


def test_a_deflated_member_claiming_an_impossible_ratio(saved, tmp_path):
    entries = {k + ".npy": npy(v) for k, v in members(saved).items()}
    write_zip(tmp_path / "deflated.npz", entries, zipfile.ZIP_DEFLATED)
    assert checkpoint.load(tmp_path / "deflated.npz").optimizer.t == 1     # np.savez_compressed-like: fine
    raw = bytearray((tmp_path / "deflated.npz").read_bytes())
    patch_central_directory(raw, "model.flat.npy", 24, 1 << 31)               # uncompressed size: 2 GB
    (tmp_path / "ratio.npz").write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="declares 2147483648 bytes from"):
        checkpoint.load(tmp_path / "ratio.npz")


@pytest.mark.parametrize("content", [b"not a zip at all", None], ids=["text", "npy"])
def test_a_file_that_is_not_an_npz_says_so(tmp_path, content):
    """Not the misleading 'allow_pickle' hint of np.load: what the file is not, and what to pass."""
    path = tmp_path / "model.npz"
    if content is None:
        np.save(path.with_suffix(".npy"), np.zeros(3))
        path = path.with_suffix(".npy")
    else:
        path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=r"not a \.npz \(zip\) archive") as exc:
        checkpoint.load(path)
    assert "allow_pickle" not in str(exc.value) and "checkpoint.save" in str(exc.value)


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        checkpoint.load(tmp_path)


def test_save_checks_its_path_first(tmp_path):
    model = fastbptt.RNN(2, 3, 2)
    with pytest.raises(ValueError, match="is a directory"):
        checkpoint.save(tmp_path, model)
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.save(tmp_path / "no" / "m.npz", model)
    assert list(tmp_path.iterdir()) == []
