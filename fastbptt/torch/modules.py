"""``fastbptt.torch.RNN``, ``GRU`` and ``LSTM``: ``torch.nn``'s modules running fastbptt's kernels.

How a module maps onto fastbptt
-------------------------------
- Each module is a subclass of ``torch.nn.RNN``/``GRU``/``LSTM``: PyTorch's constructor,
  parameters, ``state_dict``, ``repr`` and checks of the arguments. Only ``forward`` (and the
  bookkeeping below) is new.
- It keeps a fastbptt model of the same stack (``fastbptt.RNN``/``GRU``/``LSTM``, with a
  one-output readout it never uses) whose flat buffer is the memory of one torch tensor. The
  module's ``weight_*`` (and, for the GRU and LSTM, ``bias_*``) parameters are views of that
  buffer: an optimizer's in-place update is what the kernels read next, with no copy.
  The Elman cell has one bias in fastbptt, b_h = bias_ih + bias_hh, written at every call
  (H numbers); both biases get its gradient.
- A parameter that no longer lies in the buffer (replaced by hand, ``.data`` reassigned,
  unpickled, ``copy.deepcopy``, ``.double()``) is noticed at the next call by its data
  pointer, strides and shape, and ``flatten_parameters()`` (PyTorch's own name for this) makes a new buffer and
  points every parameter into it again.
- CPU float32/float64 tensors run through one ``torch.autograd.Function`` (``_Sweep``); any
  other device, dtype or tensor subclass, and autocast, run PyTorch's implementation
  (``super().forward``) with the same parameters.

Workspaces
----------
fastbptt's workspaces (the buffers of one call's activations) are kept per module in a
``WorkspaceCache`` keyed by (T, B): a forward pass that builds a graph holds its workspace
until that graph's backward pass (or until the graph is freed), so several forwards before
one backward, and a module used twice in one graph, each have their own. Idle workspaces
stay cached for the next call of the same shape, at most ``max_count`` of them and
``max_bytes`` in all (least recently used dropped first). Under ``torch.no_grad()`` or
``torch.inference_mode()`` (or when nothing needs a gradient) no graph is built and the
workspace goes back at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..core import api as _api
from ..core import model as _model
from ..core.workspace import Workspace, model_signature

_FLOATS = (torch.float32, torch.float64)
_PLAIN = (torch.Tensor, nn.Parameter)
_ROLE = {"weight_ih": "W_ih", "weight_hh": "W_hh", "bias_ih": "b_ih", "bias_hh": "b_hh"}


class WorkspaceCache:
    """The idle workspaces of one module, reused by calls of the same (T, B).

    Parameters
    ----------
    max_count : int
        At most this many idle workspaces are kept (default 4).
    max_bytes : int
        ... and at most this many bytes of them (default 256 MiB). The least recently used
        goes first. A workspace in use (held by a graph until its backward) is not counted.

    Attributes
    ----------
    made, reused : int
        How many workspaces were made and how many calls reused one (for tuning).
    """

    def __init__(self, max_count: int = 4, max_bytes: int = 256 * 2**20):
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._idle: OrderedDict = OrderedDict()     # id(ws) -> ws, least recently used first
        self._lock = threading.RLock()               # RLock: give() may run in a __del__
        self.made = 0
        self.reused = 0

    def take(self, model, T: int, B: int, sig=None) -> Workspace:
        """An idle workspace for ``model`` and (T, B), or a new one (``sig``: the model's signature,
        when the caller knows it)."""
        if sig is None:
            sig = model_signature(model)
        with self._lock:
            for key in reversed(self._idle):
                ws = self._idle[key]
                if ws.T == T and ws.B == B and ws.signature == sig:
                    del self._idle[key]
                    self.reused += 1
                    return ws
            self.made += 1
        return Workspace(model, T, B)

    def give(self, ws: Workspace) -> None:
        """Keep ``ws`` for a later call (within the bounds)."""
        with self._lock:
            self._idle[id(ws)] = ws
            while self._idle and (len(self._idle) > self.max_count or self.nbytes > self.max_bytes):
                self._idle.popitem(last=False)

    @property
    def nbytes(self) -> int:
        """Bytes held by the idle workspaces."""
        with self._lock:
            return sum(ws.nbytes for ws in self._idle.values())

    def __getstate__(self):                              # a copy starts empty (and gets its own lock)
        return {"max_count": self.max_count, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_count"], state["max_bytes"])

    def clear(self) -> None:
        """Drop every idle workspace."""
        with self._lock:
            self._idle.clear()

    def __len__(self) -> int:
        return len(self._idle)

    def __repr__(self) -> str:
        return (f"WorkspaceCache({len(self)} idle, {self.nbytes / 2**20:.1f} MiB; max_count={self.max_count}, "
                f"max_bytes={self.max_bytes}; made {self.made}, reused {self.reused})")


class _Lease:
    """A workspace held by one forward pass until its backward pass (or until its graph is freed)."""

    __slots__ = ("ws", "cache")

    def __init__(self, cache, ws):
        self.cache, self.ws = cache, ws

    def release(self):
        ws, self.ws = self.ws, None
        if ws is not None:
            self.cache.give(ws)

    def __del__(self):
        try:
            self.release()
        except Exception:      # noqa: BLE001 - never raise from a finalizer (interpreter exit)
            pass


class _Bridge:
    """What a module keeps for fastbptt, rebuilt by ``flatten_parameters``.

    model: the fastbptt model over ``flat`` (a torch tensor's memory); shared: the indices (in
    ``_flat_weights``) of the parameters that are views of ``flat``, and key where they lie;
    copied: (index, view) of parameters computed at each call (parametrizations), copied in;
    grads: for each parameter, (index, offset, size, shape) of its gradient in the workspace's
    grad_flat; elman_bias: (index of bias_ih, index of bias_hh, b_h view) per (layer, direction).
    """

    __slots__ = ("model", "flat", "key", "shared", "copied", "bias", "grads", "elman_bias", "dtype",
                 "signature")

    def __init__(self, module, weights):
        dtype = weights[0].dtype
        cls = module._FASTBPTT
        L, dirs = module.num_layers, 2 if module.bidirectional else 1
        kwargs = {"activation": module.nonlinearity} if cls is _model.RNN else {}
        layout = _model.stack_layout(cls._CELL, module.input_size, module.hidden_size, 1, module.bias,
                                     L, dirs)
        n = sum(int(np.prod(shape)) for _, shape in layout)
        flat = torch.zeros(n, dtype=dtype)
        model = cls._over(flat.numpy(), module.input_size, module.hidden_size, 1, module.bias,
                          num_layers=L, bidirectional=dirs == 2, **kwargs)
        offsets, at = {}, 0
        for name, shape in layout:
            offsets[name] = at
            at += int(np.prod(shape))
        self.grads, self.elman_bias = [], []
        by_name = dict(zip(module._flat_weights_names, range(len(weights))))
        for k in range(L):
            for d in range(dirs):
                roles = model.layer_names(k, d)
                sfx = f"_l{k}" + ("_reverse" if d else "")
                for torch_name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    i = by_name.get(torch_name + sfx)
                    if i is None:
                        continue
                    name = roles[_ROLE[torch_name]]
                    if name is None:                 # the Elman cell's bias_ih: into b_h
                        name = roles["b_hh"]
                    shape = tuple(dict(layout)[name])
                    self.grads.append((i, offsets[name], int(np.prod(shape)), shape))
                if cls is _model.RNN and module.bias:
                    self.elman_bias.append((by_name["bias_ih" + sfx], by_name["bias_hh" + sfx],
                                            model.params[roles["b_hh"]]))
        elman = {i for ih, hh, _ in self.elman_bias for i in (ih, hh)}
        self.shared, self.copied, self.bias = [], [], {}
        seen = set()
        # the Elman cell's biases lie in a buffer of their own (fastbptt's flat buffer holds their sum)
        extra = torch.zeros(sum(size for i, _, size, _ in self.grads if i in elman), dtype=dtype)
        at = 0
        with torch.no_grad(), torch.inference_mode(False):   # never inference tensors, whatever the caller's mode
            for i, offset, size, shape in self.grads:
                if i in elman:
                    view = extra[at:at + size].numpy().reshape(shape)
                    at += size
                else:
                    view = flat[offset:offset + size].numpy().reshape(shape)
                # only the module's own parameters move into the buffer, each once: a tensor passed by
                # torch.func.functional_call stays the caller's, a parameter tied to two places, a
                # weight computed at each call (a parametrization: weight_norm, ...) are copied in
                if isinstance(weights[i], nn.Parameter) and weights[i].is_leaf and id(weights[i]) not in seen:
                    seen.add(id(weights[i]))
                    view[...] = weights[i].detach().numpy()
                    # a tensor of its own over the buffer's memory (its own storage and version counter)
                    weights[i].data = torch.from_numpy(view)
                    self.shared.append(i)
                    if i in elman:
                        self.bias[i] = view
                elif i not in elman:
                    self.copied.append((i, view))
        self.grads.sort()
        self.model, self.flat, self.dtype = model, flat, dtype
        self.key = self._key(weights)
        self.signature = model_signature(model)

    def _key(self, weights):
        """Where the shared parameters lie (data pointer and strides): inside ``flat``, which is alive,
        so no other tensor can have the same pointer."""
        return tuple((weights[i].data_ptr(), weights[i].stride(), weights[i].shape) for i in self.shared)

    def current(self, weights):
        """Whether ``weights`` are still what this bridge was built for: the shared ones where
        they were, the copied ones plain CPU tensors of the dtype."""
        try:
            if self._key(weights) != self.key:
                return False
        except AttributeError:                         # a parameter set to None
            return False
        for i, view in self.copied:
            w = weights[i]
            if not isinstance(w, torch.Tensor) or w.dtype != self.dtype or w.device.type != "cpu" \
                    or w.layout != torch.strided or w.shape != view.shape:
                return False
        return True

    def sync(self, weights):
        """Before a call: the copied parameters, and the Elman cell's b_h = bias_ih + bias_hh."""
        for i, view in self.copied:
            np.copyto(view, weights[i].detach().numpy())
        bias = self.bias
        for ih, hh, b_h in self.elman_bias:
            np.add(bias[ih] if ih in bias else weights[ih].detach().numpy(),
                   bias[hh] if hh in bias else weights[hh].detach().numpy(), out=b_h)


def _transformed():
    """Whether a torch.func transform (grad, vmap, jacrev, ...) or forward-mode AD is active: PyTorch's
    implementation runs then (fastbptt's node has neither a vmap rule nor a jvp)."""
    functorch = getattr(torch._C, "_are_functorch_transforms_active", None)
    if functorch is not None and functorch():
        return True
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _eligible_weights(weights, shapes):
    """Whether fastbptt can run these parameters: CPU tensors of one float dtype and of the shapes
    the module's sizes give, not in shared memory (``share_memory()``: Hogwild training shares the
    parameters' own storage between processes, which PyTorch's implementation keeps)."""
    if not weights or any(not isinstance(w, torch.Tensor) for w in weights):
        return False
    dtype = weights[0].dtype
    return dtype in _FLOATS and all(w.dtype == dtype and w.device.type == "cpu" and w.layout == torch.strided
                                    and tuple(w.shape) == shape and not w.is_shared()
                                    for w, shape in zip(weights, shapes))


class _Call:
    """One forward call's facts, kept by its graph for the backward pass.

    layout: "tbd" (sequence first), "btd" (batch first), "td" (unbatched) or "packed".
    """

    __slots__ = ("module", "bridge", "layout", "T", "B", "mask", "lengths", "training", "seed",
                 "lease", "method", "parallel")

    def __init__(self, module, bridge, layout, T, B, mask):
        self.module, self.bridge, self.layout, self.T, self.B = module, bridge, layout, T, B
        self.mask = mask                               # (T, B) bool for packed sequences, else None
        self.lengths = None if mask is None else mask.sum(axis=0, dtype=np.intp)
        self.training = module.training
        self.seed = None
        if module.training and module.dropout > 0 and module.num_layers > 1:
            # dropout masks from a seed drawn from PyTorch's generator: torch.manual_seed repeats them
            self.seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
        self.method, self.parallel = module.method, module.parallel
        self.lease = None

    # -- layouts
    def dense(self, a, out=None, name="bridge_x"):
        """The caller's ``a`` (layout) as a (T, B, K) array (a view where it can be)."""
        if self.layout == "tbd":
            return a
        if self.layout == "btd":
            return a.transpose(1, 0, 2)
        if self.layout == "td":
            return a[:, None, :]
        padded = self.lease.ws.scratch(name, (self.T, self.B, a.shape[-1]), a.dtype)
        padded[self.mask] = a                           # positions past each end are never read
        return padded

    def caller(self, a):
        """(T, B, K) ``a`` as a new tensor in the caller's layout."""
        if self.layout == "tbd":
            return torch.from_numpy(a.copy())
        if self.layout == "btd":
            return torch.from_numpy(np.ascontiguousarray(a.transpose(1, 0, 2)))
        if self.layout == "td":
            return torch.from_numpy(a[:, 0, :].copy())
        return torch.from_numpy(a[self.mask])

    def state_in(self, t):
        """hx (L·dirs, B, H) (or (L·dirs, H) unbatched) as fastbptt takes it."""
        a = t.detach().numpy()
        if self.layout == "td":
            a = a[:, None, :]
        return a[0] if self.bridge.model.n_states == 1 else a

    def state_out(self, a):
        """fastbptt's state as a new (L·dirs, B, H) tensor (or (L·dirs, H) unbatched)."""
        a = a[None] if a.ndim == 2 else a
        return torch.from_numpy((a[:, 0, :] if self.layout == "td" else a).copy())

    # -- the passes
    def forward(self, x, h0, c0, weights):
        """Run the recurrence into a held workspace; return the output and the final states as tensors."""
        bridge = self.bridge
        model = bridge.model
        bridge.sync(weights)
        model._training, model._dropout = self.training, float(self.module.dropout)
        if self.seed is not None:
            model._generator = np.random.default_rng(self.seed)
        cache = self.module.workspaces
        self.lease = _Lease(cache, cache.take(model, self.T, self.B, bridge.signature))
        X = self.dense(x.detach().numpy())
        state = None
        if h0 is not None:
            state = self.state_in(h0)
            if c0 is not None:
                state = (state, self.state_in(c0))
        with np.errstate(all="ignore"):        # inf and NaN propagate quietly, as in PyTorch
            H, state_T = _api._trusted_layer_forward(model, self.lease.ws, X, state, self.lengths,
                                                     self.parallel, self.method)
        if isinstance(state_T, tuple):
            return (self.caller(H),) + tuple(self.state_out(s) for s in state_T)
        return self.caller(H), self.state_out(state_T)

    def backward(self, dout, dh, dc, want_x, want_h0):
        """∂L/∂(input, h0, c0) and the parameters' gradients (one new flat tensor), from the outputs'."""
        bridge = self.bridge
        ws = self.lease.ws
        dH = self.dense(dout.detach().numpy(), name="bridge_dH")
        dstate = None
        if dh is not None:
            dstate = self.state_in(dh)
            if dc is not None:
                dstate = (dstate, self.state_in(dc))
        with np.errstate(all="ignore"):
            grads, dX, d0 = _api._trusted_layer_backward(bridge.model, ws, dH, dstate, self.parallel,
                                                         self.method, want_x)
        G = ws.grad_flat.copy()                        # fresh: the gradients outlive the workspace
        dx = self.caller(dX) if want_x else None
        dh0 = dc0 = None
        if want_h0:
            if isinstance(d0, tuple):
                dh0, dc0 = (self.state_out(s) for s in d0)
            else:
                dh0 = self.state_out(d0)
        self.lease.release()
        return G, dx, dh0, dc0


class _Sweep(torch.autograd.Function):
    """The autograd node of one call: inputs (call, x, h0, c0, *weights) -> (output, h_n[, c_n])."""

    @staticmethod
    def forward(ctx, call, x, h0, c0, *weights):
        outs = call.forward(x, h0, c0, weights)
        ctx.call = call
        ctx.save_for_backward(x, h0, c0, *weights)     # PyTorch then refuses in-place changes to them
        return outs

    @staticmethod
    def backward(ctx, dout, dh, dc=None):
        if torch.is_grad_enabled():
            # create_graph=True asks for gradients that can be differentiated again, which fastbptt's
            # node cannot give: refuse rather than return gradients without their second-order terms
            raise RuntimeError("fastbptt.torch modules do not support double backward (create_graph=True "
                               "through the module: gradient penalties, higher-order gradients); use "
                               "torch.nn's module for that, or leave create_graph False")
        return _Sweep._backward(ctx, dout, dh, dc)

    @staticmethod
    def _backward(ctx, dout, dh, dc):
        call = ctx.call
        x, h0, c0, *weights = ctx.saved_tensors
        if call.lease is None or call.lease.ws is None:    # a second backward (retain_graph=True)
            call.forward(x, h0, c0, weights)
        else:       # the weights copied in at each call: this graph's own (a later call may have copied others)
            call.bridge.sync(weights)
        want = ctx.needs_input_grad
        G, dx, dh0, dc0 = call.backward(dout, dh, dc, want[1], want[2] or want[3])
        wgrads = [None] * len(weights)
        seen = set()
        for i, offset, size, shape in call.bridge.grads:
            if want[4 + i]:
                g = G[offset:offset + size].reshape(shape)
                # two parameters never get the same memory (the Elman biases share b_h's gradient)
                wgrads[i] = torch.from_numpy(g.copy() if offset in seen else g)
            seen.add(offset)
        return (None, dx, dh0 if want[2] else None, dc0 if want[3] else None, *wgrads)


class _FastRNNBase:
    """What ``fastbptt.torch.RNN``, ``GRU`` and ``LSTM`` add to ``torch.nn``'s: see the module docstring.

    Extra keyword-only arguments (also attributes, settable):

    method : {"auto", "fused", "blas"}
        How fastbptt runs the recurrence (``fastbptt.api.choose_method``).
    parallel : bool
        Spread the batch of the fused method over Numba's threads.
    """

    _FASTBPTT = None

    def _fastbptt_init(self, method, parallel):
        if getattr(self, "proj_size", 0):
            raise ValueError(f"fastbptt.torch.{type(self).__name__} has no proj_size (fastbptt's cells have "
                             f"no projection); use torch.nn.LSTM for proj_size={self.proj_size}")
        self.method, self.parallel = method, parallel
        self.workspaces = WorkspaceCache()
        self.flatten_parameters()

    # -- the extras, checked when set
    @property
    def method(self) -> str:
        """How fastbptt runs the recurrence: "auto" (by shape), "fused" or "blas"."""
        return self.__dict__["_method"]

    @method.setter
    def method(self, value):
        if value not in ("auto", "fused", "blas"):
            raise ValueError(f"method must be 'auto', 'fused' or 'blas', got {value!r}")
        self.__dict__["_method"] = value

    @property
    def parallel(self) -> bool:
        """Whether the fused method spreads the batch over Numba's threads (bitwise the same results)."""
        return self.__dict__["_parallel"]

    @parallel.setter
    def parallel(self, value):
        if not isinstance(value, bool):
            raise TypeError(f"parallel must be a bool, got {value!r}")
        self.__dict__["_parallel"] = value

    @property
    def workspaces(self) -> WorkspaceCache:
        """The module's ``WorkspaceCache`` (its bounds are settable; a new cache may be assigned)."""
        return self.__dict__["_workspaces"]

    @workspaces.setter
    def workspaces(self, value):
        if not isinstance(value, WorkspaceCache):
            raise TypeError(f"workspaces must be a fastbptt.torch.WorkspaceCache, got {type(value).__name__}")
        self.__dict__["_workspaces"] = value

    # -- the shared buffer
    def _refresh_weights(self):
        """``_flat_weights`` up to date, as torch.nn's forward makes it (``_update_flat_weights``), at a
        tenth of the cost for a module without parametrizations: its weights are its parameters."""
        if "parametrizations" in self._modules:
            self._update_flat_weights()
            return
        params = self._parameters
        for name, w in zip(self._flat_weights_names, self._flat_weights):
            if params.get(name) is not w:
                self._update_flat_weights()
                return

    def _shapes(self):
        """The shape of each of ``_flat_weights``, from the module's sizes (as torch.nn makes them)."""
        G = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}[self.mode]
        H, dirs = self.hidden_size, 2 if self.bidirectional else 1
        shapes = []
        for name in self._flat_weights_names:
            k = int(name.split("_l")[1].split("_")[0])
            if name.startswith("weight_ih"):
                shapes.append((G * H, self.input_size if k == 0 else dirs * H))
            elif name.startswith("weight_hh"):
                shapes.append((G * H, H))
            else:
                shapes.append((G * H,))
        return shapes

    def flatten_parameters(self) -> None:
        """Put every parameter into one buffer that fastbptt's kernels read (PyTorch's name for
        the same on the GPU). Called by the constructor, ``.to()``/``.double()``, unpickling, and
        by ``forward`` when a parameter was replaced; a no-op for parameters fastbptt cannot run
        (another device or dtype)."""
        weights = getattr(self, "_flat_weights", None)
        if "_workspaces" not in self.__dict__ or weights is None \
                or len(weights) != len(self._flat_weights_names):
            return                                    # still in torch.nn's constructor
        if _transformed():                            # torch.func's wrapped tensors: PyTorch's code runs
            return
        bridge = self.__dict__.get("_fastbptt")
        if bridge is not None:
            if _eligible_weights(weights, self._shapes()) and bridge.current(weights):
                return                                # nothing moved (a parametrization's call, .to() as is)
            self.workspaces.clear()
        self.__dict__["_fastbptt"] = None
        if _eligible_weights(weights, self._shapes()):
            self.__dict__["_fastbptt"] = _Bridge(self, weights)

    def __getstate__(self):
        """What pickling (``torch.save`` of the module, ``copy.deepcopy``) keeps: torch.nn's state and plain
        values (``method``, ``parallel``, the cache's two bounds), so that ``torch.load(weights_only=True)``
        takes it. The bridge and the workspace cache are not state: rebuilt on unpickling."""
        state = super().__getstate__()
        state.pop("_fastbptt", None)
        cache = state.pop("_workspaces", None)
        if cache is not None:
            state["_workspace_bounds"] = (int(cache.max_count), int(cache.max_bytes))
        return state

    def __setstate__(self, state):
        """Unpickling (``torch.load`` of a module, ``copy.deepcopy``): an empty workspace cache, the
        parameters in a new buffer. ``method`` and ``parallel`` are checked as when set."""
        state = dict(state)
        bounds = state.pop("_workspace_bounds", None)
        old_cache = state.pop("_workspaces", None)            # a file written before the cache was dropped
        method, parallel = state.pop("_method", "auto"), state.pop("_parallel", False)
        super().__setstate__(state)
        self.__dict__["_fastbptt"] = None
        self.method, self.parallel = method, parallel
        if bounds is None and isinstance(old_cache, WorkspaceCache):
            bounds = (old_cache.max_count, old_cache.max_bytes)
        valid = isinstance(bounds, tuple) and len(bounds) == 2 and all(type(b) is int and b >= 0 for b in bounds)
        self.workspaces = WorkspaceCache(*bounds) if valid else WorkspaceCache()
        self.flatten_parameters()

    def _bridge_for(self, x, hx):
        """The bridge when fastbptt can run this call, else None (PyTorch's implementation runs)."""
        if _transformed():
            return None
        self._refresh_weights()
        bridge = self.__dict__.get("_fastbptt")
        weights = self._flat_weights
        if bridge is None or not bridge.current(weights):
            self.flatten_parameters()
            bridge = self.__dict__.get("_fastbptt")
            if bridge is None:
                return None
        if type(x) not in _PLAIN or x.device.type != "cpu" or x.dtype != bridge.dtype \
                or x.layout != torch.strided or torch.is_autocast_enabled("cpu") or x.numel() == 0:
            return None
        for h in (hx if isinstance(hx, tuple) else (hx,)):
            if h is not None and (type(h) not in _PLAIN or h.device.type != "cpu" or h.dtype != bridge.dtype
                                  or h.layout != torch.strided):
                return None
        return bridge

    @torch.compiler.disable                    # torch.compile: runs eagerly, a graph break at the module
    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        x = input.data if packed else input
        bridge = self._bridge_for(x, hx) if isinstance(x, torch.Tensor) else None
        if bridge is None:
            return super().forward(input, hx)
        lstm = self._FASTBPTT is _model.LSTM
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
                return super().forward(input, hx)          # PyTorch's own error
            self.check_input(data, batch_sizes)
            sizes = batch_sizes.numpy()
            if sizes.ndim != 1 or len(sizes) == 0 or sizes[0] < 1 or sizes[-1] < 0 or np.any(sizes[1:] > sizes[:-1]) \
                    or int(sizes.sum()) != data.shape[0]:
                raise ValueError(f"{type(self).__name__}: a PackedSequence's batch_sizes must be non-negative, "
                                 f"non-increasing and sum to its data's rows ({data.shape[0]}), got "
                                 f"{sizes.tolist()}; make it with torch.nn.utils.rnn.pack_padded_sequence "
                                 f"or pack_sequence")
            T, B = len(sizes), int(sizes[0])
            for name, idx in (("sorted_indices", sorted_indices), ("unsorted_indices", unsorted_indices)):
                if idx is not None and tuple(idx.shape) != (B,):
                    raise ValueError(f"{type(self).__name__}: a PackedSequence's {name} must have batch_sizes[0] "
                                     f"= {B} entries, got shape {tuple(idx.shape)}; make it with "
                                     f"torch.nn.utils.rnn.pack_padded_sequence or pack_sequence")
            mask = np.arange(B)[None, :] < sizes[:, None]
            layout = "packed"
            if hx is not None:
                self.check_forward_args(data, hx, batch_sizes)
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            mask = None
            if batched:
                layout = "btd" if self.batch_first else "tbd"
                T, B = (input.shape[1], input.shape[0]) if self.batch_first else input.shape[:2]
            else:
                layout, (T, B) = "td", (input.shape[0], 1)
            shaped = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            if hx is None:
                self.check_input(shaped, None)
            else:
                parts = hx if lstm else (hx,)
                if (lstm and not (isinstance(hx, tuple) and len(hx) == 2)) \
                        or not all(isinstance(h, torch.Tensor) for h in parts):
                    return super().forward(input, hx)      # PyTorch's own error (or its own handling)
                want = 3 if batched else 2
                if any(h.dim() != want for h in parts):
                    raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx "
                                       f"should also be {want}-D but got "
                                       f"({', '.join(f'{h.dim()}-D' for h in parts)}) tensors")
                self.check_forward_args(shaped, tuple(h if batched else h.unsqueeze(1) for h in parts)
                                        if lstm else (hx if batched else hx.unsqueeze(1)), None)
            unsorted_indices = None
        call = _Call(self, bridge, layout, int(T), int(B), mask)
        h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
        weights = self._flat_weights
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)
                                        or any(h is not None and h.requires_grad for h in (h0, c0))):
            outs = _Sweep.apply(call, x, h0, c0, *weights)
        else:
            outs = call.forward(x, h0, c0, weights)
            call.lease.release()
        out, states = outs[0], outs[1:]
        if packed:
            out = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
            states = self.permute_hidden(states if lstm else states[0], unsorted_indices)
            return out, states
        return out, (tuple(states) if lstm else states[0])


_EXTRAS = """

    On CPU float32/float64 tensors it runs fastbptt's compiled recurrence and reverse sweep
    through one ``torch.autograd`` node; on any other device or dtype, under autocast,
    ``torch.func`` transforms or forward-mode AD, and with parameters in shared memory, it runs
    PyTorch's implementation with the same parameters. Parameters, ``state_dict``, ``forward``
    and its shapes are ``torch.nn``'s (below). ``proj_size`` is refused. Double backward
    (``create_graph=True`` through the module) raises. Dropout masks are fastbptt's own (from a
    seed drawn from PyTorch's generator), not the ones ``torch.nn`` would draw.

    Extra keyword-only arguments, also attributes (checked when set):

    method : {"auto", "fused", "blas"}
        How fastbptt runs the recurrence (``fastbptt.api.choose_method``): one compiled loop
        over t per sequence, or one GEMM per step over the batch. Same results up to rounding.
    parallel : bool
        Spread the batch of the fused method over Numba's threads (bitwise the same results;
        wants threadpoolctl).

    Attributes
    ----------
    workspaces : WorkspaceCache
        The buffers of this module's calls, by (T, B), reused (bounds ``max_count``,
        ``max_bytes``; ``made``/``reused`` count them: both stay 0 when PyTorch's
        implementation ran). See ``fastbptt.torch.modules``.

    PyTorch's documentation of ``torch.nn.{name}`` follows.
    -------------------------------------------------------
"""


class RNN(_FastRNNBase, nn.RNN):
    __doc__ = ("``torch.nn.RNN`` (Elman, ``nonlinearity='tanh'`` or ``'relu'``) running fastbptt's kernels."
               + _EXTRAS.replace("{name}", "RNN") + (nn.RNN.__doc__ or ""))

    _FASTBPTT = _model.RNN

    def __init__(self, *args, method: str = "auto", parallel: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._fastbptt_init(method, parallel)


class GRU(_FastRNNBase, nn.GRU):
    __doc__ = "``torch.nn.GRU`` running fastbptt's kernels." + _EXTRAS.replace("{name}", "GRU") + (nn.GRU.__doc__ or "")

    _FASTBPTT = _model.GRU

    def __init__(self, *args, method: str = "auto", parallel: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._fastbptt_init(method, parallel)


class LSTM(_FastRNNBase, nn.LSTM):
    __doc__ = "``torch.nn.LSTM`` running fastbptt's kernels." + _EXTRAS.replace("{name}", "LSTM") + (nn.LSTM.__doc__ or "")

    _FASTBPTT = _model.LSTM

    def __init__(self, *args, method: str = "auto", parallel: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._fastbptt_init(method, parallel)
