"""Save a model, its optimizer and any JSON metadata to one ``.npz``; load them back.

Loading restores every bit: the parameters, the optimizer's state arrays, step count
and hyperparameters, so training resumed from a checkpoint continues exactly as
it would have without stopping (given the same batches; keep what produces them,
such as a random generator's state, in ``extra``). Files hold only arrays and
JSON strings and are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import NamedTuple

import numpy as np

from .model import RNN
from .optim import Optimizer, optimizer_from_state_dict

FORMAT = "fastbptt-checkpoint-1"


class Checkpoint(NamedTuple):
    """What ``load`` returns."""

    model: RNN
    optimizer: Optimizer | None
    extra: dict


def model_config(model):
    """The constructor arguments that fix a model's layout."""
    return {"input_size": model.input_size, "hidden_size": model.hidden_size,
            "output_size": model.output_size, "activation": model.activation,
            "bias": model.bias, "dtype": model.dtype.name}


def _describe(config):
    return (f"RNN(input_size={config['input_size']}, hidden_size={config['hidden_size']}, "
            f"output_size={config['output_size']}, activation={config['activation']!r}, "
            f"bias={config['bias']}, dtype={config['dtype']})")


def save(path, model, optimizer=None, extra=None):
    """Write ``model`` (and ``optimizer``, and ``extra``) to ``path``, replacing it atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Written exactly as named (no ``.npz`` is appended).
    model : fastbptt.RNN
    optimizer : fastbptt.optim.Optimizer, optional
        Must be bound to ``model``.
    extra : dict, optional
        JSON-serializable metadata (epoch, a generator's ``bit_generator.state``, ...).
    """
    if not isinstance(model, RNN):
        raise TypeError(f"model must be a fastbptt.RNN, got {type(model).__name__}")
    arrays = {"format": np.array(FORMAT),
              "model.config": np.array(json.dumps(model_config(model))),
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
    path = os.fspath(path)
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


def load(path, model=None):
    """Read a checkpoint written by ``save``.

    Parameters
    ----------
    path : str or os.PathLike
    model : fastbptt.RNN, optional
        Load the parameters into this model, which must have the saved layout (sizes,
        activation, bias, dtype); else a ``ValueError`` says how they differ. None
        builds a new model.

    Returns
    -------
    Checkpoint
        ``(model, optimizer, extra)``: the optimizer (None if none was saved) is a new
        one bound to the model, in the saved state.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as exc:
        raise ValueError(f"{path!r} is not a fastbptt checkpoint (.npz): {exc}") from None
    if "format" not in data or str(data["format"]) != FORMAT:
        raise ValueError(f"{path!r} is not a fastbptt checkpoint (format {FORMAT!r})")
    config = json.loads(str(data["model.config"]))
    flat = data["model.flat"]
    if model is None:
        model = RNN(config["input_size"], config["hidden_size"], config["output_size"],
                    activation=config["activation"], bias=config["bias"], dtype=config["dtype"])
    elif not isinstance(model, RNN):
        raise TypeError(f"model must be a fastbptt.RNN or None, got {type(model).__name__}")
    elif model_config(model) != config:
        raise ValueError(f"checkpoint {path!r} holds {_describe(config)}, but the model is "
                         f"{_describe(model_config(model))}")
    if flat.shape != model.flat.shape or flat.dtype != model.flat.dtype:
        raise ValueError(f"checkpoint {path!r} is damaged: its parameters have shape {flat.shape}, "
                         f"dtype {flat.dtype}")
    optimizer = None
    if "optim.config" in data:
        sd = json.loads(str(data["optim.config"]))
        prefix = "optim.state."
        sd["state"] = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
        optimizer = optimizer_from_state_dict(model, sd)
    model.flat[...] = flat
    return Checkpoint(model, optimizer, json.loads(str(data["extra"])))
