"""Save a model, its optimizer and any JSON metadata to one ``.npz``; load them back.

Loading restores every bit: the parameters, the optimizer's state arrays, step count
and hyperparameters, so training resumed from a checkpoint continues exactly as
it would have without stopping (given the same batches; keep what produces them,
such as a random generator's state, in ``extra``). Files hold only arrays and
JSON strings, and ``load`` checks a file's zip directory and array headers before it
reads (or allocates) anything, so a damaged or hostile file is refused with a
``CheckpointError`` (a ``ValueError``) that names the bad member.

Every cell is saved the same way. The model's configuration (``model.config``, JSON)
names its cell: ``{"cell": "rnn", "input_size", "hidden_size", "output_size",
"activation", "bias", "dtype", "num_layers", "bidirectional", "dropout"}`` for the
Elman RNN, the same without ``activation`` for the GRU and the LSTM. Files written
before there were other cells hold no ``cell``: they are Elman checkpoints, and still
load; files written before there were stacks hold no ``num_layers``, ``bidirectional``
and ``dropout``: they are one-layer, one-direction models without dropout, and still load.

The state of the model's dropout generator (``model.generator``) is saved too
(``model.generator``, JSON), so that a resumed run draws the same dropout masks as one
that never stopped. Files without it leave the generator as it is.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import NamedTuple

import numpy as np

from .._paths import check_output_path
from ..core.cells import CELLS as CELL_MODULES
from ..core.model import ACTIVATIONS, CELLS, RNNBase
from .data import check_text_file
from .optim import Optimizer, optimizer_from_state_dict
from .optim import check_config as check_optimizer

FORMAT = "fastbptt-checkpoint-1"


class Checkpoint(NamedTuple):
    """What ``load`` returns."""

    model: RNNBase          # a fastbptt.RNN, GRU or LSTM, as the file says
    optimizer: Optimizer | None
    extra: dict


STACK_DEFAULTS = {"num_layers": 1, "bidirectional": False, "dropout": 0.0}
"""What a file written before there were stacks means: one layer, one direction, no dropout."""


def model_config(model):
    """The cell and the constructor arguments that fix a model (what the file records)."""
    config = {"cell": model.cell, "input_size": model.input_size, "hidden_size": model.hidden_size,
              "output_size": model.output_size}
    if model.cell == "rnn":
        config["activation"] = model.activation
    config.update(bias=model.bias, dtype=model.dtype.name, num_layers=model.num_layers,
                  bidirectional=model.bidirectional, dropout=model.dropout)
    return config


def _describe(config):
    act = f", activation={config['activation']!r}" if "activation" in config else ""
    stack = "".join(f", {key}={config[key]!r}" for key, default in STACK_DEFAULTS.items()
                    if config.get(key, default) != default)
    return (f"{CELLS[config.get('cell', 'rnn')].__name__}(input_size={config['input_size']}, "
            f"hidden_size={config['hidden_size']}, output_size={config['output_size']}{act}, "
            f"bias={config['bias']}, dtype={config['dtype']}{stack})")


def _build(config):
    """A new model of the (checked) configuration; its parameters are overwritten by the caller."""
    cls = CELLS[config["cell"]]
    kwargs = {"activation": config["activation"]} if config["cell"] == "rnn" else {}
    return cls(config["input_size"], config["hidden_size"], config["output_size"], bias=config["bias"],
               dtype=config["dtype"], num_layers=config["num_layers"],
               bidirectional=config["bidirectional"], dropout=config["dropout"], **kwargs)


def save(path, model, optimizer=None, extra=None):
    """Write ``model`` (and ``optimizer``, and ``extra``) to ``path``, replacing it atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Written exactly as named (no ``.npz`` is appended).
    model : fastbptt.RNN, GRU or LSTM
    optimizer : fastbptt.optim.Optimizer, optional
        Must be bound to ``model``.
    extra : dict, optional
        JSON-serializable metadata (epoch, a generator's ``bit_generator.state``, ...).
    """
    if not isinstance(model, RNNBase):
        raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
    arrays = {"format": np.array(FORMAT),
              "model.config": np.array(json.dumps(model_config(model))),
              "model.generator": np.array(json.dumps(_plain(model.generator.bit_generator.state))),
              "model.flat": model.flat}
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a fastbptt.optim.Optimizer, got {type(optimizer).__name__}")
        if optimizer.model is not model:
            raise ValueError("optimizer updates a different model than the one being saved")
        sd = optimizer.state_dict()
        arrays["optim.config"] = np.array(json.dumps({"name": sd["name"], "hyper": sd["hyper"], "t": sd["t"]}))
        for name, value in sd["state"].items():
            arrays[f"optim.state.{name}"] = value
    try:
        arrays["extra"] = np.array(json.dumps({} if extra is None else extra))
    except TypeError as exc:
        raise TypeError(f"extra must be JSON-serializable: {exc}") from None
    path = check_output_path(path, "path", replace=True)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastbptt-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _plain(value):
    """A bit generator's state as plain JSON values (MT19937's key and Philox's counter are arrays)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    return value


class CheckpointError(ValueError):
    """The file is not a whole, undamaged fastbptt checkpoint (a ``ValueError``)."""


_TEXT_LIMITS = {"format": 1 << 10, "model.config": 1 << 16, "model.generator": 1 << 16,
                "optim.config": 1 << 16, "extra": 1 << 28}
"""Largest declared size, in bytes, of each JSON member's .npy file (extra: 256 MiB)."""

_MAX_DEFLATE_RATIO = 1100
"""Deflate expands data by at most about 1032:1; a member that claims more is damaged."""


def _fail(path, what):
    return CheckpointError(f"{path!r} is not a fastbptt checkpoint, or is damaged: {what}")


def _open_members(path, zf):
    """The zip directory as {name: ZipInfo}, checked before any member is read.

    Every name must be one ``save`` writes (``optim.state.*`` are matched later); each
    member's declared sizes must fit inside the file.
    """
    size = os.path.getsize(path)
    members = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise _fail(path, f"unexpected member {info.filename!r}")
        key = info.filename[:-4]
        if key in members:
            raise _fail(path, f"member {info.filename!r} appears twice")
        if key not in _TEXT_LIMITS and key != "model.flat" and not key.startswith("optim.state."):
            raise _fail(path, f"unexpected member {info.filename!r}")
        if info.header_offset + info.compress_size > size:
            raise _fail(path, f"member {info.filename!r} declares more data than the file holds")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise _fail(path, f"member {info.filename!r} declares two different sizes")
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1):
                raise _fail(path, f"member {info.filename!r} declares {info.file_size} bytes from "
                                  f"{info.compress_size} compressed")
        else:
            raise _fail(path, f"member {info.filename!r} uses compression method {info.compress_type}, "
                              f"not stored or deflated")
        members[key] = info
    for key in ("format", "model.config", "model.flat", "extra"):
        if key not in members:
            raise _fail(path, f"member {key + '.npy'!r} is missing")
    return members


def _header(path, zf, info, dtype=None, shape=None, kind=None):
    """Open a member and read its .npy header only; check it against what is expected.

    Returns the open stream, positioned at the data, and the dtype and shape.
    """
    fp = zf.open(info)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shp, fortran, dt = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shp, fortran, dt = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f".npy version {version}")
        if kind is not None and (dt.kind != kind or shp != ()):
            raise ValueError(f"holds an array of dtype {dt} and shape {shp}, not a string")
        if dtype is not None and (dt != dtype or shp != shape or (fortran and len(shp) > 1)):
            raise ValueError(f"holds dtype {dt} and shape {shp}, not {np.dtype(dtype)} and {shape}")
        nbytes = int(np.prod(shp, dtype=object)) * dt.itemsize
        if fp.tell() + nbytes != info.file_size:
            raise ValueError(f"declares {fp.tell() + nbytes} bytes, but the archive says {info.file_size}")
        if kind is not None and nbytes > _TEXT_LIMITS[info.filename[:-4]]:
            raise ValueError(f"declares a string of {nbytes} bytes")
    except (ValueError, EOFError, SyntaxError, TypeError, OverflowError, zipfile.BadZipFile, OSError) as exc:
        fp.close()
        raise _fail(path, f"member {info.filename!r}: {exc}") from None
    return fp, dt, shp


def _read_data(path, fp, info, dt, shp):
    """Read the array a header announced, to the end of the member (which checks its CRC)."""
    try:
        with fp:
            out = np.empty(shp, dtype=dt)
            view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
            got = 0
            while got < len(view):
                n = fp.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != len(view) or fp.read(1):
                raise ValueError("its data has the wrong length")
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _fail(path, f"member {info.filename!r}: {exc}") from None
    return out


def _read_text(path, zf, members, key):
    info = members[key]
    fp, dt, shp = _header(path, zf, info, kind="U")
    return str(_read_data(path, fp, info, dt, shp)[()])


def _read_json(path, zf, members, key):
    text = _read_text(path, zf, members, key)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"member {key + '.npy'!r} is not JSON: {exc}") from None


def _check_model_config(path, config):
    """The saved cell and constructor arguments, each of the right type, as a new dict (with
    ``cell``, "rnn" for the files of the Elman-only release, and ``STACK_DEFAULTS`` for the files
    written before there were stacks); and the parameter count they give."""
    if not isinstance(config, dict):
        raise _fail(path, f"model.config must be a JSON object, got {config!r}")
    config = dict(config)
    cell = config.setdefault("cell", "rnn")          # written before there were other cells
    if not isinstance(cell, str) or cell not in CELLS:
        raise _fail(path, f"model.config cell {cell!r} is not one of {sorted(CELLS)}")
    keys = {"cell", "input_size", "hidden_size", "output_size", "bias", "dtype"}
    if cell == "rnn":
        keys.add("activation")
    if not STACK_DEFAULTS.keys() & config.keys():    # written before there were stacks
        config.update(STACK_DEFAULTS)
    if set(config) != keys | STACK_DEFAULTS.keys():
        raise _fail(path, f"model.config of a {cell!r} cell must hold exactly {sorted(keys)} and "
                          f"{sorted(STACK_DEFAULTS)} (or none of these three), got {config!r}")
    for key in ("input_size", "hidden_size", "output_size"):
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _fail(path, f"model.config {key} must be a positive int, got {v!r}")
    if cell == "rnn" and config["activation"] not in ACTIVATIONS:
        raise _fail(path, f"model.config activation {config['activation']!r} is not one of "
                          f"{sorted(ACTIVATIONS)}")
    if not isinstance(config["bias"], bool):
        raise _fail(path, f"model.config bias must be true or false, got {config['bias']!r}")
    if config["dtype"] not in ("float32", "float64"):
        raise _fail(path, f"model.config dtype must be 'float32' or 'float64', got {config['dtype']!r}")
    L, p = config["num_layers"], config["dropout"]
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise _fail(path, f"model.config num_layers must be a positive int, got {L!r}")
    if not isinstance(config["bidirectional"], bool):
        raise _fail(path, f"model.config bidirectional must be true or false, got {config['bidirectional']!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise _fail(path, f"model.config dropout must be a number in [0, 1), got {p!r}")
    config["dropout"] = float(p)
    return config, _n_params(config)


def _n_params(config):
    """The size of the flat buffer of the configuration, counted without listing L layers."""
    D, H, O, bias = config["input_size"], config["hidden_size"], config["output_size"], config["bias"]
    dirs = 2 if config["bidirectional"] else 1

    def layer(inputs):      # one direction of one layer: the cell's layout without the readout
        return sum(int(np.prod(shape, dtype=object))
                   for name, shape in CELL_MODULES[config["cell"]].param_layout(inputs, H, O, bias)
                   if name not in ("W_qh", "b_q"))
    readout = O * dirs * H + (O if bias else 0)
    return dirs * layer(D) + (config["num_layers"] - 1) * dirs * layer(dirs * H) + readout


def load(path, model=None):
    """Read a checkpoint written by ``save``.

    Nothing is built, allocated or decompressed before the file has been checked from
    its zip directory and the headers of its arrays: every member must be one ``save``
    writes (an unknown one is refused by name, unread), and every declared dtype, shape
    and size must agree with the saved configuration and with the size of the file.

    Parameters
    ----------
    path : str or os.PathLike
    model : fastbptt.RNN, GRU or LSTM, optional
        Load the parameters (and the dropout generator's state) into this model, which
        must have the saved cell and configuration (sizes, activation, bias, dtype,
        num_layers, bidirectional, dropout); else a ``ValueError`` says how they differ.
        None builds a new model of the saved configuration (``fastbptt.CELLS``). The model
        is changed only once the whole file has been read.

    Returns
    -------
    Checkpoint
        ``(model, optimizer, extra)``: the optimizer (None if none was saved) is a new
        one bound to the model, in the saved state.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CheckpointError
        (a ``ValueError``) The file is not a fastbptt checkpoint, or is damaged: a member
        missing, unknown or of the wrong dtype or shape, a declared size the file cannot
        hold, a tampered configuration or step count.
    ValueError
        ``model`` has another layout than the saved one.
    """
    if model is not None and not isinstance(model, RNNBase):
        raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, or None, got {type(model).__name__}")
    path, zf = _open_zip(path)
    with zf:
        return _load(path, zf, model)


def read_config(path):
    """The cell and constructor arguments of the model a checkpoint holds, without loading it.

    Only the file's zip directory, format and ``model.config`` are read, checked as
    ``load`` checks them (a ``CheckpointError`` otherwise).

    Returns
    -------
    dict
        ``cell`` ("rnn" also for the files of the Elman-only release, which do not name
        it), ``input_size``, ``hidden_size``, ``output_size``, ``bias``, ``dtype``,
        ``num_layers``, ``bidirectional``, ``dropout`` (1, False and 0.0 for the files
        written before there were stacks) and, for the Elman cell, ``activation``.
    """
    path, zf = _open_zip(path)
    with zf:
        return _read_model_config(path, zf, _open_members(path, zf))[0]


def _open_zip(path):
    path = check_text_file(path, "checkpoint")
    try:
        return path, zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path!r} is not a fastbptt checkpoint: not a .npz (zip) archive ({exc}); "
                              f"pass a file written by fastbptt.checkpoint.save or "
                              f"'python -m fastbptt train --save'") from None


def _read_model_config(path, zf, members):
    """The format, then the checked model configuration and its parameter count."""
    if _read_text(path, zf, members, "format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a fastbptt checkpoint (format {FORMAT!r})")
    return _check_model_config(path, _read_json(path, zf, members, "model.config"))


def _load(path, zf, model):
    members = _open_members(path, zf)
    config, n = _read_model_config(path, zf, members)
    if model is not None and model_config(model) != config:
        cell = config["cell"]
        hint = "" if model.cell == cell else \
            f" (a checkpoint of the {cell!r} cell loads into a fastbptt.{CELLS[cell].__name__})"
        raise ValueError(f"checkpoint {path!r} holds {_describe(config)}, but the model is "
                         f"{_describe(model_config(model))}{hint}")
    dtype = np.dtype(config["dtype"])
    headers = {"model.flat": _header(path, zf, members["model.flat"], dtype, (n,))}
    try:
        opt_config = None
        prefix = "optim.state."
        saved_states = {k[len(prefix):] for k in members if k.startswith(prefix)}
        if "optim.config" in members:
            opt_config = _read_json(path, zf, members, "optim.config")
            if not isinstance(opt_config, dict) or set(opt_config) != {"name", "hyper", "t"}:
                raise _fail(path, f"optim.config must hold name, hyper and t, got {opt_config!r}")
            try:
                names = check_optimizer(opt_config["name"], opt_config["hyper"], opt_config["t"])
            except ValueError as exc:
                raise _fail(path, f"optim.config: {exc}") from None
            missing, unknown = set(names) - saved_states, saved_states - set(names)
            if missing:
                raise _fail(path, f"optimizer state {sorted(missing)} is missing")
        else:
            unknown = saved_states
        if unknown:
            raise _fail(path, f"unexpected member {prefix + sorted(unknown)[0] + '.npy'!r}")
        for name in sorted(saved_states):
            headers[prefix + name] = _header(path, zf, members[prefix + name], dtype, (n,))
        extra = _read_json(path, zf, members, "extra")
        generator = None
        if "model.generator" in members:            # written before there were stacks: absent
            generator = _generator(path, _read_json(path, zf, members, "model.generator"))
        arrays = {}
        for key in list(headers):                  # everything checked: now read the data
            fp, dt, shp = headers.pop(key)
            arrays[key] = _read_data(path, fp, members[key], dt, shp)
    finally:
        for fp, _, _ in headers.values():
            fp.close()
    if model is None:
        model = _build(config)
    optimizer = None
    if opt_config is not None:
        sd = dict(opt_config, state={k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        try:
            optimizer = optimizer_from_state_dict(model, sd)
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"optimizer state: {exc}") from None
    model.flat[...] = arrays["model.flat"]
    if generator is not None:
        _restore_generator(model, generator)
    return Checkpoint(model, optimizer, extra)


_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def _generator(path, state):
    """A new Generator in the saved state (checked on it, so the model's is never half set)."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise _fail(path, f"model.generator must be the state of one of numpy's bit generators "
                          f"{list(_BIT_GENERATORS)}, got {str(state)[:100]!r}")
    bit = getattr(np.random, name)()
    try:
        bit.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise _fail(path, f"model.generator: the state of a {name} cannot be restored ({exc!r})") from None
    return np.random.Generator(bit)


def _restore_generator(model, generator):
    """The saved state into ``model.generator`` in place (those who hold it see it), or the saved
    generator itself when the model's draws from another kind of bit generator."""
    if type(model.generator.bit_generator) is type(generator.bit_generator):
        model.generator.bit_generator.state = generator.bit_generator.state
    else:
        model.generator = generator
