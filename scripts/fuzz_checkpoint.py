"""Fuzz ``fastbptt.checkpoint.load`` (and ``read_config``): every damaged or crafted file must either
load correctly or raise ``CheckpointError``; no other exception, no crash.

    python scripts/fuzz_checkpoint.py --cases 10000 --seed 0

Cases are made from small checkpoints of each cell (RNN, GRU, LSTM; with and without an optimizer;
one layer and stacks; stored and deflated; a dropout generator of each of NumPy's bit generators)
by one of these mutations, chosen at random (seeded: a case is reproduced by ``--case N``):

  bytes      1 to 4 bytes changed, anywhere or in the zip's structure (local and central headers,
             the end record)
  truncate   the file cut short (or garbage appended)
  json       a JSON member (model.config, optim.config, extra, model.generator) with a value
             replaced (wrong type, edge or out-of-range int, ...), a key dropped or added
  npy        an array member's .npy header rewritten (dtype, shape, order, version, raw bytes)

Outcomes: ``load ok`` (a load whose model, optimizer, extra and generator are those of the file:
the original's for bytes and truncate, where the zip's CRCs guard the data; for json and npy what
the file holds, read independently with ``numpy.load``), ``CheckpointError``, or a failure:
``WRONG`` (a load that differs), ``ESCAPED <type>`` (another exception) or ``CRASH`` (the process
died). Each case runs in a worker process, so a crash is counted, not fatal. A load is followed by
draws from the model's dropout generator (where a crafted state crashes). Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

import numpy as np

BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
JSON_MEMBERS = ("model.config", "optim.config", "extra", "model.generator")
MUTATIONS = ("bytes", "truncate", "json", "npy")


# -- the checkpoints the cases start from ------------------------------------------------------

def bases():
    """(name, file bytes, what it holds) of the checkpoints the cases mutate (deterministic): what
    each holds is taken from the model and optimizer saved, not from a load."""
    import fastbptt
    from fastbptt import checkpoint, optim

    out = []
    specs = [("rnn", {}, None), ("gru", {}, "adam"), ("lstm", {}, "sgd"),
             ("rnn", {"num_layers": 2, "dropout": 0.25}, "adam"),
             ("gru", {"num_layers": 2, "bidirectional": True}, None),
             ("lstm", {"num_layers": 3, "bidirectional": True, "dropout": 0.5}, "adamw"),
             ("rnn", {"bias": False, "dtype": np.float64}, "adagrad")]
    folder = tempfile.mkdtemp(prefix="fuzz-ckpt-bases-")
    for i, (cell, kw, opt_name) in enumerate(specs):
        model = fastbptt.CELLS[cell](3, 4, 3, seed=i, **kw)
        kind = BIT_GENERATORS[i % len(BIT_GENERATORS)]
        model.generator = np.random.Generator(getattr(np.random, kind)(i))
        model.generator.random(3 + i)                 # a state part way through its buffers
        if kind in ("PCG64", "SFC64", "Philox"):
            model.generator.integers(0, 10, dtype=np.uint32)  # has_uint32 = 1
        opt = None
        if opt_name is not None:
            opt = {"adam": optim.Adam(model, lr=0.01), "sgd": optim.SGD(model, lr=0.1, momentum=0.9),
                   "adamw": optim.AdamW(model, lr=0.001), "adagrad": optim.Adagrad(model, lr=0.1)}[opt_name]
            sd = opt.state_dict()
            rng = np.random.default_rng(i)
            sd["state"] = {k: rng.random(v.shape).astype(v.dtype) for k, v in sd["state"].items()}
            sd["t"] = 3 + i
            opt.load_state_dict(sd)
        path = os.path.join(folder, f"{i}.npz")
        checkpoint.save(path, model, opt, extra={"epoch": i, "vocab": list("abc"), "note": "x" * i})
        with open(path, "rb") as f:
            raw = f.read()
        live = {"config": checkpoint.model_config(model), "flat": model.flat.copy(),
                "generator": plain(model.generator.bit_generator.state),
                "optim": None if opt is None else (opt.name, opt.t, {k: v.copy() for k, v in opt.state.items()}),
                "extra": {"epoch": i, "vocab": list("abc"), "note": "x" * i}}
        out.append((f"{cell}{i}", raw, live))
        # the same members deflated, as np.savez_compressed writes them
        out.append((f"{cell}{i}-deflated", rezip(raw, zipfile.ZIP_DEFLATED), live))
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)
    return out


def members(raw):
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def write(entries, compression=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def rezip(raw, compression):
    return write(members(raw), compression)


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# -- mutations ---------------------------------------------------------------------------------

def structure(raw):
    """Byte ranges of the zip's structure: local headers, central directory records, end record."""
    ranges = []
    for sig, fixed in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x05\x06", 22)):
        at = raw.find(sig)
        while at >= 0:
            ranges.append((at, min(len(raw), at + fixed + 16)))
            at = raw.find(sig, at + 1)
    return ranges


def mutate_bytes(rng, raw):
    raw = bytearray(raw)
    ranges = structure(bytes(raw))
    for _ in range(int(rng.integers(1, 5))):
        if ranges and rng.random() < 0.6:
            lo, hi = ranges[int(rng.integers(len(ranges)))]
            at = int(rng.integers(lo, hi))
        else:
            at = int(rng.integers(len(raw)))
        raw[at] = int(rng.integers(256)) if rng.random() < 0.7 else raw[at] ^ (1 << int(rng.integers(8)))
    return bytes(raw), "bytes"


def mutate_truncate(rng, raw):
    r = rng.random()
    if r < 0.15:
        return raw + bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8)), "append"
    cut = int(rng.integers(len(raw) - 64, len(raw))) if r < 0.6 else int(rng.integers(len(raw)))
    return raw[:max(cut, 0)], "truncate"


EDGE_INTS = [-1, 0, 1, 2, 3, 4, 5, 623, 624, 625, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1,
             2 ** 63, 2 ** 64 - 1, 2 ** 64, 2 ** 128 - 1, 2 ** 128, -(2 ** 64), 10 ** 400, 100_000, 10 ** 9]


def evil(rng, like):
    """A replacement for a JSON value ``like``: of another type, at an edge, nested, or near it."""
    choices = [list, dict, lambda: [like], lambda: {"a": like}, lambda: str(like),
               lambda: None, lambda: True, lambda: False, lambda: 1.5, lambda: -0.0, lambda: 1e308,
               lambda: float("nan"), lambda: float("inf"), lambda: "", lambda: "PCG64", lambda: "MT19937",
               lambda: EDGE_INTS[int(rng.integers(len(EDGE_INTS)))], lambda: [0] * int(rng.integers(0, 700)),
               lambda: [[1, 2]], lambda: "x" * int(rng.integers(0, 3000))]
    if isinstance(like, bool):
        choices += [lambda: not like, lambda: int(like)]
    elif isinstance(like, int):
        choices += [lambda: like + 1, lambda: like - 1, lambda: like * 2, lambda: -like, lambda: float(like),
                    lambda: like + 2 ** 64]
    elif isinstance(like, float):
        choices += [lambda: like + 1, lambda: -like, lambda: 1.0, lambda: 0.0,
                    lambda: int(like) if np.isfinite(like) else 0]
    elif isinstance(like, list):
        choices += [lambda: like[:-1], lambda: like + like[:1], lambda: like[::-1],
                    lambda: [EDGE_INTS[int(rng.integers(len(EDGE_INTS)))]] + like[1:]]
    return choices[int(rng.integers(len(choices)))]()


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list) and len(value) <= 8:
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


def mutate_json(rng, raw):
    entries = members(raw)
    present = [m for m in JSON_MEMBERS if m + ".npy" in entries]
    key = present[int(rng.integers(len(present)))]
    value = json.loads(str(np.load(io.BytesIO(entries[key + ".npy"]), allow_pickle=False)[()]))
    for _ in range(int(rng.integers(1, 3))):
        spots = list(paths(value))
        if key == "model.generator" and rng.random() < 0.5:     # a position or flag at an edge
            ints = [s for s in spots if s and isinstance(s[-1], str) and s[-1] in
                    ("pos", "buffer_pos", "has_uint32", "uinteger", "state", "inc")]
            if ints:
                spot = ints[int(rng.integers(len(ints)))]
                parent = value
                for step in spot[:-1]:
                    parent = parent[step]
                parent[spot[-1]] = EDGE_INTS[int(rng.integers(len(EDGE_INTS)))]
                continue
        spot = spots[int(rng.integers(len(spots)))]
        parent = value
        for step in spot[:-1]:
            parent = parent[step]
        r = rng.random()
        if not spot:
            value = evil(rng, value)
        elif r < 0.1 and isinstance(parent, dict):
            del parent[spot[-1]]
        elif r < 0.2 and isinstance(parent, dict):
            parent[["cell", "extra", "pos", "buffer_pos", "has_uint32", "x"][int(rng.integers(6))]] = \
                evil(rng, 1)
        else:
            parent[spot[-1]] = evil(rng, parent[spot[-1]])
    text = json.dumps(value) if rng.random() < 0.95 else json.dumps(value)[:int(rng.integers(1, 20))]
    entries[key + ".npy"] = npy(np.array(text))
    compression = zipfile.ZIP_DEFLATED if rng.random() < 0.3 else zipfile.ZIP_STORED
    return write(entries, compression), f"json {key}"


def mutate_npy(rng, raw):
    entries = members(raw)
    names = list(entries)
    name = names[int(rng.integers(len(names)))]
    data = entries[name]
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    body = data[len(data) - arr.nbytes:] if arr.nbytes else b""
    r = rng.random()
    if r < 0.7:
        descrs = ["<f4", "<f8", ">f4", ">f8", "<U5", "<U0", "|O", "<i8", "|V8", "<c8", "|b1", "<f2",
                  arr.dtype.str, arr.dtype.str, [("a", "<f4")]]
        n = arr.size
        shapes = [(n,), (n + 1,), (max(n - 1, 0),), (), (n, 1), (1, n), (0,), (2 ** 62,), (n // 2, 2),
                  arr.shape, arr.shape]
        header = {"descr": descrs[int(rng.integers(len(descrs)))],
                  "fortran_order": bool(rng.random() < 0.2),
                  "shape": shapes[int(rng.integers(len(shapes)))]}
        buf = io.BytesIO()
        try:
            if rng.random() < 0.8:
                np.lib.format.write_array_header_1_0(buf, header)
            else:
                np.lib.format.write_array_header_2_0(buf, header)
        except (ValueError, TypeError):
            return mutate_bytes(rng, raw)
        entries[name] = buf.getvalue() + body
        what = f"npy {name} header {header}"
    else:
        head = bytearray(data[:len(data) - len(body)])
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(len(head)))
            head[at] = int(rng.integers(256))
        entries[name] = bytes(head) + body
        what = f"npy {name} raw header bytes"
    return write(entries), what


def make_case(seed, index, base_list):
    rng = np.random.default_rng([seed, index])
    base_name, raw, _ = base_list[int(rng.integers(len(base_list)))]
    mutation = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    out, what = globals()[f"mutate_{mutation}"](rng, raw)
    return base_name, raw, mutation, out, what


# -- one case ----------------------------------------------------------------------------------

def plain(value):
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    return value


def same_json(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def summary(ck):
    """What a load gave, to compare."""
    from fastbptt.training.saving import model_config
    opt = ck.optimizer
    return {"config": model_config(ck.model), "flat": ck.model.flat.copy(),
            "generator": plain(ck.model.generator.bit_generator.state),
            "optim": None if opt is None else (opt.name, opt.t, {k: v.copy() for k, v in opt.state.items()}),
            "extra": ck.extra}


def same(a, b):
    if not same_json(a["config"], b["config"]) or not np.array_equal(a["flat"], b["flat"]):
        return "config or parameters"
    if not same_json(a["generator"], b["generator"]):
        return "generator"
    if (a["optim"] is None) != (b["optim"] is None):
        return "optimizer"
    if a["optim"] is not None:
        (n1, t1, s1), (n2, t2, s2) = a["optim"], b["optim"]
        if n1 != n2 or t1 != t2 or s1.keys() != s2.keys() or any(not np.array_equal(s1[k], s2[k]) for k in s1):
            return "optimizer"
    if not same_json(a["extra"], b["extra"]):
        return "extra"
    return None


def as_the_file_says(path, got):
    """Whether a load of a crafted file gave what the file holds (read here with numpy.load)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    text = lambda k: json.loads(str(arrays[k][()]))
    config = text("model.config")
    config.setdefault("cell", "rnn")
    if not {"num_layers", "bidirectional", "dropout"} & config.keys():
        config.update(num_layers=1, bidirectional=False, dropout=0.0)
    if not same_json(dict(config, dropout=float(config["dropout"])), got["config"]):
        return "config"
    if not np.array_equal(arrays["model.flat"], got["flat"]):
        return "parameters"
    if "model.generator" in arrays and not same_json(text("model.generator"), got["generator"]):
        return "generator"
    if not same_json(text("extra"), got["extra"]):
        return "extra"
    if ("optim.config" in arrays) != (got["optim"] is not None):
        return "optimizer"
    if got["optim"] is not None:
        oc = text("optim.config")
        name, t, state = got["optim"]
        if oc["name"] != name or oc["t"] != t:
            return "optimizer"
        for k, v in state.items():
            if not np.array_equal(arrays["optim.state." + k], v):
                return "optimizer state"
    return None


def run_case(seed, index, base_list, originals, folder):
    from fastbptt import checkpoint

    base_name, _, mutation, out, what = make_case(seed, index, base_list)
    path = os.path.join(folder, f"case{index}.npz")
    with open(path, "wb") as f:
        f.write(out)
    try:
        try:
            checkpoint.read_config(path)
        except checkpoint.CheckpointError:
            pass
        try:
            ck = checkpoint.load(path)
        except checkpoint.CheckpointError as exc:
            return "CheckpointError", str(exc).split(": ", 1)[-1][:80], what
        got = summary(ck)
        ck.model.generator.random(8)                          # where a crafted state crashes
        ck.model.generator.integers(0, 2 ** 31, 8, dtype=np.uint32)
        ck.model.generator.integers(0, 2 ** 62, 8)
        if mutation in ("bytes", "truncate"):
            wrong = same(got, originals[base_name])
        else:
            wrong = as_the_file_says(path, got)
        if wrong:
            return "WRONG", f"the load differs in its {wrong}", what
        return "load ok", mutation, what
    except Exception as exc:  # noqa: BLE001 - what we are counting
        tb = traceback.format_exc().strip().splitlines()
        return f"ESCAPED {type(exc).__name__}", f"{exc}"[:120] + " | " + " / ".join(tb[-4:-1])[:300], what
    finally:
        os.remove(path)


def worker(seed, start, stop):
    import warnings

    base_list = bases()
    folder = tempfile.mkdtemp(prefix="fuzz-ckpt-")
    originals = {name: live for name, _, live in base_list}
    warnings.simplefilter("ignore")                  # dropout with one layer, etc.
    for index in range(start, stop):
        print(json.dumps({"start": index}), flush=True)
        outcome, detail, what = run_case(seed, index, base_list, originals, folder)
        print(json.dumps({"case": index, "outcome": outcome, "detail": detail, "what": what}), flush=True)
    os.rmdir(folder)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", type=int, help="run only this case, in this process, and print it")
    ap.add_argument("--chunk", type=int, default=2000, help="cases per worker process")
    ap.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.seed, *args.worker)
        return 0
    if args.case is not None:
        worker(args.seed, args.case, args.case + 1)
        return 0
    t0 = time.time()
    counts = collections.Counter()
    by_mutation = collections.Counter()
    failures = []
    reasons = collections.Counter()
    next_case = 0
    while next_case < args.cases:
        stop = min(args.cases, next_case + args.chunk)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--seed", str(args.seed),
                               "--worker", str(next_case), str(stop)], capture_output=True, text=True, check=False)
        started = None
        for line in proc.stdout.splitlines():
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
                continue
            started = None
            counts[rec["outcome"]] += 1
            by_mutation[rec["outcome"], rec["what"].split()[0]] += 1
            if rec["outcome"] == "CheckpointError":
                reasons[rec["detail"].split(" ")[0]] += 1
            elif rec["outcome"] != "load ok":
                failures.append(rec)
            next_case = rec["case"] + 1
        if proc.returncode != 0:
            if started is None:
                sys.exit(f"worker failed outside a case (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
            crash = f"CRASH (signal {-proc.returncode})" if proc.returncode < 0 else f"CRASH (rc {proc.returncode})"
            counts[crash] += 1
            failures.append({"case": started, "outcome": crash,
                             "detail": proc.stderr[-300:], "what": ""})
            next_case = started + 1
    total = sum(counts.values())
    print(f"{total} cases (seed {args.seed}) in {time.time() - t0:.0f} s")
    for outcome, n in counts.most_common():
        print(f"  {outcome:24s} {n:6d}")
    print("by mutation:")
    for (outcome, mutation), n in sorted(by_mutation.items()):
        print(f"  {mutation:10s} {outcome:24s} {n:6d}")
    print("CheckpointError messages by first word:", dict(reasons.most_common(12)))
    for rec in failures[:30]:
        print(f"FAIL case {rec['case']}: {rec['outcome']}: {rec['detail']} [{rec['what'][:150]}]")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
