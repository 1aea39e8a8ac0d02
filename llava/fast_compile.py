"""What keeps the fast path's compile cheap: regional compilation (each repeated layer class compiled once and
stamped out) and a compile cache in a folder of the user's (reused by later processes, other nodes, Slurm tasks).

A whole-prefill ``torch.compile`` traces and generates code for every decoder layer again, so the cold compile
grows with the model's depth (docs/results/2026-11-26-compile-depth-cpu.md: 4 -> 32 layers, 1.73x on the tiny
LLaVA). :func:`mark_regions` wraps the ``forward`` of every layer of the language model's decoder and of each
vision tower's encoder in ``torch.compiler.nested_compile_region``, one region per layer class: dynamo traces a
layer once and reuses its subgraph for the other layers of that class whose inputs match (shape, dtype, guards;
a layer that differs, e.g. a hybrid decoder's other layer type, gets its own entry). Outside a compile the
wrapper is a plain call, so the eager engine and the uncompiled backends run exactly as before.

Used by :class:`llava.fastpath.FastPath` for the compiling backends (``inductor``, ``eager``, ``aot_eager``)
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

import os
import types

import torch

__all__ = ["REGIONAL_BACKENDS", "mark_regions", "region_count", "layer_lists", "cache_key", "use_cache_dir"]

#: the fast path's backends that trace with dynamo (the others: "cudagraphs" records the uncompiled function,
#: "none" runs it as it is)
REGIONAL_BACKENDS = ("inductor", "eager", "aot_eager")
#: per layer class, its one region (shared by every model of the process: the same code, compiled once)
_REGIONS: dict[type, object] = {}
#: distinct guard sets one region may hold: a model's layers of one class share one entry; a hybrid decoder's
#: layer types, prefill vs decode shapes and the buckets each take their own
_REUSE_ENTRIES = 64


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


def mark_regions(lists) -> int:
    """Wrap every layer's ``forward`` in its class's nested compile region (idempotent). Returns the layers
    marked now."""
    n = 0
    for layers in lists:
        for layer in layers:
            if getattr(layer, "_vtprune_region", False):
                continue
            cls = type(layer)
            if cls not in _REGIONS:
                _REGIONS[cls] = torch.compiler.nested_compile_region(cls.forward, max_reuse_entries=_REUSE_ENTRIES)
            layer.forward = types.MethodType(_REGIONS[cls], layer)
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
