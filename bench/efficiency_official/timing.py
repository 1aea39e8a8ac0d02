"""bench.efficiency_official's timer (warm-up, then synchronised calls; peak CUDA memory over what was
allocated before), an out-of-memory guard, and the two switches to the official way: eager attention
with the probabilities captured (a decoder layer, the vision tower)."""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from bench.efficiency.timing import summary


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, n: int, warmup: int, device: torch.device) -> dict:
    """``warmup`` untimed calls, then ``n`` synchronised calls; seconds. Adds peak memory (CUDA)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        res = {"time_s": summary(times)}
        if device.type == "cuda":
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            res.update(peak_bytes=int(peak), peak_extra_bytes=int(peak - base))
        else:
            res.update(peak_bytes=None, peak_extra_bytes=None)
    return res


def guarded(fn, *args, **kwargs) -> dict:
    """A measurement, or a record of running out of device memory (the run goes on)."""
    try:
        return fn(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True, "time_s": {}, "peak_bytes": None, "peak_extra_bytes": None}


@contextlib.contextmanager
def eager_llm_attention(layer: torch.nn.Module):
    """Layer ``layer``'s attention runs transformers' eager path (its own config copy), and its
    probabilities are captured the way ``output_attentions=True`` records them (a hook on the
    attention module's output)."""
    attn = layer.self_attn
    orig = attn.config
    cfg = copy.copy(orig)
    cfg._attn_implementation = "eager"
    captured = {}

    def hook(module, args, output):
        captured["weights"] = output[1]

    attn.config = cfg
    handle = attn.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
        attn.config = orig


@contextlib.contextmanager
def eager_tower(tower: torch.nn.Module):
    orig = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        yield
    finally:
        tower.set_attn_implementation(orig)
