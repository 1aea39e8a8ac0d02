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

**Kernel launches.** ``OpCounter`` counts, with the same device / host tracking, the aten ops dispatched
on device tensors that would launch work on a GPU: a kernel, or a memcpy. At batch 1 an eager model
on an H100 is bound by launches + Python, not FLOPs, so a method's selection overhead there is roughly
proportional to this count (about 10-15 us per op). The rule:

* counted: every dispatched aten op (after autograd and composite decomposition, so ``reshape`` is
  seen as ``view`` or ``clone``; under ``inference_mode`` composite ops such as ``to``, ``reshape``, ``contiguous``
  and ``flatten`` reach the counter whole, and count as ``_to_copy`` / ``clone`` when they copied rather than
  returned an alias) with a device tensor among its inputs, or with
  no tensor input at all outside a host call (``arange(n, device=d)``); also in-place ops
  (``add_``, ``index_put_``, ``copy_``), the copy to the host of ``.cpu()`` / ``.tolist()`` / ``.numpy()``
  (key ``_to_copy``), and ``.item()`` (``_local_scalar_dense``: a device-to-host memcpy, also a sync);
* not counted: views and metadata (every op whose schema returns an alias of an input: ``view``,
  ``expand``, ``t``, ``transpose``, ``permute``, ``slice``, ``select``, ``unsqueeze``, ``squeeze``,
  ``alias``, ``as_strided``, ``detach``, ``unbind``, ``split``, ``lift_fresh``, ``_reshape_alias``, ...;
  their in-place forms ``unsqueeze_``, ``transpose_``, ...; ``_unsafe_view``), allocations (``empty``,
  ``empty_like``, ``empty_strided``, ``new_empty``, ``resize_``, ``set_``), and everything inside a host
  call (a torch function whose tensor inputs are all host tensors, or a factory without ``device=``):
  a loop on the host copy of the scores costs no launch.

It is a proxy: a few ops launch more than one kernel on CUDA (``sort``, ``cumsum``, ``nonzero``), and
a CPU decomposition can differ from the CUDA one by an op; the difference between two methods on the
same input is what it is for. ``torch.from_numpy`` is not seen by torch-function modes: its tensors
count as device tensors (make host tensors with ``torch.as_tensor`` / ``torch.tensor``).

    with OpCounter() as c:
        model(**batch)
    c.total, c.counts   # Counter({'mm': 120, 'add': 64, 'mul': 60, ...}), keyed by aten op name

**Uploads.** ``.uploads`` (every counter) counts host data copied to the device: ``.to(device)`` / ``.cuda()`` of a
host tensor, ``torch.tensor`` / ``as_tensor`` / ``asarray`` of host data with a ``device=``, and ``x[index tensor] =
scalar`` (index_put_ copies the Python scalar from a host tensor; ``index_fill_`` / ``masked_fill`` / ``torch.where``
take it as a kernel argument: ``setitem_scalar``). Not a sync on a
GPU (a small pageable copy), but a CUDA graph cannot record one: the fast path's captured functions make none
(llava/fast/graphs.py).

Both in one pass: ``SyncCounter(ops=True)`` (or ``OpCounter(syncs=True)``) fills ``.syncs`` and ``.ops``
(Counters; ``.counts`` is the class's own one) and ``.sync_total`` / ``.op_total``.
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
_ISIN = {aten.isin.Tensor_Tensor, aten.isin.Tensor_Scalar, aten.isin.Scalar_Tensor}  # CUDA: unique past a size
_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_FACTORIES = {"arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "randperm", "linspace", "eye",
              "rand", "randn", "randint", "logspace", "empty_strided", "scalar_tensor", "asarray"}
_FROM_DATA = {"tensor", "as_tensor", "asarray"}  # factories of host data: with device=, an upload
_TO_HOST = {"tolist": "tolist", "numpy": "numpy", "__array__": "numpy", "cpu": "to_host"}
# ops that launch nothing beyond the views (``OpOverload.is_view``): in-place views, views without alias
# annotation, allocations and metadata queries (op packet names)
_NO_LAUNCH = {"_unsafe_view", "unsqueeze_", "squeeze_", "transpose_", "t_", "as_strided_", "detach_", "swapdims_",
              "swapaxes_", "resize_", "resize_as_", "set_", "empty", "empty_like", "empty_strided", "new_empty",
              "new_empty_strided", "empty_permuted", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "is_same_size", "_has_compatible_shallow_copy_type", "is_nonzero", "_nested_tensor_size",
              "lift_fresh", "_reshape_alias", "alias"}


def _tensors(args, kwargs):
    return [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


def _bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _copied(out, x: torch.Tensor) -> bool:
    """Whether an op that may return an alias of ``x`` made a new tensor instead (a copy kernel)."""
    if not isinstance(out, torch.Tensor) or not out.numel() or x.device.type == "meta":
        return False
    return out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def launches(func) -> bool:
    """Whether an aten op overload would launch work on a GPU (not a view, metadata or allocation)."""
    return not func.is_view and func._overloadpacket.__name__ not in _NO_LAUNCH


def _sync_key(func, args, kwargs) -> str | None:
    if func in _SCALAR:
        return "item"
    if func in _NONZERO:
        return "nonzero"
    if func in _MASKED:
        return "masked_select"
    if func in _UNIQUE:
        return "unique"
    if func in _ISIN:
        return "isin"
    if func in _REPEAT and kwargs.get("output_size") is None and not (len(args) > 3 and args[3] is not None):
        return "repeat_interleave"
    if func in _INDEX and _bool_index(args[1]):
        return "bool_index"
    if func is aten._to_copy.default and kwargs.get("device") is not None \
            and torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu":
        return "to_host"
    return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "_Counting"):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        if c.host_depth:
            return func(*args, **kwargs)
        ins = _tensors(args, kwargs)
        device = not ins or not all(c.is_host(t) for t in ins)
        if c.count_syncs and ins and device:
            key = _sync_key(func, args, kwargs)
            if key is not None:
                c.syncs[key] += 1
        out = func(*args, **kwargs)
        if c.count_ops and device:
            if launches(func):
                c.ops[func._overloadpacket.__name__] += 1
            elif func.is_view and ins and _copied(out, ins[0]):  # e.g. to / reshape / contiguous under inference_mode
                c.ops["_to_copy" if func._overloadpacket is aten.to else "clone"] += 1
        return out


class _Function(TorchFunctionMode):
    def __init__(self, counter: "_Counting"):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        name = getattr(func, "__name__", "")
        ins = _tensors(args, kwargs)
        if name in _TO_HOST and ins:
            if not c.is_host(ins[0]) and ins[0].device.type == "cpu":
                # a real device tensor's copy is seen by _Dispatch; a CPU one's .cpu() dispatches nothing
                if c.count_syncs:
                    c.syncs[_TO_HOST[name]] += 1
                if c.count_ops:
                    c.ops["_to_copy"] += 1
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                out = out.view_as(out) if out is ins[0] else out
                c.mark(out)
            return out
        if name == "__setitem__" and len(args) == 3 and isinstance(args[2], (bool, int, float)) and ins \
                and not c.is_host(ins[0]) and any(isinstance(i, torch.Tensor) for i in tree_leaves(args[1])):
            c.uploads["setitem_scalar"] += 1  # x[index tensor] = 0: index_put_ of the scalar as a host tensor
        to_device = False
        if name in ("to", "cuda") and ins:
            dev = kwargs.get("device", args[1] if len(args) > 1 else None)
            to_device = name == "cuda" or isinstance(dev, torch.device) or (isinstance(dev, str) and dev != "cpu")
            if to_device and c.is_host(ins[0]):
                c.uploads[name] += 1
        if ins:
            host = not to_device and all(c.is_host(t) for t in ins)
            if name in _FROM_DATA and kwargs.get("device") is not None and c.is_host(ins[0]):
                c.uploads[name] += 1  # a host tensor made a device one (a device tensor's as_tensor is itself)
        else:  # a factory: host unless a device is named
            host = name in _FACTORIES and kwargs.get("device") is None
            if name in _FROM_DATA and not host:  # host data copied to the device
                c.uploads[name] += 1
        c.host_depth += host  # everything dispatched inside a host call is host work (intermediates too)
        try:
            out = func(*args, **kwargs)
        finally:
            c.host_depth -= host
        if to_device:
            if out is ins[0]:
                out = out.view_as(out)  # a distinct (device) alias of the host tensor
            return out
        if host:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    c.mark(t)
        return out


class _Counting:
    """The shared machinery: host tracking and the two counters (``syncs``, ``ops``)."""

    def __init__(self, syncs: bool, ops: bool):
        self.count_syncs, self.count_ops = syncs, ops
        self.syncs: Counter = Counter()
        self.ops: Counter = Counter()
        self.uploads: Counter = Counter()  # host data copied to the device (a CUDA-graph capture cannot hold one)
        self.host_depth = 0
        self._host = WeakIdKeyDictionary()
        self._modes = [_Function(self), _Dispatch(self)]

    def is_host(self, t: torch.Tensor) -> bool:
        return t in self._host

    def mark(self, t: torch.Tensor) -> None:
        self._host[t] = True

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)

    @property
    def sync_total(self) -> int:
        return sum(self.syncs.values())

    @property
    def op_total(self) -> int:
        return sum(self.ops.values())


class SyncCounter(_Counting):
    """Context manager counting host-synchronising ops on device tensors (see the module docstring).
    ``ops=True`` also counts the launching ops (``.ops``, ``.op_total``) in the same pass."""

    def __init__(self, ops: bool = False):
        super().__init__(syncs=True, ops=ops)

    @property
    def counts(self) -> Counter:
        return self.syncs

    @property
    def total(self) -> int:
        return self.sync_total


class OpCounter(_Counting):
    """Context manager counting the aten ops on device tensors that would launch a GPU kernel or memcpy
    (see the module docstring), keyed by op name. ``syncs=True`` also counts host syncs (``.syncs``)."""

    def __init__(self, syncs: bool = False):
        super().__init__(syncs=syncs, ops=True)

    @property
    def counts(self) -> Counter:
        return self.ops

    @property
    def total(self) -> int:
        return self.op_total
