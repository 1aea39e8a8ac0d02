"""Count host synchronisations: the ops that make the CPU wait for the GPU.

On CUDA each of these blocks the host until the stream has caught up (the result, or its size, lives
on the device). On a CPU nothing stalls, but the same ops run, so counting them on a CPU is a faithful
proxy for what would stall on a GPU:

* ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``if t:`` (aten ``_local_scalar_dense``);
* ``nonzero`` / ``argwhere`` / ``torch.where(cond)`` (data-dependent output size);
* boolean-mask indexing ``x[mask]`` and ``x[mask] = v``, ``masked_select``;
* ``unique`` / ``unique_consecutive``, ``repeat_interleave`` without ``output_size``;
* copies to the host: ``.tolist()``, ``.numpy()``, ``.cpu()`` / ``.to("cpu")`` of a device tensor.

Usage::

    with SyncCounter() as c:
        model.generate(...)
    c.total, c.counts   # {'item': 3, 'nonzero': 1, ...}

``SyncCounter(cpu_copies=True)`` (the default) also counts ``.tolist()`` / ``.numpy()`` / ``.cpu()`` of
tensors that are already on the CPU, so a CPU run counts what a CUDA run would copy to the host.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_SCALAR = {aten._local_scalar_dense.default}
_NONZERO = {aten.nonzero.default, aten.nonzero_static.default, aten.argwhere.default}
_MASKED = {aten.masked_select.default}
_UNIQUE = {aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
           aten._unique.default}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_HOST_METHODS = {"tolist": "tolist", "numpy": "numpy", "__array__": "numpy", "cpu": "to_host"}


def _has_bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SCALAR:
            self.counts["item"] += 1
        elif func in _NONZERO:
            self.counts["nonzero"] += 1
        elif func in _MASKED:
            self.counts["masked_select"] += 1
        elif func in _UNIQUE:
            self.counts["unique"] += 1
        elif func in _REPEAT and kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
            self.counts["repeat_interleave"] += 1
        elif func in _INDEX and _has_bool_index(args[1]):
            self.counts["bool_index"] += 1
        elif func is aten._to_copy.default and kwargs.get("device") is not None:
            src = args[0].device
            if torch.device(kwargs["device"]).type == "cpu" and src.type != "cpu":
                self.counts["to_host"] += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counts: Counter, cpu_copies: bool):
        super().__init__()
        self.counts = counts
        self.cpu_copies = cpu_copies

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_METHODS and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            # a device tensor's copy is seen by the dispatch mode (_to_copy); count CPU tensors here
            if t.device.type == "cpu" and self.cpu_copies:
                self.counts[_HOST_METHODS[name]] += 1
            elif name in ("tolist", "numpy", "__array__") and t.device.type != "cpu":
                self.counts[_HOST_METHODS[name]] += 1
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager counting host-synchronising ops (see the module docstring)."""

    def __init__(self, cpu_copies: bool = True):
        self.counts: Counter = Counter()
        self._modes = [_Function(self.counts, cpu_copies), _Dispatch(self.counts)]

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
