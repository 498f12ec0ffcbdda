"""Save a model, its optimizer and any JSON metadata to one ``.npz``; load them back.

Loading restores every bit: the parameters, the optimizer's state arrays, step count
and hyperparameters, so training resumed from a checkpoint continues exactly as
it would have without stopping (given the same batches; keep what produces them,
such as a random generator's state, in ``extra``). Files hold only arrays and
JSON strings, and ``load`` checks a file's zip directory and array headers before it
reads (or allocates) anything, so a damaged or hostile file is refused with a
``CheckpointError`` (a ``ValueError``) that names the bad member. That is the contract for
an untrusted file: it loads correctly or raises ``CheckpointError`` (never another
exception, never a crash: a generator's state is checked in full before it is set), and
loading it costs about the memory it declares (the model is built over the parameters
read, and a structure out of proportion to the file's bytes is refused before it is built).
``scripts/fuzz_checkpoint.py`` fuzzes this.

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
import secrets
import stat
import struct
import tokenize
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

from .._paths import check_output_path
from ..core.cells import CELLS as CELL_MODULES
from ..core.model import ACTIVATIONS, CELLS, RNNBase
from .data import check_text_file
from .optim import OPTIMIZERS, Optimizer
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


def _build(config, flat):
    """A model of the (checked) configuration whose parameters are ``flat`` itself (read from the
    file): nothing is drawn at random, allocated or copied for its parameters."""
    cls = CELLS[config["cell"]]
    kwargs = {"activation": config["activation"]} if config["cell"] == "rnn" else {}
    model = cls._over(flat, config["input_size"], config["hidden_size"], config["output_size"],
                      config["bias"], num_layers=config["num_layers"],
                      bidirectional=config["bidirectional"], **kwargs)
    model.dropout = config["dropout"]
    return model


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

    A new file gets the permissions ``open()`` gives (0666 less the umask); a file
    replaced keeps its permission bits.
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
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict (of JSON-serializable values) or None, got {type(extra).__name__}")
    try:
        arrays["extra"] = np.array(json.dumps({} if extra is None else extra))
    except TypeError as exc:
        raise TypeError(f"extra must be JSON-serializable: {exc}") from None
    path = check_output_path(path, "path", replace=True)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _new_file(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            try:                                 # replacing a file keeps its permissions
                mode = stat.S_IMODE(os.stat(path).st_mode) & 0o777
            except FileNotFoundError:
                mode = None                      # a new file: the umask's (0666 & ~umask), as open() gives
            if mode is not None:
                os.chmod(tmp, mode)
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())                 # on disk before it replaces the old file
        os.replace(tmp, path)
        _fsync_folder(folder)                    # ... and the rename too
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync_folder(folder):
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:                              # Windows, or a folder we may write but not read
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file(folder):
    """A new, empty temporary file in ``folder`` (opened for writing), created with mode 0666 less
    the umask, as ``open(path, "w")`` would (``tempfile.mkstemp`` makes 0600 whatever the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".fastbptt-{secrets.token_hex(8)}.npz.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder!r}")


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

_MIN_LAYER_BYTES = 8
"""Bytes of ``model.flat`` a layer and direction takes at the least (two float32 weights: an Elman
layer of H = 1 without bias); a file must hold that many per layer and direction in ``model.flat``
as stored (compressed or not), which bounds the objects a model's layout makes per byte of the file."""

_READ_CHUNK = 1 << 20
"""Bytes read from a member at a time, straight into the array (no copy of the whole member)."""

_DAMAGED = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, struct.error, EOFError, OSError,
            NotImplementedError, RuntimeError)
"""What the zip and zlib layers raise on a damaged archive (bad headers, data, flags, sizes)."""


def _fail(path, what):
    return CheckpointError(f"{path!r} is not a fastbptt checkpoint, or is damaged: {what}")


def _short(value):
    """A value from a file, as a message quotes it (its repr, cut at 100 characters)."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _why(exc):
    """An exception's message, with its type unless it is a plain ValueError (ours, or NumPy's)."""
    return str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}"


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
        if info.header_offset < 0 or info.compress_size < 0 or info.file_size < 0 \
                or info.header_offset + info.compress_size > size:
            raise _fail(path, f"member {info.filename!r} declares more data than the file holds")
        if info.flag_bits & 0x1:
            raise _fail(path, f"member {info.filename!r} is encrypted")
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
    fp = None
    try:
        fp = zf.open(info)
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
    except (ValueError, SyntaxError, TypeError, OverflowError, RecursionError, tokenize.TokenError,
            *_DAMAGED) as exc:                  # what a damaged .npy header makes numpy's parser raise
        if fp is not None:
            fp.close()
        raise _fail(path, f"member {info.filename!r}: {_why(exc)}") from None
    return fp, dt, shp


def _read_data(path, fp, info, dt, shp, out=None):
    """Read the array a header announced, to the end of the member (which checks its CRC), into
    ``out`` (a new array when None), a chunk at a time, so that nothing holds a second copy."""
    try:
        with fp:
            if out is None:
                out = np.empty(shp, dtype=dt)
            view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
            got = 0
            while got < len(view):
                n = fp.readinto(view[got:got + _READ_CHUNK])
                if not n:
                    break
                got += n
            if got != len(view) or fp.read(1):
                raise ValueError("its data has the wrong length")
    except (ValueError, *_DAMAGED) as exc:
        raise _fail(path, f"member {info.filename!r}: {_why(exc)}") from None
    return out


def _read_text(path, zf, members, key):
    info = members[key]
    fp, dt, shp = _header(path, zf, info, kind="U")
    return _read_data(path, fp, info, dt, shp).item()        # a str, made once (no np.str_ between)


_JSON_CHARS_PER_CONTAINER = 8
"""Characters of a JSON member per array or object, at the least (beyond ``_JSON_CONTAINERS``):
an empty list costs 64 bytes of Python objects for its 3 characters (``[],``, 12 bytes of the
file's UTF-32), so a text of little else would cost 5x what it declares; ``[1, 2], `` passes."""

_JSON_CONTAINERS = 256
"""Arrays and objects any JSON member may hold, whatever its length."""


def _read_json(path, zf, members, key):
    text = _read_text(path, zf, members, key)
    containers = text.count("[") + text.count("{")        # (and any in strings: an upper bound)
    if containers > _JSON_CONTAINERS + len(text) // _JSON_CHARS_PER_CONTAINER:
        raise _fail(path, f"member {key + '.npy'!r} holds {containers} JSON arrays and objects in "
                          f"{len(text)} characters, more than one per {_JSON_CHARS_PER_CONTAINER}: out "
                          f"of proportion to its size")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"member {key + '.npy'!r} is not JSON: {exc}") from None


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_model_config(path, config):
    """The saved cell and constructor arguments, each of the right type, as a new dict (with
    ``cell``, "rnn" for the files of the Elman-only release, and ``STACK_DEFAULTS`` for the files
    written before there were stacks); and the parameter count they give."""
    if not isinstance(config, dict):
        raise _fail(path, f"model.config must be a JSON object, got {_short(config)}")
    config = dict(config)
    cell = config.setdefault("cell", "rnn")          # written before there were other cells
    if not isinstance(cell, str) or cell not in CELLS:
        raise _fail(path, f"model.config cell {_short(cell)} is not one of {sorted(CELLS)}")
    keys = {"cell", "input_size", "hidden_size", "output_size", "bias", "dtype"}
    if cell == "rnn":
        keys.add("activation")
    if not STACK_DEFAULTS.keys() & config.keys():    # written before there were stacks
        config.update(STACK_DEFAULTS)
    if set(config) != keys | STACK_DEFAULTS.keys():
        raise _fail(path, f"model.config of a {cell!r} cell must hold exactly {sorted(keys)} and "
                          f"{sorted(STACK_DEFAULTS)} (or none of these three), got {sorted(config)}")
    for key in ("input_size", "hidden_size", "output_size"):
        v = config[key]
        if not _is_int(v) or v < 1:
            raise _fail(path, f"model.config {key} must be a positive int, got {_short(v)}")
    act = config.get("activation")
    if cell == "rnn" and (not isinstance(act, str) or act not in ACTIVATIONS):
        raise _fail(path, f"model.config activation {_short(act)} is not one of {sorted(ACTIVATIONS)}")
    if not isinstance(config["bias"], bool):
        raise _fail(path, f"model.config bias must be true or false, got {_short(config['bias'])}")
    if not isinstance(config["dtype"], str) or config["dtype"] not in ("float32", "float64"):
        raise _fail(path, f"model.config dtype must be 'float32' or 'float64', got {_short(config['dtype'])}")
    L, p = config["num_layers"], config["dropout"]
    if not _is_int(L) or L < 1:
        raise _fail(path, f"model.config num_layers must be a positive int, got {_short(L)}")
    if not isinstance(config["bidirectional"], bool):
        raise _fail(path, f"model.config bidirectional must be true or false, "
                          f"got {_short(config['bidirectional'])}")
    if not (_is_int(p) or isinstance(p, float)) or not 0 <= p <= 1:     # torch.nn's range: [0, 1]
        raise _fail(path, f"model.config dropout must be a number in [0, 1], got {_short(p)}")
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


def _check_optim_config(path, opt_config):
    """The saved optimizer's name, hyperparameters and step count, of JSON types the optimizer
    takes (checked further by ``optim.check_config``); returns the names of its state arrays."""
    if not isinstance(opt_config, dict) or set(opt_config) != {"name", "hyper", "t"}:
        got = sorted(opt_config) if isinstance(opt_config, dict) else opt_config
        raise _fail(path, f"optim.config must hold name, hyper and t, got {_short(got)}")
    name, hyper, t = opt_config["name"], opt_config["hyper"], opt_config["t"]
    if not isinstance(name, str):
        raise _fail(path, f"optim.config name must be a string, got {_short(name)}")
    if not isinstance(hyper, dict):
        raise _fail(path, f"optim.config hyper must be a JSON object, got {_short(hyper)}")

    def number(v):          # what float() takes without OverflowError
        return isinstance(v, float) or (_is_int(v) and abs(v) < 2 ** 1000)
    for key, v in hyper.items():
        if not (number(v) or (isinstance(v, list) and len(v) <= 8 and all(map(number, v)))):
            raise _fail(path, f"optim.config hyper {key!r} must be a number or a list of numbers, "
                              f"got {_short(v)}")
    if not _is_int(t):
        raise _fail(path, f"optim.config: the step count t must be an int, got {_short(t)}")
    try:
        return check_optimizer(name, hyper, t)
    except (ValueError, TypeError) as exc:
        raise _fail(path, f"optim.config: {exc}") from None


def load(path, model=None):
    """Read a checkpoint written by ``save``.

    Nothing is built, allocated or decompressed before the file has been checked from
    its zip directory and the headers of its arrays: every member must be one ``save``
    writes (an unknown one is refused by name, unread), and every declared dtype, shape
    and size must agree with the saved configuration and with the size of the file. A
    new model is built over the array read from the file (nothing drawn, nothing copied),
    so loading costs about the bytes the file declares; a structure out of proportion to
    the file (more layers than its parameters' bytes could hold) is refused before it is built.

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
        hold, a tampered configuration, step count or generator state, a damaged zip
        header or deflate stream. Never another exception for what a file holds.
    ValueError
        ``model`` has another layout than the saved one.
    """
    if model is not None and not isinstance(model, RNNBase):
        raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, or None, got {type(model).__name__}")
    path, zf = _open_zip(path)
    with zf, _damage_is_checkpoint_error(path):
        return _load(path, zf, model)


def read_config(path):
    """The cell and constructor arguments of the model a checkpoint holds, without loading it.

    Only the file's zip directory, format, ``model.config`` and the header of ``model.flat``
    are read, checked as ``load`` checks them (a ``CheckpointError`` otherwise): the
    configuration returned is one whose parameters the file holds.

    Returns
    -------
    dict
        ``cell`` ("rnn" also for the files of the Elman-only release, which do not name
        it), ``input_size``, ``hidden_size``, ``output_size``, ``bias``, ``dtype``,
        ``num_layers``, ``bidirectional``, ``dropout`` (1, False and 0.0 for the files
        written before there were stacks) and, for the Elman cell, ``activation``.
    """
    path, zf = _open_zip(path)
    with zf, _damage_is_checkpoint_error(path):
        members = _open_members(path, zf)
        config, n = _read_model_config(path, zf, members)
        # the parameters the configuration declares must be the ones the file holds (whoever
        # builds a model of this configuration builds one the file can fill)
        _header(path, zf, members["model.flat"], np.dtype(config["dtype"]), (n,))[0].close()
        return config




class _damage_is_checkpoint_error:
    """The last resort around a parse: what the zip and zlib layers raise on a damaged archive,
    wherever it comes from, becomes a ``CheckpointError`` (the member-level reads name their
    member; this names the layer). Other exceptions are bugs and pass."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, _DAMAGED) and not issubclass(kind, CheckpointError):
            raise _fail(self.path, f"its zip structure is damaged ({kind.__name__}: {exc})") from exc
        return False


def _open_zip(path):
    path = check_text_file(path, "checkpoint")
    try:
        return path, zipfile.ZipFile(path)
    except (ValueError, OverflowError, *_DAMAGED) as exc:
        raise CheckpointError(f"{path!r} is not a fastbptt checkpoint: not a .npz (zip) archive "
                              f"({type(exc).__name__}: {exc}); pass a file written by "
                              f"fastbptt.checkpoint.save or 'python -m fastbptt train --save'") from None


def _read_model_config(path, zf, members):
    """The format, then the checked model configuration and its parameter count."""
    if _read_text(path, zf, members, "format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a fastbptt checkpoint (format {FORMAT!r})")
    config, n = _check_model_config(path, _read_json(path, zf, members, "model.config"))
    stacks = config["num_layers"] * (2 if config["bidirectional"] else 1)
    stored = members["model.flat"].compress_size
    if stacks * _MIN_LAYER_BYTES > stored:
        raise _fail(path, f"model.config declares {config['num_layers']} layers"
                          f"{' in both directions' if config['bidirectional'] else ''}, but member "
                          f"'model.flat.npy' takes only {stored} bytes of the file, not the "
                          f"{_MIN_LAYER_BYTES} per layer and direction that any such model's "
                          f"parameters take at the least")
    return config, n


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
    prefix = "optim.state."
    saved_states = {k[len(prefix):] for k in members if k.startswith(prefix)}
    opt_config = None
    if "optim.config" in members:
        opt_config = _read_json(path, zf, members, "optim.config")
        names = _check_optim_config(path, opt_config)
        missing, unknown = set(names) - saved_states, saved_states - set(names)
        if missing:
            raise _fail(path, f"optimizer state {sorted(missing)} is missing")
    else:
        unknown = saved_states
    if unknown:
        raise _fail(path, f"unexpected member {prefix + min(unknown) + '.npy'!r}")
    extra = _read_json(path, zf, members, "extra")
    if not isinstance(extra, dict):
        raise _fail(path, f"member 'extra.npy' must hold a JSON object, got {_short(extra)}")
    generator = None
    if "model.generator" in members:                # written before there were stacks: absent
        generator = _generator(path, _read_json(path, zf, members, "model.generator"))
    # every header before any data: a member of the wrong dtype or shape is refused unread
    headers = {"model.flat": _header(path, zf, members["model.flat"], dtype, (n,))}
    try:
        for name in sorted(saved_states):
            headers[prefix + name] = _header(path, zf, members[prefix + name], dtype, (n,))
        # the data, read straight into the arrays the model and optimizer keep (no copies): the
        # model given is changed only once everything has been read
        fp, dt, shp = headers.pop("model.flat")
        flat = _read_data(path, fp, members["model.flat"], dt, shp)
        new = _build(config, flat) if model is None else None
        optimizer = None
        if opt_config is not None:
            optimizer = _optimizer(path, new if new is not None else model, opt_config)
            for name in sorted(saved_states):
                fp, dt, shp = headers.pop(prefix + name)
                _read_data(path, fp, members[prefix + name], dt, shp, out=optimizer.state[name])
    finally:
        for fp, _, _ in headers.values():
            fp.close()
    if new is None:
        model.flat[...] = flat
    else:
        model = new
    if generator is not None:
        _restore_generator(model, generator)
    return Checkpoint(model, optimizer, extra)


def _optimizer(path, model, opt_config):
    """A new optimizer of the (checked) configuration bound to ``model``, in the saved step count
    and hyperparameters; its state arrays are read into by the caller."""
    try:
        optimizer = OPTIMIZERS[opt_config["name"]](model, **opt_config["hyper"])
        optimizer.load_state_dict(dict(opt_config, state=dict(optimizer.state)))   # t, hyper; no copy
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"optim.config: {exc}") from None
    return optimizer


_U32, _U64, _U128 = 2 ** 32 - 1, 2 ** 64 - 1, 2 ** 128 - 1
_FLAGS = {"has_uint32": (0, 1), "uinteger": (0, _U32)}
_PCG = {"state": {"state": (0, _U128), "inc": (0, _U128)}, **_FLAGS}
GENERATOR_STATES = {
    "PCG64": _PCG,
    "PCG64DXSM": _PCG,
    "MT19937": {"state": {"key": (0, _U32, 624), "pos": (0, 624)}},
    "Philox": {"state": {"counter": (0, _U64, 4), "key": (0, _U64, 2)}, "buffer": (0, _U64, 4),
               "buffer_pos": (0, 4), **_FLAGS},
    "SFC64": {"state": {"state": (0, _U64, 4)}, **_FLAGS},
}
"""The state of every bit generator NumPy ships, as its ``.state`` holds it (besides
``bit_generator``): a dict is a dict of exactly those keys; ``(low, high)`` an int in that range
(the C struct's word, or the position in a buffer: MT19937's ``pos`` indexes its 624-word key,
624 meaning "regenerate"; Philox's ``buffer_pos`` its 4-word buffer, 4 meaning "refill");
``(low, high, n)`` n such ints. NumPy's setters take values out of these ranges and the next draw
reads outside the state (a crash), so a saved state is checked against this first."""


def _checked_state(value, spec, where):
    if isinstance(spec, dict):
        if not isinstance(value, dict) or set(value) != set(spec):
            got = sorted(map(str, value)) if isinstance(value, dict) else value
            raise ValueError(f"{where} must hold exactly {sorted(spec)}, got {_short(got)}")
        return {key: _checked_state(value[key], sub, f"{where}[{key!r}]") for key, sub in spec.items()}
    low, high, *length = spec
    if length:
        if isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.ndim == 1:
            value = value.tolist()
        if not isinstance(value, list) or len(value) != length[0]:
            raise ValueError(f"{where} must be a list of {length[0]} ints, got {_short(value)}")
        for i, v in enumerate(value):
            _checked_state(v, (low, high), f"{where}[{i}]")
        return np.array(value, dtype=np.uint32 if high == _U32 else np.uint64)
    if isinstance(value, np.integer):
        value = int(value)
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{where} must be an int in [{low}, {high}], got {_short(value)}")
    return value


def check_generator_state(state, what="the generator's state"):
    """``state`` (a bit generator's ``.state``, as JSON gives it back: arrays as lists) checked in
    full against what its bit generator holds (``GENERATOR_STATES``: every key, type and range),
    as a new dict that the bit generator it names can be set to.

    Raises
    ------
    ValueError
        Naming the first key that does not fit. (NumPy's own setters take out-of-range
        positions, and the next draw reads outside the generator's state.)
    """
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if not isinstance(name, str) or name not in GENERATOR_STATES:
        raise ValueError(f"{what} must be the state of one of numpy's bit generators "
                         f"{sorted(GENERATOR_STATES)}, got {_short(state)}")
    rest = {key: value for key, value in state.items() if key != "bit_generator"}
    return {"bit_generator": name, **_checked_state(rest, GENERATOR_STATES[name], what)}


def _generator(path, state):
    """A new Generator in the saved state (checked on it, so the model's is never half set)."""
    try:
        state = check_generator_state(state, "model.generator")
        bit = getattr(np.random, state["bit_generator"])()
        bit.state = state
    except (TypeError, ValueError, KeyError, OverflowError, IndexError) as exc:
        raise _fail(path, str(exc)) from None
    return np.random.Generator(bit)


def _restore_generator(model, generator):
    """The saved state into ``model.generator`` in place (those who hold it see it), or the saved
    generator itself when the model's draws from another kind of bit generator."""
    if type(model.generator.bit_generator) is type(generator.bit_generator):
        model.generator.bit_generator.state = generator.bit_generator.state
    else:
        model.generator = generator
