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


def check_float(a, name, dtype, shape, check_finite):
    """A float array of exactly ``dtype`` and ``shape``, C-contiguous (copied if it was not)."""
    a = as_array(a, name)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must hold floats of dtype {dtype}, got dtype {a.dtype}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but the model is {dtype}; "
                        f"convert it with .astype(np.{dtype.name}) (nothing is cast silently)")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if check_finite and not all_finite(a):
        raise ValueError(f"{name} contains NaN or Inf (pass check_finite=False to let them propagate)")
    return np.ascontiguousarray(a)


def check_ids(a, name, shape, upper, what):
    """An integer array of ``shape`` whose every value lies in [0, upper)."""
    a = as_array(a, name)
    if a.dtype.kind == "f":
        raise TypeError(f"{name} must hold integer {what}, got floats (dtype {a.dtype}); "
                        f"convert with .astype(np.int64) if they are whole numbers")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer {what}, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere(a == bad)[0])
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
        raise ValueError(f"carry must have shape ({T},) or ({T}, {B}), got {carry.shape}")
    if not all_finite(carry):
        raise ValueError("carry contains NaN or Inf")
    biggest = max(-float(carry.min()), float(carry.max())) if carry.size else 0.0
    if biggest > float(np.finfo(dtype).max):
        raise ValueError(f"carry holds {biggest:.3g}, which the model's {dtype.name} cannot represent "
                         f"(largest {np.finfo(dtype).max:.3g})")
    return carry


def check_inputs(model, X, check_finite):
    """Return (kind, X, T, B): kind "dense" with X (T, B, D) floats, or "tokens" with X (T, B) ints."""
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
    if T == 0 or B == 0:
        raise ValueError(f"X must have T >= 1 time steps and B >= 1 sequences, got shape {X.shape}")
    if kind == "tokens":
        X = check_ids(X, "X", (T, B), D, "token ids")
    else:
        X = check_float(X, "X", model.dtype, (T, B, D), check_finite)
    return kind, X, T, B
