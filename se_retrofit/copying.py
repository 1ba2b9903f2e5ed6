"""A copy of a model made while the model is analysed: its tensors are cloned in a worker thread.

:func:`se_retrofit.retrofit` edits a copy of the model it is given. Most of that copy's cost is the
tensor data (fresh memory, page by page), which torch copies without holding the GIL: started
before the analysis, the clones are made beside it, and :meth:`ModelCopy.result` only has the
modules to copy, with :func:`copy.deepcopy` (the clones handed to it in its memo, so the copy is
the one ``copy.deepcopy(model)`` makes).

The analysis reads no tensor data when it probes on meta or fake tensors. Where it probed on real
tensors (a forward that needs values) the clones are dropped and the model is deep-copied after the
analysis, as it would have been without this module.

Example:
    >>> import timm, torch
    >>> model = timm.create_model("resnet18")
    >>> pending = ModelCopy(model)
    >>> copied = pending.result()
    >>> copied is not model and torch.equal(copied.fc.weight, model.fc.weight)
    True
    >>> copied.fc.weight.data_ptr() != model.fc.weight.data_ptr()
    True
"""
from __future__ import annotations

import copy
import threading
from collections import Counter, OrderedDict

import torch
from torch import nn


class ModelCopy:
    """Start copying ``model``'s parameters and buffers now; :meth:`result` is the deep copy."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors = _clonable(model)
        self._clones: list[torch.Tensor] | None = None
        self._error: BaseException | None = None
        # not a daemon: a process that ends (an error raised before result()) waits for the clones
        # instead of tearing torch down under them
        self._thread = threading.Thread(target=self._clone, name="se_retrofit-copy", daemon=False)
        self._thread.start()

    def _clone(self) -> None:
        try:
            with torch.no_grad():
                self._clones = [t.detach().clone() for t in self.tensors]
        except BaseException as error:  # re-raised as the plain deep copy's, in result()
            self._error = error

    def result(self, data_read: bool = False) -> nn.Module:
        """The deep copy of the model; with ``data_read`` (something ran the model on real numbers
        meanwhile) the clones are dropped and the model is copied as it is now."""
        self._thread.join()
        if data_read or self._error is not None or self._clones is None:
            return copy.deepcopy(self.model)
        memo = {id(tensor): _like(tensor, clone) for tensor, clone in zip(self.tensors, self._clones)}
        return deepcopy_module(self.model, memo)


def deepcopy_module(module: nn.Module, memo: dict[int, object] | None = None) -> nn.Module:
    """``copy.deepcopy(module, memo)``, quicker: a module whose class copies as :class:`torch.nn.Module`
    does (no ``__deepcopy__`` or ``__reduce__`` of its own) is rebuilt here as deepcopy rebuilds it, from
    its ``__getstate__`` into ``__setstate__``, with the empty hook dictionaries, settings and children
    copied without the generic machinery; anything else goes through :func:`copy.deepcopy`, same memo."""
    memo = {} if memo is None else memo
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    if not _copies_as_a_module(cls):
        return copy.deepcopy(module, memo)
    state = module.__getstate__()
    if not isinstance(state, dict):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    memo.setdefault(id(memo), []).append(module)  # copy.deepcopy's keep-alive list
    new.__setstate__({name: _copied(value, memo) for name, value in state.items()})
    return new


#: what copy.deepcopy would call instead of reducing the module to its class and state
_MODULE_COPY_METHODS = ("__deepcopy__", "__reduce_ex__", "__reduce__")
_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _copies_as_a_module(cls: type) -> bool:
    return all(getattr(cls, name, None) is getattr(nn.Module, name, None) for name in _MODULE_COPY_METHODS)


def _copied(value: object, memo: dict[int, object]) -> object:
    if isinstance(value, _ATOMS):
        return value
    kind = type(value)
    if kind is tuple and all(isinstance(item, _ATOMS) for item in value):
        return value
    if not value and kind in (dict, OrderedDict, set, list):
        return kind()
    if kind is dict and value and all(isinstance(item, nn.Module) or item is None for item in value.values()):
        return {name: None if child is None else deepcopy_module(child, memo) for name, child in value.items()}
    return copy.deepcopy(value, memo)


def _clonable(model: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers whose deep copy is a plain clone: CPU, dense, a tensor or parameter
    of torch's own class, no gradient or attributes, alone on a storage it fills. Any other tensor
    (a view sharing storage, a tensor subclass) is left to :func:`copy.deepcopy`."""
    tensors = list({id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    owners = Counter(_storage(t) for t in tensors if _plain(t))
    return [t for t in tensors if _plain(t) and owners[_storage(t)] == 1 and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()]


def _plain(tensor: torch.Tensor) -> bool:
    return (type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type == "cpu"
            and tensor.layout == torch.strided and not tensor.is_quantized and tensor.grad is None
            and tensor.is_leaf and not vars(tensor))


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _like(original: torch.Tensor, clone: torch.Tensor) -> torch.Tensor:
    """What ``copy.deepcopy(original)`` gives, around the data already cloned."""
    if isinstance(original, nn.Parameter):
        return nn.Parameter(clone, requires_grad=original.requires_grad)
    return clone.requires_grad_(original.requires_grad)
