"""What the engine reads of a language model that tensor parallelism (DeepSpeed AutoTP, :mod:`llava.tp`) has sharded:
a projection's full output width gathered from the group's shards (:func:`full_width`, the LLM signals'
q / k projections), and whether modules hold a sharded linear (:func:`sharded_module`, for what refuses one).

Apart from :mod:`llava.tp`, which puts a loaded ``Runtime`` through DeepSpeed and so names :mod:`llava.models`: the
engine, the attention rows and the proxy gradient import only this file, which imports nothing of the runtime.
"""

from __future__ import annotations

import torch


def full_width(proj: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``proj(x)`` with all its output features: a column-parallel shard of AutoTP (``LinearLayer``: this
    rank's slice of the output features, ``_partition_sizes`` per rank of ``mp_group``) gathers the other
    ranks' slices in rank order (the unsharded layer's output, exactly); any other module is just called.
    Every rank of the group must call it (a collective)."""
    y = proj(x)
    sizes = getattr(proj, "_partition_sizes", None)
    group = getattr(proj, "mp_group", None)
    if group is None or not sizes or len(sizes) < 2 or y.shape[-1] == sum(sizes):
        return y
    import torch.distributed as dist

    width = max(sizes)
    y = y.contiguous()
    if y.shape[-1] < width:
        y = torch.nn.functional.pad(y, (0, width - y.shape[-1]))
    parts = [torch.empty_like(y) for _ in sizes]
    dist.all_gather(parts, y, group=group)
    return torch.cat([p[..., :s] for p, s in zip(parts, sizes)], dim=-1)


def sharded_module(modules) -> str | None:
    """The name of a tensor-parallel (AutoTP-sharded) linear among ``modules``' submodules, or None: DeepSpeed's
    replaced linears hold their ``mp_group``."""
    for m in modules:
        for name, sub in m.named_modules():
            sizes = getattr(sub, "_partition_sizes", None)
            if getattr(sub, "mp_group", None) is not None and (sizes is None or len(sizes) > 1):
                return f"{type(m).__name__}.{name}" if name else type(m).__name__
    return None
