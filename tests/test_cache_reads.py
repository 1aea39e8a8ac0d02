"""An llm stage's "prev" reads (the layer that has just run) take that layer's keys and values from its KV cache
(llava.attention_rows.cached_kv / CachedRows) and recompute only the queries: the keys and values equal a recompute
bit for bit on every tiny family (fp32 and bf16, the eager engine and the captured prefill), the answers equal a
prefill without a cache, and every cache that cannot stand in (none, sliding window, a cache longer than the
prompt, a layer without attention) gives None."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

from conftest import ALL_FAMILIES, make_batch
from llava import attention_rows
from llava.attention_rows import CachedRows, LayerQK, cached_kv
from llava.method import Method
from llava.models import load
from llava.selection import Selection


class _Reader(Method):
    """An llm stage at decoder layer 2 that reads layer 1's keys and values ("prev") and keeps every visual token
    but the last: it records what it read beside a recompute from the same rows."""

    name = "cache_reader"
    llm_reads = ("prev",)
    capturable = "full"
    seen: list = []

    @property
    def llm_layers(self):
        return (2,)

    def select_llm(self, stage, sig):
        if sig.hidden.device.type != "meta":  # the fast path's dry run of the counts reads no weights
            lm = self._lm
            ref = LayerQK(lm.layers[sig.layer - 1], sig.prev_hidden, lm.rotary_emb, sig.position_ids)
            self.seen.append((sig.keys("prev"), ref.keys().transpose(0, 1), sig.values("prev"),
                              ref.values().transpose(0, 1)))
        n = sig.num_visual
        return Selection(keep=torch.arange(n - 1, device=sig.hidden.device))


_READS: list = []  # a module's list: its appends inside a traced (captured) call are replayed after it


def _read(self, which):
    _READS.append(which)
    return _INNER(self, which)


_INNER = CachedRows.read


def _count_reads(monkeypatch) -> list:
    _READS.clear()
    monkeypatch.setattr(attention_rows.CachedRows, "read", _read)
    return _READS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_cached_keys_and_values_equal_a_recompute(family, dtype, monkeypatch):
    rt = load(f"tiny:{family}", seed=1, dtype=dtype)
    method = _Reader(budget=None)
    method.seen = []
    rt.prune(method)
    method._lm = rt.engine.lm
    reads = _count_reads(monkeypatch)
    batch = make_batch(rt)
    with torch.no_grad():
        cached = rt.model(**batch).logits
        recomputed = rt.model(**batch, use_cache=False).logits
    assert sorted(reads) == ["keys"] * 3 + ["values"] * 3  # per sample: read from the cache, not recomputed
    assert len(method.seen) == 6  # three samples with the cache, three without
    for k, k_ref, v, v_ref in method.seen:
        assert k.dtype == dtype and k.shape == k_ref.shape and torch.equal(k, k_ref)
        assert torch.equal(v, v_ref)
    assert torch.equal(cached[:, -1], recomputed[:, -1])


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_the_captured_prefill_reads_the_static_cache(family, monkeypatch):
    reads = _count_reads(monkeypatch)
    rt = load(f"tiny:{family}", seed=1, fast=True, fast_precompile=False)
    method = _Reader(budget=None)
    method.seen = []
    eng = rt.prune(method)
    method._lm = eng.lm
    with torch.no_grad():
        rt.model.generate(**make_batch(rt), max_new_tokens=2, do_sample=False)
    assert eng.stats.path == "fast", eng.stats.path_reason
    assert sorted(reads) == ["keys"] * 3 + ["values"] * 3
    assert len(method.seen) == 3
    for k, k_ref, v, v_ref in method.seen:  # the padded bucket's rows, pads included
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def _filled(layer_cls, length: int, heads=2, d=4):
    c = DynamicCache()
    c.layers = [layer_cls(sliding_window=8) if layer_cls is DynamicSlidingWindowLayer else layer_cls()]
    k = torch.arange(length * heads * d, dtype=torch.float32).view(1, heads, length, d)
    c.layers[0].update(k, k + 1)
    return c


class _Attn(torch.nn.Module):
    pass


class _Layer(torch.nn.Module):
    def __init__(self, attention: bool = True):
        super().__init__()
        if attention:
            self.self_attn = _Attn()


class _LM(torch.nn.Module):
    def __init__(self, attention: bool = True):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(attention)])


def test_which_caches_stand_in_for_a_recompute():
    lm = _LM()
    whole = _filled(DynamicLayer, 5)
    assert cached_kv(whole, lm, 0, 5) is whole.layers[0]
    rows = CachedRows(whole.layers[0], 0, torch.tensor([1, 3]))
    assert rows.read("keys")[:, :, 0].tolist() == [[4.0, 12.0], [24.0, 32.0]]  # head h, row r: (h * 5 + r) * 4
    assert rows.read("values")[0, 0, 0].item() == 5.0
    assert cached_kv(None, lm, 0, 5) is None  # use_cache=False
    assert cached_kv(whole, lm, 0, 4) is None  # the cache held a token before this prompt's rows
    assert cached_kv(whole, lm, 1, 5) is None  # no such layer
    assert cached_kv(whole, _LM(attention=False), 0, 5) is None  # a linear-attention layer
    assert cached_kv(_filled(DynamicSlidingWindowLayer, 5), lm, 0, 5) is None
    static = DynamicCache()
    static.layers = [StaticLayer(max_cache_len=16)]
    static.layers[0].lazy_initialization(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
    assert cached_kv(static, lm, 0, 5) is static.layers[0]  # a static cache: the first 5 of its 16 slots
    whole.offloading = True
    assert cached_kv(whole, lm, 0, 5) is None


def test_a_tensor_parallel_attention_recomputes(monkeypatch):
    """A rank's cache holds its own KV heads only: an attention sharded by AutoTP (a submodule with the ``mp_group``
    of more than one partition) is never read from the cache; the check runs only where a process group exists
    (without one nothing can be sharded), so a single-process prefill pays no module walk per stage."""
    lm = _LM()
    whole = _filled(DynamicLayer, 5)
    proj = torch.nn.Linear(4, 4)
    proj.mp_group, proj._partition_sizes = object(), [2, 2]
    lm.layers[0].self_attn.q_proj = proj
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    assert cached_kv(whole, lm, 0, 5) is whole.layers[0]  # no process group: the walk is skipped
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert cached_kv(whole, lm, 0, 5) is None
    proj._partition_sizes = [4]  # one partition: replicated, the cache holds every head
    assert cached_kv(whole, lm, 0, 5) is whole.layers[0]
