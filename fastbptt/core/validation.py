"""Argument checks shared by the whole package: clear errors before any compiled code runs.

Each check returns the value it accepts (converted where it says so) or raises a
TypeError or ValueError that names the argument and tells how to fix it.
"""

import math

import numpy as np

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
LOSSES = ("cross_entropy", "mse")


def positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def count(value, name):
    """A count that may be zero (a batch of B = 0 sequences): an int >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    return int(value)


def check_dtype(dtype, name="dtype"):
    """Return ``dtype`` as a NumPy dtype if it is float32 or float64, else raise TypeError."""
    if dtype is None:   # np.dtype(None) would silently be float64
        raise TypeError(f"{name} must be np.float32 or np.float64, got None")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dt not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def check_seed(seed, name="seed"):
    """A seed ``numpy.random.default_rng`` takes: None, an int >= 0, or a Generator."""
    if seed is None or isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be None, an int >= 0 or a numpy.random.Generator, got {seed!r}")
    if seed < 0:
        raise ValueError(f"{name} must be an int >= 0 (or None for a fresh random seed), got {seed}")
    return int(seed)


def real(value, name):
    """A real number as a float; bools, strings and arrays are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def number(value, name, *, low=None, low_open=False, high=None, high_open=False):
    """A finite real number in the given range, as a Python float; else a clear error."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def all_finite(a):
    """True when ``a`` holds no NaN or Inf (two reductions, no temporary arrays)."""
    return a.size == 0 or bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def as_array(a, name):
    """``a`` as a plain ndarray. Masked arrays are refused: their hidden values would reach the kernels."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, and masks are not supported: pass "
                        f"{name}.filled(value) to choose what the masked entries hold (for padding, "
                        f"any valid id or 0.0, and carry=0 or a zero loss gradient where it must not count)")
    if type(a) is not np.ndarray:
        try:
            a = np.asarray(a)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be an array, got {type(a).__name__}: {exc}") from None
        if type(a) is not np.ndarray:  # subclasses (np.matrix, memmap) as plain arrays
            a = a.view(np.ndarray)
    return a


def check_float(a, name, dtype, shape, check_finite, lengths=None):
    """A float array of exactly ``dtype`` and ``shape``, C-contiguous (copied if it was not); with
    ``lengths`` (of the second axis), only the positions t < lengths[b] must be finite."""
    a = as_array(a, name)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must hold floats of dtype {dtype}, got dtype {a.dtype}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but the model is {dtype}; "
                        f"convert it with .astype(np.{dtype.name}) (nothing is cast silently)")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}{swapped_hint(name, a.shape, shape)}")
    if check_finite and not all_finite(a) and (
            lengths is None or not all_finite(a[valid_positions(lengths, shape[0])])):
        raise ValueError(f"{name} contains NaN or Inf (pass check_finite=False to let them propagate)")
    return np.ascontiguousarray(a)


def swapped_hint(name, got, want):
    """The end of a shape error when ``got`` is ``want`` with its first two axes (T, B) swapped:
    a batch-first array, and how to make it time-major."""
    if len(got) < 2 or len(got) != len(want) or got[0] == got[1] or (got[1], got[0]) + got[2:] != want:
        return ""
    how = f"{name}.T" if len(got) == 2 else f"{name}.transpose(1, 0, 2)"
    return (f": {name} looks batch-first (B, T{', ...' if len(got) > 2 else ''}); fastbptt takes time-major "
            f"arrays (T, B, ...), as torch.nn.RNN with batch_first=False: pass {how}")


def check_ids(a, name, shape, upper, what, lengths=None):
    """An integer array of ``shape`` whose every value lies in [0, upper) (with ``lengths``, only at
    the positions read, t < lengths[b]: padding may hold anything)."""
    a = as_array(a, name)
    if a.dtype.kind == "f":
        raise TypeError(f"{name} must hold integer {what}, got floats (dtype {a.dtype}); "
                        f"convert with .astype(np.int64) if they are whole numbers")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer {what}, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}{swapped_hint(name, a.shape, shape)}")
    if a.size == 0:
        return a
    lo, hi = a.min(), a.max()
    valid = None
    if lengths is not None and (lo < 0 or hi >= upper):   # padding may hold anything: look closer
        valid = valid_positions(lengths, shape[0])
        read = a[valid]
        lo, hi = read.min(), read.max()
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere((a == bad) if valid is None else (a == bad) & valid)[0])
        raise ValueError(f"{name} must hold {what} in [0, {upper}), got {bad} at index {where}")
    return a


def check_flags(**flags):
    """The values of ``flags`` as bools, in order; a TypeError names any that is not one."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    return tuple(bool(value) for value in flags.values())


def check_loss(loss):
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def check_carry(carry, T, B, dtype):
    """Carry weights of shape (T,) or (T, B), floats finite in ``dtype``; None means full BPTT."""
    if carry is None:
        return None
    carry = as_array(carry, "carry")
    if carry.dtype.kind != "f":
        raise TypeError(f"carry must hold floats, got dtype {carry.dtype}")
    if carry.shape not in ((T,), (T, B)):
        raise ValueError(f"carry must have shape ({T},) or ({T}, {B}), got {carry.shape}"
                         f"{swapped_hint('carry', carry.shape, (T, B))}")
    if not all_finite(carry):
        raise ValueError("carry contains NaN or Inf")
    biggest = max(-float(carry.min()), float(carry.max())) if carry.size else 0.0
    if biggest > float(np.finfo(dtype).max):
        raise ValueError(f"carry holds {biggest:.3g}, which the model's {dtype.name} cannot represent "
                         f"(largest {np.finfo(dtype).max:.3g})")
    return carry


def check_lengths(lengths, T, B):
    """The lengths of B sequences as an intp array, each in [1, T]; None is every sequence of length T."""
    if lengths is None:
        return None
    lengths = as_array(lengths, "lengths")
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must hold integers (one per sequence), got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape (B,) = ({B},), one per sequence, got {lengths.shape}")
    if B == 0:
        return lengths.astype(np.intp)
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > T:
        bad = lo if lo < 1 else hi
        b = int(np.argmax(lengths == bad))
        raise ValueError(f"lengths must lie in [1, T={T}], got lengths[{b}] = {bad}")
    return lengths.astype(np.intp)


def valid_positions(lengths, T):
    """(T, B) bool: step t of sequence b is read (t < lengths[b]); None without lengths."""
    if lengths is None:
        return None
    return np.arange(T)[:, None] < lengths[None, :]


def check_loss_weights(weights, T, B, dtype, lengths):
    """Per-position loss weights (T, B): finite floats >= 0 that ``dtype`` holds, not all zero where read."""
    if weights is None:
        return None
    weights = as_array(weights, "loss_weights")
    if weights.dtype.kind != "f":
        raise TypeError(f"loss_weights must hold floats, got dtype {weights.dtype}")
    if weights.shape != (T, B):
        raise ValueError(f"loss_weights must have shape (T, B) = ({T}, {B}), got {weights.shape}"
                         f"{swapped_hint('loss_weights', weights.shape, (T, B))}")
    read = weights if lengths is None else weights[valid_positions(lengths, T)]
    if not all_finite(read):
        raise ValueError("loss_weights contains NaN or Inf")
    if read.min() < 0:
        raise ValueError(f"loss_weights must be >= 0, got {float(read.min()):g}")
    if not read.max() > 0:
        raise ValueError("loss_weights are all zero on the positions read: the loss would be 0/0; "
                         "give some position a weight > 0")
    # L = Σ w ℓ / Σ w does not change with the scale of w: scaled so the largest weight read is 1,
    # Σ w and w ℓ neither overflow nor underflow whatever scale the caller used
    return np.ascontiguousarray((weights / np.float64(read.max())).astype(dtype))


def check_inputs(model, X, check_finite, lengths=None, *, Y=None, h0=None):
    """Return (kind, X, T, B, lengths): kind "dense" with X (T, B, D) floats, or "tokens" with X (T, B)
    ints; the lengths checked (``check_lengths``) against X's T and B.

    T = 0 is refused (as ``torch.nn.RNN`` refuses it); B = 0 is accepted (an empty batch, as
    ``torch.nn.RNN`` takes it). ``Y``, ``h0`` and ``lengths`` (unchecked, as the caller gave them)
    only serve to tell a batch-first X: when they agree with X's first two axes swapped, X is
    blamed (``check_layout``) rather than them.
    """
    X = as_array(X, "X")
    D = model.input_size
    if X.ndim == 2 and X.dtype.kind in "iu":
        kind = "tokens"
    elif X.ndim == 3:
        kind = "dense"
    elif X.ndim == 2:
        raise TypeError(f"X of rank 2 must hold integer token ids of shape (T, B), got dtype {X.dtype}; "
                        f"dense inputs have shape (T, B, D={D})")
    else:
        raise ValueError(f"X must have shape (T, B, D={D}) with floats or (T, B) with token ids, "
                         f"got shape {X.shape}")
    T, B = X.shape[:2]
    if T == 0:
        raise ValueError(f"X must have T >= 1 time steps (its first axis, as torch.nn.RNN expects a sequence "
                         f"length larger than 0), got shape {X.shape}")
    check_layout(model, X.shape, Y=Y, h0=h0, lengths=lengths)
    lengths = check_lengths(lengths, T, B)
    if kind == "tokens":
        X = check_ids(X, "X", (T, B), D, "token ids", lengths)
    else:
        X = check_float(X, "X", model.dtype, (T, B, D), check_finite, lengths)
    return kind, X, T, B, lengths


def _shape_of(a):
    """The shape of ``a`` when it is an array (or array-like with a shape), else None."""
    shape = getattr(a, "shape", None)
    return tuple(shape) if isinstance(shape, tuple) else None


def check_layout(model, shape, *, Y=None, h0=None, lengths=None):
    """Refuse an X of ``shape`` that looks batch-first, (B, T, ...), by what the other arguments say
    (a ValueError that blames X and says how to transpose it).

    fastbptt reads X's first axis as time: an X given batch-first makes every other argument look
    wrong (``Y must have shape (B, T)``). With X's first two axes unequal, ``lengths`` with one
    entry per row of X's first axis, or ``h0`` with one state per row of it, say X is batch-first;
    a ``Y`` with X's first two axes swapped says X or Y is (which one, ``lengths`` or ``h0`` tell
    when given; a batch-first Y is left to its own check, which says so).
    """
    T, B = shape[:2]
    if T == B:
        return
    H = model.hidden_size
    for_x, against = [], False
    ls = _shape_of(lengths)
    if ls == (T,):
        for_x.append(f"lengths has {T} entries (one per sequence)")
    against |= ls == (B,)
    hs = _shape_of(h0[0] if model.cell == "lstm" and isinstance(h0, (tuple, list)) and h0 else h0)
    if hs in ((T, H), (model.n_states, T, H)):
        for_x.append(f"h0 has shape {hs} (B={T})")
    against |= hs in ((B, H), (model.n_states, B, H))
    ys = _shape_of(Y)
    y_swapped = ys is not None and len(ys) >= 2 and ys[:2] == (B, T)
    if against or not (for_x or y_swapped):
        return
    dense = len(shape) > 2
    how = "X.transpose(1, 0, 2)" if dense else "X.T"
    read = (f"X has shape {shape}, which fastbptt reads as time-major (T, B{', D' if dense else ''}): "
            f"T={T} steps of B={B} sequences")
    tail = ("fastbptt takes time-major arrays, as torch.nn.RNN with batch_first=False "
            "(fastbptt.torch's modules take batch_first=True)")
    if for_x:
        if y_swapped:
            for_x.append(f"Y has shape {ys} (T={B}, B={T})")
        raise ValueError(f"{read}, but {' and '.join(for_x)}: X looks batch-first (B, T{', D' if dense else ''}). "
                         f"{tail}: pass {how}")
    y_how = "Y.T" if len(ys) == 2 else "Y.transpose(1, 0, 2)"
    raise ValueError(f"{read}, but Y has shape {ys}: X's first two axes are Y's swapped, so one of them is "
                     f"batch-first. {tail}: if X is batch-first (B, T{', D' if dense else ''}), pass {how}; "
                     f"if Y is, pass {y_how}")


# ----------------------------------------------------------------------------- models, states, workspaces


def check_model(model, check_finite):
    """A fastbptt model (RNN, GRU or LSTM) with a writable buffer (and, with ``check_finite``,
    finite parameters)."""
    from .model import RNNBase      # here: model imports this module
    if not isinstance(model, RNNBase) or model._CELL is None:
        raise TypeError(f"model must be a fastbptt.RNN, GRU or LSTM, got {type(model).__name__}")
    if not model.flat.flags.writeable:
        raise ValueError("model.flat is read-only (its flags.writeable was set to False); "
                         "set model.flat.flags.writeable = True")
    if check_finite and not all_finite(model.flat):
        bad = [name for name, p in model.params.items() if not all_finite(p)]
        raise ValueError(f"model parameters {bad} contain NaN or Inf "
                         f"(pass check_finite=False to let them propagate)")




def check_workspace(workspace, model, T, B):
    """The workspace for ``model`` and (T, B): a new one when None, else checked to fit and be writable."""
    from .workspace import Workspace, model_signature      # here: workspace imports this module
    if workspace is None:
        return Workspace(model, T, B)
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be a fastbptt.Workspace, got {type(workspace).__name__}")
    if workspace.signature != model_signature(model):
        raise ValueError(f"workspace was made for a model with (cell, D, H, O, bias, dtype, layers, "
                         f"directions) = "
                         f"{workspace.signature}, but this model has {model_signature(model)}")
    frozen = workspace.read_only_buffer()
    if frozen is not None:
        raise ValueError(f"workspace.{frozen} is read-only (its flags.writeable was set to False); "
                         f"every buffer of a workspace is written by each call: set it back to True")
    if (workspace.T, workspace.B) != (T, B):
        raise ValueError(f"workspace was made for T={workspace.T}, B={workspace.B} but the inputs have "
                         f"T={T}, B={B}; make one with fastbptt.Workspace(model, T={T}, B={B})")
    return workspace


def check_state(state, name, model, B, check_finite):
    """A state of ``model`` for B sequences: an array (B, H), or for the LSTM a pair of them (h, c);
    (L·dirs, B, H) for a model of several layers or directions."""
    if state is None:
        return None
    shape = (B, model.hidden_size) if model.n_states == 1 else (model.n_states, B, model.hidden_size)
    if model.n_states > 1:                 # say what the first axis is when the shape is wrong
        try:
            return _check_state(state, name, model, shape, check_finite)
        except ValueError as e:
            if "shape" not in str(e):
                raise
            raise ValueError(f"{e}: a model of {model.num_layers} layer(s) and {model.num_directions} "
                             f"direction(s) has states of shape (num_layers·num_directions, B, H)") from None
    return _check_state(state, name, model, shape, check_finite)


def _check_state(state, name, model, shape, check_finite):
    if model.cell != "lstm":
        if isinstance(state, (tuple, list)) and len(state) == 2 \
                and all(isinstance(a, np.ndarray) and a.ndim == len(shape) for a in state):
            raise ValueError(f"{name} of a {type(model).__name__} is one array of shape {shape}, not a "
                             f"pair of arrays (only the LSTM's state is a pair (h, c))")
        return check_float(state, name, model.dtype, shape, check_finite)
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        what = f"a {type(state).__name__} of length {len(state)}" if isinstance(state, (tuple, list)) \
            else type(state).__name__
        raise TypeError(f"{name} of an LSTM must be a pair (h, c) of arrays of shape {shape}, got {what}")
    return tuple(check_float(a, f"{name}[{k}]", model.dtype, shape, check_finite)
                 for k, a in enumerate(state))


def check_h0(h0, model, B, check_finite):
    return check_state(h0, "h0", model, B, check_finite)


def check_targets(Y, loss, model, T, B, check_finite, lengths=None):
    loss = check_loss(loss)
    if loss == "cross_entropy":
        return check_ids(Y, "Y", (T, B), model.output_size, "class labels", lengths)
    if loss == "mse":
        return check_float(Y, "Y", model.dtype, (T, B, model.output_size), check_finite, lengths)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def check_owner(workspace, model, what="last pass"):
    """Refuse a ``model`` other than the one whose call filled ``workspace`` (a ValueError).

    A workspace remembers (weakly) the model object its last forward pass, ``loss_and_grad`` or
    ``layer_forward`` ran: another model of the same shapes would get gradients that match neither.
    A workspace from a pickle or a copy does not know its model and takes any of its signature
    (``backward`` still compares the parameters with those its forward pass kept).
    """
    ref = workspace._owner
    if ref is None:
        return
    owner = ref()
    if owner is model:
        return
    who = "a model that no longer exists" if owner is None else \
        f"another {type(owner).__name__} object (id {id(owner):#x}) of the same shapes"
    raise ValueError(f"workspace holds the {what} of {who}, not of this model (id {id(model):#x}): "
                     f"its buffers would give gradients that match neither. Pass the model whose call "
                     f"filled the workspace as model=, or run fastbptt.forward(model, X, workspace=workspace) "
                     f"(or loss_and_grad) with this one first")


def check_forward_workspace(workspace, model):
    """The workspace of a preceding forward pass of ``model``, its kept inputs checked again."""
    from .workspace import Workspace
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be the fastbptt.Workspace that forward() used, "
                        f"got {type(workspace).__name__}")
    ws = check_workspace(workspace, model, workspace.T, workspace.B)
    if ws.forward_kind is None:
        raise ValueError("workspace holds no forward pass: call fastbptt.forward(model, X, "
                         "workspace=workspace) (or layer_forward) first, once per backward")
    check_owner(ws, model, "forward pass")
    if not ws._forward_params_match(model):
        raise ValueError("model's parameters differ from those the workspace's forward pass ran with (changed "
                         "in between, or another model's: model.flat is compared bit for bit with the copy "
                         "forward kept), so the gradients would belong to neither: run "
                         "fastbptt.forward(model, X, workspace=workspace) again after changing them (PyTorch "
                         "likewise refuses a backward after an in-place change of a weight)")
    if ws.has_lengths:                  # the record of lengths the kernels index by: checked again
        from .workspace import _valid_plan
        if not ws._sealed() or not _valid_plan(ws.counts, ws.row_order, ws.inverse, ws.lengths, ws.T, ws.B):
            raise ValueError("workspace's record of lengths (counts, row_order, inverse, lengths) was "
                             "changed by hand; run forward again")
    if ws.forward_kind == "tokens":     # the ids forward() kept: public, so checked again
        check_ids(ws.tokens, "workspace.tokens", (ws.T, ws.B), model.input_size, "token ids")
        if ws.num_directions == 2:
            check_ids(ws.tokens_r, "workspace.tokens_r", (ws.T, ws.B), model.input_size, "token ids")
    elif ws.forward_kind != "dense" or ws._x is None:
        raise ValueError(f"workspace.forward_kind is {ws.forward_kind!r} without the inputs of a "
                         f"forward pass: call fastbptt.forward(model, X, workspace=workspace) first")
    return ws
