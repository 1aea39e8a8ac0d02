"""Count host synchronisations: the ops that make the CPU wait for the GPU.

On CUDA each of these blocks the host until the stream has caught up (the result, or its size, lives
on the device). On a CPU nothing stalls, but the same ops run, so counting them on a CPU is a faithful
proxy for what would stall on a GPU:

* ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``if t:`` (aten ``_local_scalar_dense``);
* ``nonzero`` / ``argwhere`` / ``torch.where(cond)`` (data-dependent output size);
* boolean-mask indexing ``x[mask]`` and ``x[mask] = v``, ``masked_select``;
* ``unique`` / ``unique_consecutive``, ``repeat_interleave`` with tensor repeats and no ``output_size``;
* copies to the host: ``.tolist()``, ``.numpy()``, ``.cpu()`` of a device tensor.

On a CPU every tensor is a host tensor, so the counter tells "device" tensors (those that would live
on the GPU: the model's inputs, parameters and everything computed from them, and tensors created with
an explicit ``device=``) from **host** tensors (results of ``.cpu()`` / ``.tolist()``, tensors created
without a device, and everything computed only from host tensors). Only ops on device tensors count.
``.to(device)`` with an explicit device (not the string ``"cpu"``) makes a device tensor again.

Usage::

    with SyncCounter() as c:
        model.generate(...)
    c.total, c.counts   # Counter({'item': 3, 'nonzero': 1, ...})
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

_SCALAR = {aten._local_scalar_dense.default}
_NONZERO = {aten.nonzero.default, aten.argwhere.default}
_MASKED = {aten.masked_select.default}
_UNIQUE = {aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten._unique.default}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_FACTORIES = {"arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "randperm", "linspace", "eye",
              "rand", "randn", "randint", "logspace", "empty_strided", "scalar_tensor"}
_TO_HOST = {"tolist": "tolist", "numpy": "numpy", "__array__": "numpy", "cpu": "to_host"}


def _tensors(args, kwargs):
    return [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


def _bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = None
        if func in _SCALAR:
            key = "item"
        elif func in _NONZERO:
            key = "nonzero"
        elif func in _MASKED:
            key = "masked_select"
        elif func in _UNIQUE:
            key = "unique"
        elif func in _REPEAT and kwargs.get("output_size") is None and not (len(args) > 3 and args[3] is not None):
            key = "repeat_interleave"
        elif func in _INDEX and _bool_index(args[1]):
            key = "bool_index"
        elif func is aten._to_copy.default and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu":
            key = "to_host"
        if key is not None and not all(self.c.is_host(t) for t in _tensors(args, kwargs)):
            self.c.counts[key] += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        ins = _tensors(args, kwargs)
        if name in _TO_HOST and ins:
            if not self.c.is_host(ins[0]) and ins[0].device.type == "cpu":
                self.c.counts[_TO_HOST[name]] += 1  # a device tensor's real copy is seen by _Dispatch
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                out = out.view_as(out) if out is ins[0] else out
                self.c.mark(out)
            return out
        out = func(*args, **kwargs)
        if name in ("to", "cuda") and ins:
            dev = kwargs.get("device", args[1] if len(args) > 1 else None)
            if name == "cuda" or isinstance(dev, torch.device) or (isinstance(dev, str) and dev != "cpu"):
                if out is ins[0]:
                    out = out.view_as(out)  # a distinct (device) alias of the host tensor
                return out
        if ins:
            host = all(self.c.is_host(t) for t in ins)
        else:  # a factory: host unless a device is named
            host = name in _FACTORIES and kwargs.get("device") is None
        if host:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.c.mark(t)
        return out


class SyncCounter:
    """Context manager counting host-synchronising ops on device tensors (see the module docstring)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._host = WeakIdKeyDictionary()
        self._modes = [_Function(self), _Dispatch(self)]

    def is_host(self, t: torch.Tensor) -> bool:
        return t in self._host

    def mark(self, t: torch.Tensor) -> None:
        self._host[t] = True

    def __enter__(self) -> "SyncCounter":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
