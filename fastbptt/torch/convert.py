"""``fastbptt.torch.convert``: swap ``torch.nn``'s recurrent modules in a module tree for fastbptt's, and back.

    model = fastbptt.torch.convert(model)                 # every torch.nn.RNN/GRU/LSTM -> fastbptt.torch's
    model = fastbptt.torch.convert(model, to="torch")     # and back (for export, or a process without fastbptt)

In the manner of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the tree's children are replaced
in place and the converted module is returned (a new one when the root itself is recurrent). Each new
module takes the old one's own ``Parameter`` objects (their values, ``requires_grad``, device and
dtype, and so an optimizer built over them and its state), its training mode, hooks and buffers.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import modules as _modules

_TO_FAST = {nn.RNN: _modules.RNN, nn.GRU: _modules.GRU, nn.LSTM: _modules.LSTM}
_TO_TORCH = {fast: plain for plain, fast in _TO_FAST.items()}
# what a module carries besides its parameters, shared with the new module so that hook handles still work
_CARRIED = ("_buffers", "_non_persistent_buffers_set", "_forward_hooks", "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
            "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
            "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_is_full_backward_hook")


def convert(module: nn.Module, to: str = "fastbptt", *, method: str = "auto", parallel: bool = False) -> nn.Module:
    """Replace every ``torch.nn.RNN``, ``GRU`` and ``LSTM`` in ``module``'s tree by fastbptt.torch's
    (``to="fastbptt"``, the default), or every fastbptt.torch module by ``torch.nn``'s (``to="torch"``).

    Parameters
    ----------
    module : torch.nn.Module
        The root of the tree; it may itself be an RNN, GRU or LSTM. Its children are replaced in
        place (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does): use the returned module.
    to : {"fastbptt", "torch"}
        Which way to convert.
    method, parallel
        The new fastbptt modules' extras (see ``fastbptt.torch.LSTM``); only with ``to="fastbptt"``.

    Returns
    -------
    torch.nn.Module
        ``module`` itself, or the new module that replaces it when the root was converted.

    Notes
    -----
    - Weights are kept, not copied: each new module holds the old module's own ``Parameter``
      objects, so values, ``requires_grad``, device, dtype, an optimizer built over them (and its
      state) and tied references carry over. (fastbptt moves their data into its buffer; the old
      module, if still referenced elsewhere, keeps working on the same parameters.) The training
      mode, the module's hooks and buffers carry over too; other attributes a user set on the
      module do not.
    - A module referenced twice in the tree (shared) is converted once: both places get the same new
      module.
    - Only modules whose class is exactly ``torch.nn.RNN``/``GRU``/``LSTM`` are converted. Modules left as
      they are, with a ``UserWarning`` naming them and why: an LSTM with ``proj_size > 0`` (fastbptt's
      cells have no projection), a module with parametrizations (``torch.nn.utils.parametrize``: its
      class is generated), a user's subclass (its ``forward`` may differ). A module on another device
      or dtype is converted: fastbptt's module runs PyTorch's implementation there.
    """
    if to not in ("fastbptt", "torch"):
        raise ValueError(f"convert: to must be 'fastbptt' or 'torch', got {to!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: module must be a torch.nn.Module, got {type(module).__name__}")
    if to == "torch" and (method != "auto" or parallel is not False):
        raise ValueError("convert: method and parallel are fastbptt's extras; they go with to='fastbptt' only")
    if to == "fastbptt":                       # checked before anything changes (the modules' own checks)
        if method not in ("auto", "fused", "blas"):
            raise ValueError(f"convert: method must be 'auto', 'fused' or 'blas', got {method!r}")
        if not isinstance(parallel, bool):
            raise TypeError(f"convert: parallel must be a bool, got {parallel!r}")
    return _convert(module, to, method, parallel, {}, "")


def _convert(module, to, method, parallel, done, path):
    key = id(module)
    if key in done:
        return done[key][1]
    new = _replacement(module, to, method, parallel, path or "the root")
    done[key] = (module, new)                  # the old module kept alive: its id is not reused meanwhile
    for name, child in list(new._modules.items()):
        if child is not None:
            converted = _convert(child, to, method, parallel, done, f"{path}.{name}" if path else name)
            if converted is not child:
                new._modules[name] = converted
    return new


def _replacement(module, to, method, parallel, path):
    """The module that replaces ``module`` (``module`` itself when it stays)."""
    table = _TO_FAST if to == "fastbptt" else _TO_TORCH
    cls = table.get(type(module))
    if cls is None:
        if to == "fastbptt" and isinstance(module, nn.RNNBase) and not isinstance(module, _modules._FastRNNBase):
            why = ("its parametrizations (torch.nn.utils.parametrize; remove them first, or convert before "
                   "parametrizing)" if "parametrizations" in module._modules
                   else f"its class {type(module).__qualname__} is not torch.nn.RNN, GRU or LSTM")
            warnings.warn(f"fastbptt.torch.convert left {path} ({type(module).__name__}) as it is: {why}",
                          UserWarning, stacklevel=4)
        return module
    if "parametrizations" in module._modules:
        warnings.warn(f"fastbptt.torch.convert left {path} ({type(module).__name__}) as it is: its "
                      f"parametrizations (torch.nn.utils.parametrize)", UserWarning, stacklevel=4)
        return module
    if getattr(module, "proj_size", 0):
        warnings.warn(f"fastbptt.torch.convert left {path} (torch.nn.LSTM) as it is: proj_size="
                      f"{module.proj_size} (fastbptt's cells have no projection)", UserWarning, stacklevel=4)
        return module
    kwargs = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                  dropout=module.dropout, bidirectional=module.bidirectional)
    if cls in (nn.RNN, _modules.RNN):
        kwargs["nonlinearity"] = module.nonlinearity
    if to == "fastbptt":
        kwargs.update(method=method, parallel=parallel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # torch.nn's note about dropout with one layer: the old module had it
        # on the meta device: no memory, no draw from torch's generator; the old parameters go in next
        new = cls(module.input_size, module.hidden_size, device="meta", **kwargs)
    for name in module._flat_weights_names:
        setattr(new, name, module._parameters[name])
    for attr in _CARRIED:
        if attr in module.__dict__:
            new.__dict__[attr] = module.__dict__[attr]
    new.train(module.training)
    new._init_flat_weights()                   # torch.nn's list of the weights (and fastbptt's buffer) anew
    return new
