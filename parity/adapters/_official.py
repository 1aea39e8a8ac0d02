"""Shared pieces of the adapters' official halves: an official function compiled again from its own source (the
clone's) with a few literals replaced - the smallest shim that bridges an official code to the tiny weights or to a
CPU (a hard-coded image start, a grid width, a ``.cuda()`` call) without copying it.

Standard library only (the official workers load the adapters as the package ``parity_official_adapters`` with
nothing of this repository importable; an adapter imports this module inside its functions: ``from . import
_official``)."""

from __future__ import annotations

import inspect
import re
import sys


def rewrite(source: str, pattern: str, replacement: str, count: int = 1, literal: bool = False) -> str:
    """``source`` with the ``count`` occurrences of ``pattern`` replaced: a regular expression, or with ``literal`` a
    plain string. Refused unless it occurs exactly ``count`` times, so that a change to the official line is never
    passed over."""
    found = source.count(pattern) if literal else len(re.findall(pattern, source))
    if found != count:
        raise RuntimeError(f"parity adapter: expected {'one' if count == 1 else count} of {pattern!r} in the official "
                           f"source, found {found}")
    return source.replace(pattern, replacement) if literal else re.sub(pattern, replacement, source)


def source_of(fn) -> str:
    """``fn``'s source with its own indentation removed: the margin of its ``def`` line (not ``textwrap.dedent``'s
    common margin, which a commented-out line at column 0 inside an official method would make zero)."""
    lines = inspect.getsource(fn).splitlines(keepends=True)
    cut = len(lines[0]) - len(lines[0].lstrip())
    return "".join(line[cut:] if not line[:cut].strip() else line for line in lines)


def recompile(fn, edits, literal: bool = False, owner: type | None = None):
    """``fn`` compiled again from its own source file with the ``edits`` applied, each ``(pattern, replacement)`` or
    ``(pattern, replacement, count)`` (:func:`rewrite`), in the globals of its module; returns the new function (its
    decorators are not applied again). ``owner``: the class ``fn`` is a method of, for a zero-argument ``super()``,
    which has no ``__class__`` cell outside its class (the same call, the class named)."""
    src = source_of(fn)
    for edit in edits:
        pattern, replacement, count = (*edit, 1) if len(edit) == 2 else edit
        src = rewrite(src, pattern, replacement, count, literal)
    if owner is not None:
        src = src.replace("super().", f"super({owner.__name__}, self).")
    scope: dict = {}
    exec(compile(src, inspect.getsourcefile(fn), "exec"), sys.modules[fn.__module__].__dict__, scope)
    return scope[fn.__name__]


def install(cls, name: str, edits, literal: bool = False):
    """``cls.<name>`` replaced by :func:`recompile` of the official one, which is kept aside (``_parity_official_<name>``)
    so that every call starts from the official source (a worker runs ``before_load`` once per method of a job)."""
    key = f"_parity_official_{name}"
    fn = cls.__dict__.get(key, cls.__dict__[name])
    setattr(cls, key, fn)
    new = recompile(fn, edits, literal, owner=cls)
    setattr(cls, name, new)
    return new


class CPUEvent:
    """``torch.cuda.Event(enable_timing=True)`` on a CPU run: an official forward's own timing, a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def elapsed_time(self, other):
        return 0.0


def cpu_cuda_timing(memory: bool = False) -> None:
    """Where CUDA is absent: an official code's timing calls (``torch.cuda.Event``, ``torch.cuda.synchronize``; with
    ``memory`` also ``reset_peak_memory_stats`` / ``max_memory_allocated``) become CPU no-ops in the official process
    (several LLaVA forks' ``generate`` / ``forward`` time themselves). Nothing where CUDA is present."""
    import torch

    if torch.cuda.is_available():
        return
    torch.cuda.Event = CPUEvent
    torch.cuda.synchronize = lambda *args, **kwargs: None
    if memory:
        torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
        torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0


def stage_hooks(layers, stage_layers, image_of, positions, entry, store: list):
    """What an official in-LLM code keeps at each stage, read where it gathers the kept rows' original positions
    with them (V2Drop and CLSE: LLaVA's ``position_ids``, Qwen's ``cache_position``): pre-hooks on the decoder layers
    a stage prunes before, each recording once (the prefill; a one-token step is skipped) the image rows entering the
    layer as indices into the previous stage's rows. ``image_of()`` -> (start, count) of the prompt's image;
    ``positions(kwargs)`` -> the (S,) positions the layer receives; ``entry(layer, kept, n)`` -> the item stored
    (``n``: the previous stage's row count). Returns (removable handles, the per-layer record, which a caller clears
    to record again)."""
    import torch

    seen: dict = {}

    def hook_for(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == 1 or layer in seen:
                return
            start, n = image_of()
            pos = positions(kwargs)
            vis = pos[(pos >= start) & (pos < start + n)] - start
            prev = seen.get(max([k for k in seen if k < layer], default=-1), torch.arange(n))
            seen[layer] = vis
            store.append(entry(layer, torch.searchsorted(prev, vis).cpu(), int(prev.numel())))
        return hook

    class Handle:
        def __init__(self, h):
            self.h = h

        def remove(self):
            self.h.remove()
            seen.clear()

    return [Handle(layers[k].register_forward_pre_hook(hook_for(k), with_kwargs=True)) for k in stage_layers], seen
