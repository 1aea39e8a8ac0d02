"""A device-placement checker that runs on a CPU: it finds the code that would mix host and GPU
tensors on CUDA ("Expected all tensors to be on the same device") without a GPU.

Under :class:`DevicePlacementCheck` (a ``TorchFunctionMode``) every tensor is in one of two places:

* **device** - descended from the model's inputs or parameters (every tensor created outside the
  check counts as one), or created with an explicit device taken from one (``device=x.device``,
  ``x.new_zeros(...)``, ``torch.zeros_like(x)``, ``t.to(x.device)``);
* **host** - created by a factory (``arange``, ``zeros``, ``full``, ``tensor``, ``randperm`` ...)
  without a ``device`` (*host-born*: on CUDA it would live on the CPU), or moved there explicitly
  (``.cpu()``, ``.to("cpu")``, ``device="cpu"``), and everything computed from host tensors only.

To tell ``device=x.device`` from ``device="cpu"`` on a machine where both are the CPU, a device
tensor reports a fake accelerator as its device inside the check, ``vtfake:0`` (torch's PrivateUse1
backend under another name, with the few hooks autocast asks for), and ``is_cpu`` False; a host
tensor reports ``cpu``. A factory or ``.to()`` given the fake device makes a device tensor (really on
the CPU), ``cpu`` a host one; code that branches on ``device.type == "cpu"`` (e.g. to skip a copy)
takes its accelerator path. That is the "fake second device"; it is never seen outside the check.
(If PrivateUse1 is already taken in the process, device tensors report ``cpu:0`` instead.)

Any op whose tensor arguments include a host tensor of dim >= 1 and a device tensor is a violation
(0-d host tensors are exempt: CUDA accepts CPU scalars in device ops). This is stricter than CUDA
in two places: ``device_tensor[host_index]`` works on CUDA (through a hidden, blocking
host-to-device copy), and ``host[...] = device_values`` copies across devices; both are flagged,
because the code that does them leaves a tensor on the wrong side. ``dst.copy_(src)`` and ``.to()``
are explicit transfers and allowed.

Limits: a tensor made outside the check (a module-level constant, a tensor a method cached in
``setup()``) counts as a device tensor; a tensor inside a ``slice`` is not seen. The fake accelerator
is registered once per process (PrivateUse1 renamed) and reports itself available only while a check
runs.

Use::

    with DevicePlacementCheck():            # raises DeviceMixError at the first violation
        method.select_vision(signals)

    with DevicePlacementCheck(collect=True) as chk:   # records them all and carries on
        model.generate(**inputs)
    chk.violations   # ['torch.isin at consensusdrop/consensusdrop.py:222 (in _select): ...']

:func:`check_method` wraps a method instance's ``select_vision`` / ``select_llm`` so that each call
runs under the check (callables carried by the signals, the engine's lazy probes, run outside it)
and its returned :class:`~llava.selection.Selection` holds no host-born tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

_TAG = "_placement_host"  # attribute on host tensors: (kind, origin); kind "born" or "host"
_HOST = torch.device("cpu")
_FAKE_NAME = "vtfake"
_FAKE: torch.device | None = None  # set by the first check
_ACTIVE = 0  # checks entered and not yet left


def _fake_device() -> torch.device:
    """How a device tensor reports its device inside the check (registered on first use)."""
    name = torch._C._get_privateuse1_backend_name()
    if name in ("privateuse1", "privateuseone"):  # not renamed yet
        torch.utils.rename_privateuse1_backend(_FAKE_NAME)
        # what torch.autocast(device_type=...) and torch.manual_seed look up; "available" only while a
        # check runs, so that nothing else in the process picks the fake accelerator
        mod = types.ModuleType(_FAKE_NAME)
        mod.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16, torch.float32]
        mod.is_available = lambda: _ACTIVE > 0
        mod.device_count = lambda: int(_ACTIVE > 0)
        mod.current_device = lambda: 0
        mod.is_initialized = lambda: True
        mod._is_in_bad_fork = lambda: False
        mod.manual_seed = mod.manual_seed_all = lambda seed: None
        torch._register_device_module(_FAKE_NAME, mod)
        name = _FAKE_NAME
    return torch.device(name, 0) if name == _FAKE_NAME else torch.device("cpu", 0)


_FACTORIES = {getattr(torch, n) for n in (
    "arange", "range", "zeros", "ones", "full", "empty", "empty_strided", "eye", "linspace", "logspace",
    "rand", "randn", "randint", "randperm", "normal", "scalar_tensor", "tril_indices", "triu_indices",
    "from_numpy", "frombuffer", "bartlett_window", "hann_window", "hamming_window", "blackman_window",
    "kaiser_window") if hasattr(torch, n)}
_DATA_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}  # follow a tensor argument
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}
_DEVICE_GETTER = torch._C.TensorBase.device
_IS_CPU_GETTER = torch._C.TensorBase.is_cpu
_NO_MIX_CHECK = {torch.Tensor.copy_}

_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(contextlib.__file__))
_THIS = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_THIS)))  # the repository


class DeviceMixError(RuntimeError):
    pass


def _site() -> str:
    """The innermost Python frame outside torch and this checker, 'path:line (in func)', followed
    by the innermost frame of this repository when that one is elsewhere (e.g. in transformers)."""
    f = sys._getframe(1)
    first = None
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if fn != _THIS and not fn.startswith(_SKIP_DIRS):
            here = fn.startswith(_ROOT + os.sep)
            text = f"{os.path.relpath(fn, _ROOT) if here else fn}:{f.f_lineno} (in {f.f_code.co_name})"
            if first is None:
                first = text
                if here:
                    return first
            elif here:
                return f"{first} via {text}"
        f = f.f_back
    return first or "<unknown>"


import transformers as _tf  # noqa: E402

_STOCK_DIR = os.path.dirname(os.path.abspath(_tf.__file__))
_TORCH_DIR = os.path.dirname(torch.__file__)


def _born_in_stock_code() -> bool:
    """True when the innermost frame outside torch and this checker is transformers' own code (e.g.
    Qwen2.5-VL's vision tower builds its window index on the host and indexes device tensors with it,
    which CUDA allows): the unpruned model does the same, so it is not ours to flag."""
    f = sys._getframe(1)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if fn != _THIS and not fn.startswith(_TORCH_DIR) and not fn.endswith("contextlib.py"):
            return fn.startswith(_STOCK_DIR)
        f = f.f_back
    return False


def _name(func) -> str:
    q = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if getattr(func, "__name__", "") == "__get__":
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    mod = getattr(func, "__module__", None)
    if q.startswith("_VariableFunctionsClass."):
        return "torch." + q.split(".", 1)[1]
    if q.startswith(("TensorBase.", "_TensorBase.")):
        return "Tensor." + q.split(".", 1)[1]
    return f"torch.{q}" if mod in (None, "torch", "torch._C._VariableFunctions") else q


def host_tag(t: torch.Tensor):
    """(kind, origin) for a host tensor, None for a device tensor."""
    return getattr(t, _TAG, None)


def _is_device_spec(d) -> bool | None:
    """True: the (fake or real) accelerator; False: the host; None: not a device spec."""
    if isinstance(d, torch.Tensor):
        return host_tag(d) is None
    if isinstance(d, int) and not isinstance(d, bool):
        return True  # .to(0) / .cuda(0): a CUDA ordinal
    if isinstance(d, (str, torch.device)):
        d = torch.device(d)
        return d.type != "cpu" or (d.index is not None and _FAKE.type == "cpu")
    return None


class DevicePlacementCheck(TorchFunctionMode):
    """See the module docstring. ``collect=True`` records violations (deduplicated by op and site)
    in :attr:`violations` instead of raising."""

    def __init__(self, collect: bool = False):
        super().__init__()
        self.collect = collect
        self.violations: list[str] = []
        self._seen: set[tuple[str, str]] = set()
        self._suspended = 0
        global _FAKE
        if _FAKE is None:
            _FAKE = _fake_device()

    @contextlib.contextmanager
    def suspended(self):
        """Run a block unchecked (its results are device tensors): e.g. the engine's own probes
        called from inside a method."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def __enter__(self):
        global _ACTIVE
        _ACTIVE += 1
        return super().__enter__()

    def __exit__(self, *exc):
        global _ACTIVE
        _ACTIVE -= 1
        return super().__exit__(*exc)

    def _violation(self, name: str, msg: str, site: str | None = None) -> None:
        site = site or _site()
        text = f"{name} at {site}: {msg}"
        if not self.collect:
            raise DeviceMixError(text)
        if (name, site) not in self._seen:
            self._seen.add((name, site))
            self.violations.append(text)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._suspended:
            return func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__get__" and getattr(func, "__self__", None) in (_DEVICE_GETTER,
                                                                                                _IS_CPU_GETTER):
            real = func(*args)
            if func.__self__ is _IS_CPU_GETTER:
                return real and host_tag(args[0]) is not None
            if real.type == "cpu":
                return _HOST if host_tag(args[0]) is not None else _FAKE
            return real
        # where the result lives: None = decide from the inputs
        target: Any = None  # False: device; (kind, origin): host
        if "device" in kwargs and kwargs["device"] is not None:
            on_dev = _is_device_spec(kwargs["device"])
            kwargs = {**kwargs, "device": _real(kwargs["device"])}
            target = False if on_dev else ("host", f"{_name(func)}(device='cpu') at {_site()}")
        elif func in _FACTORIES or (func in _DATA_FACTORIES
                                    and not isinstance(args[0] if args else kwargs.get("data"), torch.Tensor)):
            target = ("stock" if _born_in_stock_code() else "born", f"{_name(func)} without device= at {_site()}")
        elif func in _MOVES:
            if func is torch.Tensor.cpu:
                target = ("host", f".cpu() at {_site()}")
            elif func is torch.Tensor.cuda:
                target = False
            else:
                spec = next((a for a in args[1:] if not isinstance(a, bool) and _is_device_spec(a) is not None), None)
                if spec is not None:
                    target = False if _is_device_spec(spec) else ("host", f".to(cpu) at {_site()}")
                    if isinstance(spec, torch.Tensor):
                        target = host_tag(spec) or False
                    args = tuple(_real(a) if a is spec and not isinstance(a, torch.Tensor) else a for a in args)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        mixed = False
        if target is None or func in _MOVES:
            host = [t for t in tensors if host_tag(t) is not None]
            dev = [t for t in tensors if host_tag(t) is None]
            if func not in _MOVES:
                if host and dev:
                    big = [t for t in host if t.dim() > 0 and host_tag(t)[0] != "stock"]
                    if big and func not in _NO_MIX_CHECK:
                        mixed = True
                        t = big[0]
                        self._violation(_name(func), f"host tensor {tuple(t.shape)} {t.dtype} ({host_tag(t)[1]}) "
                                        f"mixed with device tensor(s) {[tuple(d.shape) for d in dev[:3]]}")
                    target = False
                elif host and not dev:
                    kinds = [host_tag(t) for t in host]
                    target = next((k for k in kinds if k[0] == "born"), kinds[0])
                else:
                    target = False
            elif target is None:  # .to(dtype) etc.: stays where it is
                target = host_tag(tensors[0]) if tensors else False
        out = func(*args, **kwargs)
        if mixed:
            target = False  # report each mix once, not everything downstream of it
        inputs = {id(t) for t in tensors}
        retag = func in _MOVES or func in _DATA_FACTORIES or "device" in kwargs

        def tag(o):
            if not isinstance(o, torch.Tensor):
                return o
            if id(o) in inputs:  # an input returned as is (in-place op, no-op .to / .contiguous ...)
                if not retag or (host_tag(o) or False) == target:
                    return o
                o = o.view(o.shape)  # a moved alias: the original keeps its place
            if target:
                setattr(o, _TAG, target)
            elif host_tag(o) is not None:
                delattr(o, _TAG)
            return o

        if isinstance(out, torch.Tensor):
            return tag(out)
        if isinstance(out, (list, tuple)) and not isinstance(out, torch.Size):
            return tree_map(tag, out)
        return out


def _real(d):
    """The device to really use (the fake device is the CPU)."""
    if isinstance(d, (str, torch.device)):
        d = torch.device(d)
        return _HOST if d.type in ("cpu", _FAKE.type) else d
    return d


# ------------------------------------------------------------------------------------------------
# Around a method's calls
# ------------------------------------------------------------------------------------------------


def _selection_tensors(sel) -> dict[str, torch.Tensor]:
    return {f: getattr(sel, f) for f in ("keep", "targets", "assign", "order")
            if isinstance(getattr(sel, f, None), torch.Tensor)}


def _prepare_signals(chk: DevicePlacementCheck, sig) -> None:
    """Run the callables a signals object carries (the engine's lazy probes: attention rows, keys,
    norms) outside the check: they are the engine's code, checked by the whole-prefill test. A tensor
    field named ``*_host`` is the engine's host copy of a signal: it counts as a host tensor."""
    seen = set()
    stack = [sig]
    while stack:
        s = stack.pop()
        if s is None or id(s) in seen or not dataclasses.is_dataclass(s):
            continue
        seen.add(id(s))
        for f in dataclasses.fields(s):
            v = getattr(s, f.name)
            if dataclasses.is_dataclass(v):
                stack.append(v)
            elif isinstance(v, torch.Tensor) and f.name.endswith("_host") and host_tag(v) is None:
                shared = any(getattr(s, g.name) is v for g in dataclasses.fields(s) if g.name != f.name)
                if shared:  # on a CPU the engine's "copy" is the signal itself: tag an alias
                    v = v.view(v.shape)
                    setattr(s, f.name, v)
                setattr(v, _TAG, ("host", f"{type(s).__name__}.{f.name}, the engine's host copy"))
            elif callable(v) and not isinstance(v, torch.Tensor) and not getattr(v, "_placement_wrapped", False):
                setattr(s, f.name, _unchecked(chk, v))


def _unchecked(chk, fn):
    def call(*a, **k):
        with chk.suspended():
            return fn(*a, **k)
    call._placement_wrapped = True
    return call


def check_method(method, collect: bool = False) -> DevicePlacementCheck:
    """Wrap ``method``'s ``select_vision`` / ``select_llm`` / ``select_pixels`` (on the instance) so that every call runs
    under one :class:`DevicePlacementCheck` and its Selection holds no host-born tensor. Returns the
    check (its ``violations`` with ``collect=True``; ``calls`` counts the checked calls)."""
    chk = DevicePlacementCheck(collect=collect)
    chk.calls = {"vision": 0, "llm": 0, "pixels": 0}

    def run(stage, fn, sig, *a):
        _prepare_signals(chk, sig)
        chk.calls[stage] += 1
        with chk:
            sel = fn(*a, sig)
            for f, t in _selection_tensors(sel).items():
                tg = host_tag(t)
                if tg is not None and tg[0] == "born":
                    chk._violation(f"{type(method).__name__}.select_{stage}",
                                   f"returns Selection.{f} created on the host ({tg[1]}); "
                                   "create it on the signals' device", site=tg[1].rsplit(" at ", 1)[-1])
        return sel

    sv, sl, sp = method.select_vision, method.select_llm, method.select_pixels
    method.select_vision = lambda sig: run("vision", sv, sig)
    method.select_llm = lambda stage, sig: run("llm", sl, sig, stage)
    method.select_pixels = lambda sig: run("pixels", sp, sig)
    return chk
