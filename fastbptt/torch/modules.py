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

import contextlib
import copyreg
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
_NO_LOCK = contextlib.nullcontext()


def _bucket(T: int) -> int:
    """The T a new workspace is made for: T itself up to 8, above it rounded up to a multiple of an
    eighth of T's power of two (1, 1.25, 1.5 or 1.75 times a power of two: at most 25 % more memory),
    so that calls of nearby T (a variable-length BPTT loop) share one workspace."""
    if T <= 8:
        return T
    step = 1 << (T.bit_length() - 3)
    return -(-T // step) * step


class _Prefix(Workspace):
    """A workspace for T steps within a longer one of the same model and B (``parent``): each of its
    buffers is the first elements of the parent's, so the kernels run over the first T steps of the
    parent's memory and nothing is allocated. Used while its parent is held by the call (a lease):
    the parent and its other prefixes are then unused. Pickled as a plain ``Workspace``."""

    def __init__(self, parent, model, T):
        object.__setattr__(self, "parent", parent)
        super().__init__(model, T, parent.B)

    def _carve(self, declared):
        big = dict(self.parent._views)
        views = {}
        for name, shape, dtype, value in declared:
            view = big[name].reshape(-1)[:int(np.prod(shape))].reshape(shape)
            if value:
                view[...] = value
            views[name] = view
        return self.parent._block, views

    def x_buffer(self):
        if self._x is None:
            self._x = self.parent.x_buffer()[:self.T]
        return self._x

    def dX_buffer(self):
        if self._dX is None:
            self._dX = self.parent.dX_buffer()[:self.T]
        return self._dX

    def scratch(self, name, shape, dtype=None):
        """The parent's scratch of the same name, its first T rows (or T·B rows): shapes led by T."""
        shape = tuple(shape)
        T, B = self.T, self.B
        if not shape or shape[0] not in (T, T * B):
            return super().scratch(name, shape, dtype)
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        a = self._scratch.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            lead = self.parent.T if shape[0] == T else self.parent.T * B
            a = self.parent.scratch(name, (lead,) + shape[1:], dtype)[:shape[0]]
            self._scratch[name] = a
        return a

    def __reduce__(self):
        return copyreg.__newobj__, (Workspace,), self.__getstate__()


class WorkspaceCache:
    """The idle workspaces of one module, reused by calls of the same B and a T they cover.

    A workspace is made for T rounded up (``_bucket``: at most 25 % more), and serves any call of its
    B with a T up to its own (the kernels run over its first T steps): a loop whose T changes from
    call to call (variable BPTT lengths, the last batch of an epoch) reuses a few workspaces rather
    than making one per T (whose memory the allocator keeps: the process grows).

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

    #: at most this many prefixes (workspaces of a shorter T) kept per workspace, the oldest dropped
    PREFIXES = 16

    def __init__(self, max_count: int = 4, max_bytes: int = 256 * 2**20):
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._idle: OrderedDict = OrderedDict()     # id(ws) -> ws, least recently used first
        self._lock = threading.RLock()               # RLock: give() may run in a __del__
        self.made = 0
        self.reused = 0

    def take(self, model, T: int, B: int, sig=None) -> Workspace:
        """A workspace for ``model`` and (T, B): within the shortest idle one of B steps at least T, or
        within a new one (``sig``: the model's signature, when the caller knows it)."""
        if sig is None:
            sig = model_signature(model)
        with self._lock:
            best = None
            for key in reversed(self._idle):             # the most recently used first, among equals
                ws = self._idle[key]
                if ws.B == B and T <= ws.T and ws.signature == sig and (best is None or ws.T < best[1].T):
                    best = key, ws
            if best is not None:
                del self._idle[best[0]]
                self.reused += 1
                parent = best[1]
            else:
                self.made += 1
        if best is None:
            parent = Workspace(model, _bucket(T), B)
        prefixes = getattr(parent, "_prefixes", None)
        if prefixes is None:
            prefixes = parent._prefixes = OrderedDict()
        ws = prefixes.get(T)
        if ws is None:
            ws = prefixes[T] = _Prefix(parent, model, T)
            while len(prefixes) > self.PREFIXES:
                prefixes.popitem(last=False)
        return ws

    def give(self, ws: Workspace) -> None:
        """Keep ``ws`` (the workspace that holds it) for a later call (within the bounds)."""
        ws = getattr(ws, "parent", ws)
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
                 "signature", "lock", "stacked")

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
        self.stacked = L > 1                           # dropout can apply: calls take the lock
        self.lock = threading.Lock()

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


_functorch = getattr(torch._C, "_functorch", None)
_batched = getattr(_functorch, "is_batchedtensor", lambda t: False)            # functorch's vmap
_legacy_batched = getattr(_functorch, "is_legacy_batchedtensor", lambda t: False)   # is_grads_batched
_tracing_state = torch._C._get_tracing_state
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _capturing():
    """Whether a graph is being captured: ``torch.jit.trace`` (and the TorchScript ONNX exporter),
    ``torch.compile``/``torch.export`` (dynamo, or export's FakeTensor/FunctionalTensor modes), or any
    ``TorchDispatchMode`` (fake tensors, FlopCounterMode, ...): PyTorch's implementation runs then, so
    that the capture sees its operators (fastbptt's compiled code is invisible to it)."""
    return _tracing_state() is not None or _dispatch_modes() > 0 or torch.compiler.is_compiling()


def _plain(t):
    """Whether ``t`` is a plain CPU strided tensor fastbptt can read (not a subclass, not batched by
    ``vmap``/``is_grads_batched``)."""
    return type(t) in _PLAIN and t.device.type == "cpu" and t.layout is torch.strided \
        and not _legacy_batched(t) and not _batched(t)


def _eligible_weights(weights, shapes):
    """Whether fastbptt can run these parameters: CPU tensors of one float dtype and of the shapes
    the module's sizes give, not in shared memory (``share_memory()``: Hogwild training shares the
    parameters' own storage between processes, which PyTorch's implementation keeps)."""
    if not weights or any(not isinstance(w, torch.Tensor) or type(w) not in _PLAIN for w in weights):
        return False
    dtype = weights[0].dtype
    return dtype in _FLOATS and all(w.dtype == dtype and w.device.type == "cpu" and w.layout == torch.strided
                                    and tuple(w.shape) == shape and not w.is_shared()
                                    for w, shape in zip(weights, shapes))


class _Call:
    """One forward call's facts, kept by its graph for the backward pass.

    layout: "tbd" (sequence first), "btd" (batch first), "td" (unbatched) or "packed".
    """

    __slots__ = ("bridge", "layout", "T", "B", "mask", "lengths", "training", "dropout", "seed",
                 "lease", "method", "parallel", "cache")

    def __init__(self, module, bridge, layout, T, B, mask):
        # everything the passes read is taken from the module here, at the forward: a second backward
        # (retain_graph=True) re-runs this call as it was, whatever the module's attributes are by then
        self.bridge, self.layout, self.T, self.B = bridge, layout, T, B
        self.mask = mask                               # (T, B) bool for packed sequences, else None
        self.lengths = None if mask is None else mask.sum(axis=0, dtype=np.intp)
        self.training = module.training
        self.dropout = float(module.dropout)
        self.seed = None
        if module.training and self.dropout > 0 and module.num_layers > 1:
            # dropout masks from a seed drawn from PyTorch's generator: torch.manual_seed repeats them
            self.seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
        self.method, self.parallel = module.method, module.parallel
        self.cache = module.workspaces
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
        cache = self.cache
        self.lease = _Lease(cache, cache.take(model, self.T, self.B, bridge.signature))
        X = self.dense(x.detach().numpy())
        state = None
        if h0 is not None:
            state = self.state_in(h0)
            if c0 is not None:
                state = (state, self.state_in(c0))
        # the model's dropout settings and generator are the call's while it runs: with stacked layers
        # (where they matter) one call at a time sets and reads them (threads, a backward's re-run)
        with bridge.lock if bridge.stacked else _NO_LOCK, np.errstate(all="ignore"):   # inf/NaN quietly
            bridge.sync(weights)
            model._training, model._dropout = self.training, self.dropout
            if self.seed is not None:
                model._generator = np.random.default_rng(self.seed)
            H, state_T = _api._trusted_layer_forward(model, self.lease.ws, X, state, self.lengths,
                                                     self.parallel, self.method)
        if isinstance(state_T, tuple):
            return (self.caller(H),) + tuple(self.state_out(s) for s in state_T)
        return self.caller(H), self.state_out(state_T)

    def dropout_masks(self, x, h0, c0, weights):
        """This call's dropout masks as tensors (T, B, dirs·H) in the caller's order, one per layer below
        the top (None without dropout); the workspace goes back."""
        if self.seed is None:
            if self.lease is not None:
                self.lease.release()
            return None
        if self.lease is None or self.lease.ws is None:   # a second backward: the forward draws them again
            self.forward(x, h0, c0, weights)
        masks = [torch.from_numpy(m) for m in self.lease.ws.dropout_masks()]
        self.lease.release()
        return masks

    def torch_forward(self, x, h0, c0, weights, masks):
        """This call (output, h_n[, c_n] as ``forward`` returns them) with PyTorch's operators, layer by
        layer with ``masks`` between the layers (or in one call without them)."""
        model = self.bridge.model
        L, dirs, H = model.num_layers, model.num_directions, model.hidden_size
        op = {"rnn": getattr(torch._VF, f"rnn_{getattr(model, 'activation', 'tanh')}", None),
              "gru": torch._VF.gru, "lstm": torch._VF.lstm}[model.cell]
        lstm = model.cell == "lstm"
        packed = self.layout == "packed"
        if self.layout == "td":
            x, h0, c0 = (None if t is None else t.unsqueeze(1) for t in (x, h0, c0))
        elif self.layout == "btd":
            x = x.transpose(0, 1)
        if h0 is None:
            h0 = x.new_zeros(L * dirs, self.B, H)
        if lstm and c0 is None:
            c0 = x.new_zeros(L * dirs, self.B, H)
        if packed:
            batch_sizes = torch.from_numpy(self.mask.sum(axis=1))
            rows = torch.from_numpy(self.mask)
        per = len(weights) // (L * dirs) * dirs          # the weights of one layer (both directions)
        layers = [(0, L)] if masks is None else [(k, k + 1) for k in range(L)]
        states, cells, out = [], [], x
        for k0, k1 in layers:
            hx = h0[k0 * dirs:k1 * dirs]
            if lstm:
                hx = (hx, c0[k0 * dirs:k1 * dirs])
            w = list(weights[k0 * per:k1 * per])
            if packed:
                res = op(out, batch_sizes, hx, w, model.bias, k1 - k0, 0.0, False, dirs == 2)
            else:
                res = op(out, hx, w, model.bias, k1 - k0, 0.0, False, dirs == 2, False)
            out = res[0]
            states.append(res[1])
            if lstm:
                cells.append(res[2])
            if masks is not None and k0 < L - 1:
                out = out * (masks[k0][rows] if packed else masks[k0])
        states = [torch.cat(states)] + ([torch.cat(cells)] if lstm else [])
        if self.layout == "td":
            out, states = out[:, 0], [s[:, 0] for s in states]
        elif self.layout == "btd":
            out = out.transpose(0, 1)
        return (out, *states)

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
        if not all(g is None or _plain(g) for g in (dout, dh, dc)) or _transformed():
            # batched gradients (autograd.grad(is_grads_batched=True), jacobian(vectorize=True), vmap over
            # a backward) or tensor subclasses: this call's backward through PyTorch's operators
            return _Sweep._torch_backward(ctx, dout, dh, dc)
        return _Sweep._backward(ctx, dout, dh, dc)

    @staticmethod
    def _torch_backward(ctx, dout, dh, dc):
        """The gradients through PyTorch's implementation of this call: the forward again with torch's
        operators (the same weights and dropout masks), differentiated with ``autograd.grad``."""
        call = ctx.call
        x, h0, c0, *weights = ctx.saved_tensors
        masks = call.dropout_masks(x, h0, c0, weights)
        inputs = [t.detach() if t is not None else None for t in (x, h0, c0, *weights)]
        wanted = [i for i, (t, w) in enumerate(zip(inputs, ctx.needs_input_grad[1:])) if t is not None and w]
        grads = [None] * len(inputs)
        if not wanted:
            return (None, *grads)

        def run(*tensors):
            args = list(inputs)
            for i, t in zip(wanted, tensors):
                args[i] = t
            return call.torch_forward(args[0], args[1], args[2], args[3:], masks)

        primals = [inputs[i] for i in wanted]
        grads_out = (dout, dh, dc)[:3 if call.bridge.model.cell == "lstm" else 2]
        if _transformed():              # functorch's vmap over this backward: its own vjp composes with it
            got = torch.func.vjp(run, *primals)[1](grads_out)
        else:                           # autograd.grad(is_grads_batched=True) and jacobian(vectorize=True)
            with torch.enable_grad():
                primals = [t.requires_grad_() for t in primals]
                got = torch.autograd.grad(run(*primals), primals, grads_out, allow_unused=True,
                                          materialize_grads=True)
        for i, g in zip(wanted, got):
            grads[i] = g
        return (None, *grads)

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

    def __prepare_scriptable__(self):
        """``torch.jit.script`` cannot compile fastbptt's code; what it would put in this module's place (its
        ``__prepare_scriptable__`` replaces submodules in the caller's model) is left to the caller."""
        raise RuntimeError(f"torch.jit.script cannot compile fastbptt.torch.{type(self).__name__} (fastbptt's "
                           f"kernels are not TorchScript); script fastbptt.torch.convert(model, to='torch') "
                           f"(torch.nn's modules over the same parameters), or use torch.jit.trace or "
                           f"torch.export, under which this module runs PyTorch's implementation")

    def _bridge_for(self, x, hx):
        """The bridge when fastbptt can run this call, else None (PyTorch's implementation runs)."""
        if _transformed() or _capturing() or type(x) not in _PLAIN:
            return None                                # before the weights are read: they may be fake
        self._refresh_weights()
        bridge = self.__dict__.get("_fastbptt")
        weights = self._flat_weights
        if bridge is None or not bridge.current(weights):
            self.flatten_parameters()
            bridge = self.__dict__.get("_fastbptt")
            if bridge is None:
                return None
        if not _plain(x) or x.dtype != bridge.dtype or torch.is_autocast_enabled("cpu") or x.numel() == 0:
            return None
        for h in (hx if isinstance(hx, tuple) else (hx,)):
            if h is not None and (not _plain(h) or h.dtype != bridge.dtype):
                return None
        return bridge

    def forward(self, input, hx=None):
        if torch.compiler.is_compiling():     # dynamo tracing this call (export, allow_rnn): torch.nn's code
            return super().forward(input, hx)
        return self._forward(input, hx)

    @torch.compiler.disable                    # torch.compile: runs eagerly, a graph break at the module
    def _forward(self, input, hx=None):
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
