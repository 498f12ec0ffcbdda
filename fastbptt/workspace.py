"""Preallocated buffers for one model and one (T, B): activations, gradients, scratch.

Pass the same ``Workspace`` to every call of a training loop and no call allocates
an array again. Every buffer is made once, here; the kernels only write into them.

A workspace serves one call at a time: a call from a second thread while it is in
use is refused (give each thread its own). ``copy.deepcopy`` and ``pickle`` give an
independent workspace whose ``grads`` are views into its own ``grad_flat``.
"""

import threading

import numpy as np

from .model import RNN, _positive_int, flat_views, param_layout


def model_signature(model):
    """What a workspace must agree on with the model it serves."""
    return (model.input_size, model.hidden_size, model.output_size, model.bias, model.dtype)


class Workspace:
    """Buffers for running ``model`` on batches of B sequences of length T.

    Parameters
    ----------
    model : fastbptt.RNN
    T : int
        Sequence length (number of time steps).
    B : int
        Batch size (number of independent sequences).

    Attributes
    ----------
    grads : mapping of str to ndarray
        Views into ``grad_flat``, keyed like ``model.params``. Overwritten by every call.
    grad_flat : ndarray (n_params,)
        All gradients, laid out like ``model.flat``.
    hs : ndarray (T+1, B, H)
        h_0 .. h_T of the last forward pass.
    dh0 : ndarray (B, H)
        ∂L/∂h_0 of the last backward pass.
    """

    def __init__(self, model, T, B):
        if not isinstance(model, RNN):
            raise TypeError(f"model must be a fastbptt.RNN, got {type(model).__name__}")
        self.T = _positive_int(T, "T")
        self.B = _positive_int(B, "B")
        self.signature = model_signature(model)
        D, H, O, _, dtype = self.signature
        T, B = self.T, self.B
        self.dtype = dtype
        self.hs = np.zeros((T + 1, B, H), dtype)      # h_0 .. h_T
        self.dz = np.zeros((T, B, H), dtype)          # W_qhᵀ ∂L/∂o_t, then ∂L/∂z_t
        self.out = np.zeros((T * B, O), dtype)        # o_t, then ∂L/∂o_t
        self.row_loss = np.zeros(T * B, dtype)        # ℓ(o_t, y_t) per position
        self.W_hhT = np.zeros((H, H), dtype)          # W_hhᵀ, contiguous
        self.stepT = np.zeros((H, B), dtype)          # one step's GEMM result, transposed (per-step BLAS)
        self.zero_h = np.zeros(H, dtype)              # b_h of a model without bias
        self.ones = np.ones(T * B, dtype)             # sums over positions as GEMVs
        self.carry_full = np.ones((T, B), dtype)      # carry weights of full BPTT
        self.carry = np.ones((T, B), dtype)           # caller's carry weights, copied
        self.last_carry = self.carry_full             # the weights the last backward pass used
        self.dh0 = np.zeros((B, H), dtype)            # ∂L/∂h_0
        self.tokens = np.zeros((T, B), np.intp)       # token ids, when inputs are tokens
        self.targets = np.zeros(T * B, np.intp)       # class labels, for cross-entropy
        self.grad_flat = np.zeros(model.n_params, dtype)
        self.grads = flat_views(self.grad_flat, model.layout)
        self._x = None                                # dense inputs kept by forward(), made on first use
        self._dX = None                               # ∂L/∂X, made on first request
        self.forward_kind = None                      # "dense"/"tokens" after forward(), None otherwise
        self._busy = threading.Lock()                 # held by the call using it (one thread at a time)

    def __getstate__(self):
        state = {k: v for k, v in vars(self).items() if k not in ("grads", "last_carry", "_busy")}
        state["last_carry_is_full"] = self.last_carry is self.carry_full
        return state

    def __setstate__(self, state):
        state = dict(state)
        full = state.pop("last_carry_is_full")
        vars(self).update(state)
        D, H, O, bias, dtype = self.signature
        self.grads = flat_views(self.grad_flat, param_layout(D, H, O, bias))
        self.last_carry = self.carry_full if full else self.carry
        self._busy = threading.Lock()

    def buffers(self):
        """Every array the workspace holds (what an input must not overlap)."""
        return [a for a in vars(self).values() if isinstance(a, np.ndarray)]

    def x_buffer(self):
        """(T, B, D) buffer for dense inputs kept between ``forward`` and ``backward``."""
        if self._x is None:
            D, _, _, _, dtype = self.signature
            self._x = np.zeros((self.T, self.B, D), dtype)
        return self._x

    def dX_buffer(self):
        """(T, B, D) buffer for ∂L/∂X, made on the first request."""
        if self._dX is None:
            D, _, _, _, dtype = self.signature
            self._dX = np.zeros((self.T, self.B, D), dtype)
        return self._dX

    @property
    def nbytes(self):
        """Bytes held by all buffers."""
        return sum(a.nbytes for a in self.buffers())

    def __repr__(self):
        D, H, O, bias, dtype = self.signature
        return (f"Workspace(T={self.T}, B={self.B}, D={D}, H={H}, O={O}, bias={bias}, "
                f"dtype={dtype.name}, {self.nbytes / 2**20:.1f} MiB)")
