"""The official codes' merge arithmetic (``Selection(arithmetic="sequential")``, :func:`llava.ops.merge_tokens_sequential`)
and the Python reference attention (:mod:`llava.python_sdpa`), against worked values and against the official
formulas run with PyTorch's own ``scatter_add_`` / ``index_add_`` (VScan's ``token_merging``, SparseVLM's
``cluster_and_merge``, transcribed)."""

from __future__ import annotations

import math

import pytest
import torch

from llava.ops import merge_tokens, merge_tokens_sequential
from llava.selection import Selection

F16 = torch.float16


def test_sequential_mean_worked_example_differs_from_the_fp32_merge():
    # target 2048, assigned 1 and 2, fp16: the sum 2051 in fp32, written back to fp16 -> 2052 (ulp 2, tie to even),
    # / 3 = 684 exactly; the fp32 merge rounds once: 2051 / 3 = 683.67 -> 683.5 (ulp 0.5); fp16 adds one at a time
    # would give 2048 + 1 -> 2048, + 2 = 2050, / 3 -> 683.5
    x = torch.tensor([[2048.0], [1.0], [2.0]], dtype=F16)
    sel = Selection(keep=torch.zeros(0, dtype=torch.long), targets=torch.tensor([0]), assign=torch.tensor([-1, 0, 0]),
                    rule="mean", space="projected", arithmetic="sequential")
    assert merge_tokens_sequential(x, sel).tolist() == [[684.0]]
    assert merge_tokens(x, sel).dtype == F16 and merge_tokens(x, sel).tolist() == [[684.0]]
    fp32 = Selection(keep=sel.keep, targets=sel.targets, assign=sel.assign, rule="mean", space="projected")
    assert merge_tokens(x, fp32).to(F16).tolist() == [[683.5]]


def _vscan_token_merging(feats: torch.Tensor, index_mask: torch.Tensor) -> torch.Tensor:
    """VScan's ``token_merging`` (llava_arch.py:142-197) for one image, transcribed: the merged retained rows."""
    retained, others = feats[index_mask][None], feats[~index_mask][None]
    nearest = torch.nn.functional.cosine_similarity(others.unsqueeze(2), retained.unsqueeze(1), dim=3).argmax(dim=2)
    count = torch.zeros(1, retained.shape[1], dtype=torch.int)
    merged = torch.zeros_like(retained)
    merged += retained * 1
    merged.scatter_add_(1, nearest.unsqueeze(-1).expand(-1, -1, feats.shape[-1]), others)
    count.scatter_add_(1, nearest, torch.ones_like(nearest, dtype=count.dtype))
    merged /= (1 + count.unsqueeze(2))
    return merged[0], nearest[0]


@pytest.mark.parametrize("dtype", [F16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequential_mean_equals_vscan_token_merging(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 48, 40
    x = (torch.randn(n, d, generator=g) * 3).to(dtype)
    picked = torch.randperm(n, generator=g)[:9].sort().values
    mask = torch.zeros(n, dtype=torch.bool)
    mask[picked] = True
    want, nearest = _vscan_token_merging(x.clone(), mask)
    assign = torch.full((n,), -1, dtype=torch.long)
    assign[~mask] = nearest
    sel = Selection(keep=torch.zeros(0, dtype=torch.long), targets=picked, assign=assign, rule="mean",
                    space="projected", arithmetic="sequential")
    got = merge_tokens(x, sel)
    assert got.dtype == dtype and torch.equal(got, want)
    # the fp32 merge rounds once: not the official bits on every seed's rows (40 to 60 of the 360 values; each side
    # is elementwise IEEE roundings in a fixed order, no kernel-dependent reduction: the same bits on any CPU)
    if dtype == F16:
        fp32 = Selection(keep=sel.keep, targets=picked, assign=assign, rule="mean", space="projected")
        assert not torch.equal(merge_tokens(x, fp32).to(F16), want)


def _sparsevlm_merge(x: torch.Tensor, idx_cluster: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """The merge half of SparseVLM's ``cluster_and_merge`` (utils.py:216-237), B = 1, transcribed."""
    n, c = x.shape
    token_weight = x.new_ones(1, n, 1)
    idx = idx_cluster[None]
    all_weight = token_weight.new_zeros(cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(n), source=token_weight.reshape(n, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    merged = x.new_zeros(cluster_num, c)
    source = x[None] * norm_weight
    merged.index_add_(dim=0, index=idx.reshape(n), source=source.reshape(n, c).type(x.dtype))
    return merged


@pytest.mark.parametrize("dtype", [F16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequential_weighted_mean_equals_sparsevlm_cluster_and_merge(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N, m, k, d = 60, 20, 3, 24  # N visual tokens, m recycled (in the official topk order), k clusters
    h = (torch.randn(N, d, generator=g) * 4).to(dtype)
    recycled = torch.randperm(N, generator=g)[:m]  # not ascending: the official rows come in topk order
    centres = torch.randperm(m, generator=g)[:k]
    slots = torch.randint(0, k, (m,), generator=g)
    slots[centres] = torch.arange(k)
    want = _sparsevlm_merge(h[recycled], slots, k)
    assign = torch.full((N,), -1, dtype=torch.long)
    assign[recycled] = slots
    sel = Selection(keep=torch.zeros(0, dtype=torch.long), targets=recycled[centres], assign=assign,
                    rule="weighted_mean", arithmetic="sequential", merge_order=recycled)
    got = merge_tokens(h, sel)
    assert got.dtype == dtype and torch.equal(got, want)
    # the fp32 merge of the same groups (one rounding, no per-member weights) is not the official bits (16 to 41 of
    # the 72 values; elementwise IEEE roundings in a fixed order on both sides: the same on any CPU)
    if dtype == F16:
        fp32 = Selection(keep=sel.keep, targets=sel.targets, assign=assign, rule="weighted_mean")
        assert not torch.equal(merge_tokens(h, fp32).to(F16), want)


def test_sequential_target_plus_mean_and_kept_tokens():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    # token 0 kept (its assign slot ignored), 1 target, 2 and 4 join it, 3 dropped
    sel = Selection(keep=torch.tensor([0]), targets=torch.tensor([1]), assign=torch.tensor([0, -1, 0, -1, 0]),
                    rule="target_plus_mean", arithmetic="sequential")
    assert merge_tokens(x, sel).tolist() == [[3.0 + 7.0, 4.0 + 8.0]]  # x1 + mean(x2, x4)
    sel_mean = Selection(keep=sel.keep, targets=sel.targets, assign=sel.assign, rule="mean", arithmetic="sequential")
    assert torch.equal(merge_tokens(x, sel_mean), torch.tensor([[17.0, 20.0]]) / 3)


def test_merge_order_must_hold_every_merged_token_and_is_sequential_only():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="visits 1 of the 2"):
        merge_tokens(x, Selection(keep=torch.tensor([0]), targets=torch.tensor([1]),
                                  assign=torch.tensor([-1, -1, 0, 0, -1]), rule="mean", arithmetic="sequential",
                                  merge_order=torch.tensor([2])))
    with pytest.raises(ValueError, match="sequential. only"):
        Selection(keep=torch.tensor([0]), merge_order=torch.tensor([0]))
    with pytest.raises(ValueError, match="arithmetic"):
        Selection(keep=torch.tensor([0]), arithmetic="fp16")


def test_python_sdpa_is_the_documented_reference_formula():
    from llava.python_sdpa import python_sdpa_attention

    g = torch.Generator().manual_seed(0)
    B, H, L, d = 1, 2, 5, 8
    q, k, v = (torch.randn(B, H, L, d, generator=g).to(F16) for _ in range(3))
    mask = torch.full((L, L), torch.finfo(F16).min, dtype=F16).triu(1)[None, None]
    out, w = python_sdpa_attention(None, q, k, v, mask)
    # the official utils.scaled_dot_product_attention with is_causal=True: an fp16 -inf bias
    bias = torch.zeros(L, L, dtype=F16).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(d)) + bias, dim=-1)
    assert torch.equal(w, ref) and torch.equal(out, (ref @ v).transpose(1, 2))
    bool_out, _ = python_sdpa_attention(None, q, k, v, mask == 0)  # a boolean "may attend" mask: the same
    assert torch.equal(bool_out, out)
    kv1 = k[:, :1], v[:, :1]  # grouped-query: one key / value head for both query heads
    gq, _ = python_sdpa_attention(None, q, *kv1, mask)
    full, _ = python_sdpa_attention(None, q, k[:, :1].expand(-1, H, -1, -1), v[:, :1].expand(-1, H, -1, -1), mask)
    assert torch.equal(gq, full)


def _tiny_llava_logits(attn, dtype, spy=None):
    """The tiny LLaVA (seed 1) loaded with ``attn_implementation=attn`` in ``dtype`` and its fp32 logits on one
    sample; ``spy``: a pytest ``monkeypatch``, with which every call of the ``python_sdpa`` attention function in
    that forward is recorded (the calling attention modules, returned third)."""
    from conftest import make_batch
    from transformers import AttentionInterface

    from llava.models import load
    from llava.python_sdpa import NAME, python_sdpa_attention

    rt = load("tiny:llava", seed=1, dtype=dtype, attn_implementation=attn)
    inputs = make_batch(rt, n=1)
    called = []
    if spy is not None:
        def recorded(module, *args, **kwargs):
            called.append(module)
            return python_sdpa_attention(module, *args, **kwargs)

        spy.setitem(AttentionInterface._global_mapping, NAME, recorded)  # after load: its register() is done
    with torch.no_grad():
        return rt, rt.model(**inputs).logits.float(), called


def test_python_sdpa_loads_and_runs_in_every_decoder_layer(monkeypatch):
    from conftest import make_batch

    rt, py32, called = _tiny_llava_logits("python_sdpa", "float32", spy=monkeypatch)
    assert rt.model.config.text_config._attn_implementation == "python_sdpa"
    # the Python formula is what each decoder layer's attention calls (on any CPU, whatever the bits)
    layers = rt.model.model.language_model.layers
    assert len(layers) > 1 and all(any(m is layer.self_attn for m in called) for layer in layers)
    sdpa32 = _tiny_llava_logits("sdpa", "float32")[1]
    torch.testing.assert_close(py32, sdpa32, atol=1e-5, rtol=1e-5)  # the same attention
    out = rt.model.generate(**make_batch(rt, n=2), max_new_tokens=3, do_sample=False)  # a batch (left padding: the eager mask) generates
    assert out.shape[0] == 2


def test_where_the_cpu_parts_them_fp16_python_sdpa_logits_are_not_the_fused_kernels():
    # a diagnostic of what the reference attention changes: in fp16 the Python formula rounds q k^T, the scaled
    # logits and the probabilities to fp16, the fused kernel keeps them in fp32, so the logits part (on an Intel
    # AVX-512 Xeon in 70 % of the entries, by an fp16 ulp or two; on AMD Zen too); how those roundings reach the
    # logits depends on the CPU's fp16 kernels: where they agree there is nothing to show
    py16, fused16 = _tiny_llava_logits("python_sdpa", "float16")[1], _tiny_llava_logits("sdpa", "float16")[1]
    if torch.equal(py16, fused16):
        pytest.skip("this CPU's fp16 kernels give python_sdpa's and the fused SDPA's logits the same bits")
    torch.testing.assert_close(py16, fused16, atol=4e-3, rtol=4e-3)  # fp16 roundings apart, not another attention
