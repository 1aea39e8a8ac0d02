"""What keeps the fast path's compile cheap: regional compilation (each repeated layer class compiled once and
stamped out) and a compile cache in a folder of the user's (reused by later processes, other nodes, Slurm tasks).

A whole-prefill ``torch.compile`` traces and generates code for every decoder layer again, so the cold compile
grows with the model's depth (docs/results/2026-11-26-compile-depth-cpu.md: 4 -> 32 layers, 1.73x on the tiny
LLaVA). :func:`mark_regions` runs every layer of the language model's decoder and of each vision tower's encoder
through ``torch.compiler.nested_compile_region``, one region per layer class: dynamo traces a layer once and
stamps its subgraph out for the other layers of that class whose inputs match (shapes, dtypes, guards; a layer
that differs gets its own entry). A region is reused only when its inputs are tensors, constants or modules, and
a decoder layer's ``past_key_values`` is a cache object: the fast path's static cache gets one :class:`CacheSlot`
module per layer (:func:`add_cache_slots`), and a marked decoder layer hands its region its own slot. Outside a
compile the region is a plain call, and a marked layer given any other cache (the eager engine's) runs its
class's forward: the eager engine and the uncompiled backends run exactly as before.

Used by :class:`llava.fast.path.FastPath` for the compiling backends (``inductor``, ``eager``, ``aot_eager``)
unless ``load(..., fast_regional=False)``; :func:`region_count` says how many layers a model has marked.

The compile cache: Inductor keeps the code it generates (and AOTAutograd its graphs) in ``TORCHINDUCTOR_CACHE_DIR``,
by default a folder under the machine's temporary directory, which a cluster's node often wipes between jobs.
``load(..., fast_cache=DIR)`` or the variable ``VTPRUNE_COMPILE_CACHE=DIR`` points it at ``DIR/<key>``
(:func:`use_cache_dir`), where the key names the torch version, its CUDA and Triton builds: a second process, or a
Slurm task on another node, compiles from that cache instead of from scratch. Within a key, each entry is keyed by
Inductor on the traced graph itself (the ops, shapes, dtypes and devices: the model's architecture, the method,
the bucket) and its configuration, never on the weights' values, which are inputs: a changed model, dtype or
method traces another graph and misses; the same architecture with other weights reuses the code, correctly.
"""

from __future__ import annotations

import inspect
import os
import types

import torch

__all__ = ["REGIONAL_BACKENDS", "CacheSlot", "add_cache_slots", "mark_regions", "region_count", "layer_lists",
           "cache_key", "use_cache_dir"]

#: the fast path's backends that trace with dynamo (the others: "cudagraphs" records the uncompiled function,
#: "none" runs it as it is)
REGIONAL_BACKENDS = ("inductor", "eager", "aot_eager")
#: per layer class, its one region (shared by every model of the process: the same code, compiled once)
_REGIONS: dict[type, object] = {}
#: distinct guard sets one region may hold: a model's layers of one class share one entry; a hybrid decoder's
#: layer types, prefill vs decode shapes and the buckets each take their own
_REUSE_ENTRIES = 64
_REGION_ARGS = inspect.signature(torch.compiler.nested_compile_region).parameters


def layer_lists(lm, towers) -> list[torch.nn.ModuleList]:
    """The stacks of repeated layers: the decoder's ``layers`` and, per vision tower, its longest ModuleList of
    one module class (CLIP's ``encoder.layers``, the Qwen towers' ``blocks``, InternViT's ``encoder.layer``)."""
    out = [lm.layers]
    for tower in towers:
        best = None
        for mod in tower.modules():
            if isinstance(mod, torch.nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
                if best is None or len(mod) > len(best):
                    best = mod
        if best is not None and all(best is not o for o in out):
            out.append(best)
    return out


class CacheSlot(torch.nn.Module):
    """One layer of a :class:`~transformers.StaticCache` handed to a decoder layer's region as its
    ``past_key_values``. A region is reused only for inputs it can compare (tensors, constants, modules): the cache
    object is none of these, so every decoder layer would be traced again. The slot is a module whose buffers are
    the cache layer's own tensors (not copies: the decode and the eager code read the same), and whose ``update``
    is the static layer's: the new keys and values written in place at the layer's current length, which then
    grows by their count. The next layer's call maps onto that layer's slot (its buffers, by module source)."""

    def __init__(self, layer):
        super().__init__()
        self.register_buffer("keys", layer.keys, persistent=False)
        self.register_buffer("values", layer.values, persistent=False)
        self.register_buffer("cumulative_length", layer.cumulative_length, persistent=False)

    def update(self, key_states, value_states, *args, **kwargs):
        at = torch.arange(key_states.shape[-2], device=key_states.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[-2])
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        return self.keys, self.values


def add_cache_slots(cache) -> None:
    """Give a static cache its slots (:class:`CacheSlot`, one per layer; a hybrid decoder's linear-attention layers
    none: those decoders are not marked)."""
    cache._vtprune_slots = [CacheSlot(layer) if hasattr(layer, "keys") else None for layer in cache.layers]


def _region(cls):
    """The one nested compile region of a layer class: its ``forward``, as the class defines it."""
    if cls not in _REGIONS:
        def call(layer, *args, **kwargs):
            return cls.forward(layer, *args, **kwargs)

        call.__name__ = call.__qualname__ = f"region_{cls.__name__}"
        # torch < 2.13 (the device image's 2.11) has no max_reuse_entries: its regions reuse without that bound
        kw = {"max_reuse_entries": _REUSE_ENTRIES} if "max_reuse_entries" in _REGION_ARGS else {}
        _REGIONS[cls] = torch.compiler.nested_compile_region(call, **kw)
    return _REGIONS[cls]


def _decoder_forward(self, *args, past_key_values=None, **kwargs):
    """A marked decoder layer: with a static cache that has slots, the region on this layer's slot; with any other
    cache (the eager engine's), the class's forward as it is."""
    slots = getattr(past_key_values, "_vtprune_slots", None)
    if slots is None:
        return type(self).forward(self, *args, past_key_values=past_key_values, **kwargs)
    at = getattr(getattr(self, "self_attn", None), "layer_idx", None)  # the cache layer the stock forward updates
    return _REGIONS[type(self)](self, *args, past_key_values=slots[self._vtprune_slot if at is None else at], **kwargs)


def _encoder_forward(self, *args, **kwargs):
    return _REGIONS[type(self)](self, *args, **kwargs)


def mark_regions(lists, decoder: bool = True) -> int:
    """Run every layer of ``lists`` through its class's nested compile region (idempotent). The first list is the
    decoder's (``decoder=False``: left as it is, e.g. a hybrid decoder whose linear-attention layers keep other
    states in the cache), its layer ``i`` on the cache's slot ``i``. Returns the layers marked now."""
    n = 0
    for at, layers in enumerate(lists):
        if at == 0 and not decoder:
            continue
        for i, layer in enumerate(layers):
            if at == 0:  # its cache slot (again on a marked layer: the list may have changed, e.g. a copied layer)
                layer._vtprune_slot = i
            if getattr(layer, "_vtprune_region", False):
                continue
            _region(type(layer))  # made here, outside any trace (dynamo reads the table, never writes it)
            layer.forward = types.MethodType(_decoder_forward if at == 0 else _encoder_forward, layer)
            layer._vtprune_region = True
            n += 1
    return n


def region_count(model) -> int:
    """Layers of ``model`` that run as a nested compile region."""
    return sum(bool(getattr(m, "_vtprune_region", False)) for m in model.modules())


def cache_key() -> str:
    """The compile cache's subfolder: torch's version, its CUDA build (or cpu) and Triton's version, the parts
    that change every generated file while the graphs stay the same."""
    try:
        import triton

        tri = f"-triton{triton.__version__}"
    except ImportError:
        tri = ""
    cuda = f"cuda{torch.version.cuda}" if torch.version.cuda else "cpu"
    return f"torch{torch.__version__.split('+')[0]}-{cuda}{tri}"


def use_cache_dir(folder: str | os.PathLike | None = None) -> str | None:
    """Point Inductor's cache at ``folder/<cache_key()>`` (``folder``: the argument, else the variable
    ``VTPRUNE_COMPILE_CACHE``; neither: Inductor's own default, returns None). Process-wide, as Inductor's cache
    is; its in-memory caches are cleared when the folder changes. Returns the folder used."""
    folder = folder or os.environ.get("VTPRUNE_COMPILE_CACHE")
    if not folder:
        return None
    path = os.path.join(os.path.abspath(os.path.expanduser(str(folder))), cache_key())
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != path:
        os.makedirs(path, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        from torch._inductor.utils import clear_caches

        clear_caches()
    return path
