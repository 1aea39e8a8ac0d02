"""Pruning the earlier layers' caches at an llm stage (``Method.prune_past_cache``; PriorTR / CLSE ``caches="pruned"``,
their official codes' behaviour): every layer's cache holds the kept rows only, the prefill is unchanged, and a decode
step equals the stock language model run by hand on those caches."""

import pytest
import torch
from conftest import check_generate_batch_equals_alone, make_batch, slice_batch
from transformers import DynamicCache

from llava.models import load


@pytest.fixture(scope="module")
def rts():
    return load("tiny:llava", seed=1), load("tiny:llava", seed=1)  # pruned, stock


def _one(rt):
    return slice_batch(make_batch(rt), 1, rt)


def _layout_rows(ids, vis, kept):
    """The prompt's rows in a stage's layout: every non-visual row and the kept visual ones, ascending."""
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[vis] = False
    keep[kept] = True
    return torch.nonzero(keep).flatten()


@pytest.mark.parametrize("method,budget,opts", [("priortr", None, {"keep_tokens": 6}), ("clse", 192, {})])
def test_every_layers_cache_holds_the_final_rows(rts, method, budget, opts):
    rt, _ = rts
    one = _one(rt)
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    eng = rt.prune(method, budget, **opts)
    with torch.no_grad():
        kept = rt.model(**one, use_cache=True)
    stages = eng.method.llm_layers
    idx = [vis]  # the original rows of the visual tokens entering each segment
    for s in range(len(stages)):
        idx.append(idx[-1][eng.selections[(s, 0)].keep])
    rt.prune(method, budget, caches="pruned", **opts)
    with torch.no_grad():
        pruned = rt.model(**one, use_cache=True)
    assert torch.equal(pruned.logits, kept.logits)  # the prefill is the same
    final = _layout_rows(ids, vis, idx[-1])
    n_layers = len(rt.model.model.language_model.layers)
    for i in range(n_layers):
        seg = sum(1 for k in stages if k <= i)  # the layout layer i saw the prompt in
        rows = _layout_rows(ids, vis, idx[seg])
        at = torch.searchsorted(rows, final)  # the final rows' places in that layout
        assert torch.equal(rows[at], final)
        k_kept, k_pruned = kept.past_key_values.layers[i].keys, pruned.past_key_values.layers[i].keys
        assert k_kept.shape[2] == rows.numel() and k_pruned.shape[2] == final.numel()
        assert torch.equal(k_pruned, k_kept[:, :, at])
        assert torch.equal(pruned.past_key_values.layers[i].values, kept.past_key_values.layers[i].values[:, :, at])


def test_a_decode_step_equals_the_stock_model_on_the_gathered_caches(rts):
    """Independent reference: the kept-cache run's prefill caches of layer 0 (K = 1) gathered by hand, then the stock
    language model (no engine) on the first generated token at its original position L."""
    rt, ref = rts
    one = _one(rt)
    ids = one["input_ids"][0]
    L = ids.numel()
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    gen = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    eng = rt.prune("priortr", None, keep_tokens=6)
    with torch.no_grad():
        prefill = rt.model(**one, use_cache=True)
        out_kept = rt.model.generate(**one, **gen)
    rows = _layout_rows(ids, vis, vis[eng.selections[(0, 0)].keep])
    rt.prune("priortr", None, keep_tokens=6, caches="pruned")
    with torch.no_grad():
        out = rt.model.generate(**one, **gen)
    assert torch.equal(out.logits[0], out_kept.logits[0])  # the first token comes from the prefill
    t1 = out.sequences[0, L]
    cache = DynamicCache()
    for i, layer in enumerate(prefill.past_key_values.layers):
        k, v = layer.keys, layer.values
        if k.shape[2] == L:  # a layer before the stage: its full cache, gathered
            k, v = k[:, :, rows], v[:, :, rows]
        cache.update(k, v, i)
    lm = ref.model.model.language_model
    with torch.no_grad():
        h = lm(inputs_embeds=ref.model.get_input_embeddings()(t1.view(1, 1)), past_key_values=cache,
               position_ids=torch.tensor([[L]]), attention_mask=torch.ones(1, rows.numel() + 1, dtype=torch.long),
               use_cache=True).last_hidden_state
        want = ref.model.lm_head(h)[0, -1]
    assert torch.allclose(out.logits[1][0], want, atol=1e-5)
    assert not torch.allclose(out.logits[1][0], out_kept.logits[1][0], atol=1e-6)  # layer 0 sees fewer rows
    # a decode call without positions (not generate()): the engine continues after the prompt's original length,
    # although layer 0's cache now holds fewer rows
    with torch.no_grad():
        pre = rt.model(**one, use_cache=True)
        assert pre.past_key_values.layers[0].keys.shape[2] == rows.numel() < L
        step = rt.model(input_ids=t1.view(1, 1), attention_mask=torch.ones(1, L + 1, dtype=torch.long),
                        past_key_values=pre.past_key_values, use_cache=True).logits[0, -1]
    assert torch.allclose(step, want, atol=1e-5)


@pytest.mark.parametrize("method,budget,opts", [("priortr", None, {"keep_tokens": 6}), ("clse", 192, {})])
def test_batch_equals_alone_and_refusals(rts, method, budget, opts):
    rt, _ = rts
    check_generate_batch_equals_alone(rt, method, budget, caches="pruned", **opts)
    rt.prune(method, budget, caches="pruned", **opts)
    with pytest.raises(ValueError, match="dynamic cache"):
        with torch.no_grad():
            rt.model.generate(**_one(rt), max_new_tokens=2, do_sample=False, cache_implementation="static")
    with pytest.raises(ValueError, match="caches must be"):
        rt.prune(method, budget, caches="all", **opts)


def test_the_fast_path_refuses_it_with_the_reason():
    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=4, fast_backend="none")
    eng = fast.prune("priortr", 8, caches="pruned")
    assert eng.fast.refusal == "priortr: pruning the earlier layers' caches runs on the eager engine"
    assert fast.prune("priortr", 8).fast.refusal is None


@pytest.mark.parametrize("method,budget,opts,layers", [("priortr", None, {"keep_tokens": 6}, [0]),
                                                       ("clse", 192, {}, [0, 1, 2])])
def test_the_reference_mode_runs_the_score_layers_on_eager_attention(rts, monkeypatch, method, budget, opts, layers):
    """``Method.eager_layers``: in the reference mode the prefill runs each score layer K-1 on transformers' eager
    attention (the official codes' output_attentions=True path), every other layer and every decode step on the
    model's own (SDPA); the layer's configuration is the model's again afterwards."""
    from transformers.models.llama import modeling_llama as ml

    rt, _ = rts
    calls = []
    inner = ml.eager_attention_forward

    def spy(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return inner(module, *args, **kwargs)

    monkeypatch.setattr(ml, "eager_attention_forward", spy)
    one = _one(rt)
    rt.prune(method, budget, numerics="official", **opts)
    with torch.no_grad():
        rt.model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert calls == layers  # the prefill's score layers only, once each
    lm = rt.model.model.language_model
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in lm.layers)
    calls.clear()
    rt.prune(method, budget, **opts)  # ours: the model's attention everywhere
    with torch.no_grad():
        rt.model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert calls == []


def test_past_segments_split_where_the_pruned_layers_begin():
    """``Method.past_cache_from``: the segments that begin before it keep their layout, the one that holds it is split
    there, the later ones before the stage take the stage's layout."""
    from llava.staged import _DecodeSegment, _past_segments

    old, new = torch.ones(1, 5), torch.ones(1, 3)
    z = torch.zeros(1, dtype=torch.long)
    segs = [_DecodeSegment(0, old, z), _DecodeSegment(4, old, z)]
    out = _past_segments(segs, 1, 8, new, z)  # a stage before layer 8 that prunes layers 1..7
    assert [(s.start, s.mask.shape[1]) for s in out] == [(0, 5), (1, 3), (4, 3)]
    out = _past_segments(segs, 0, 8, new, z)  # from layer 0: every earlier segment (PriorTR, CLSE)
    assert [(s.start, s.mask.shape[1]) for s in out] == [(0, 3), (4, 3)]
    out = _past_segments(segs, 4, 8, new, z)  # from a segment's own start: no split
    assert [(s.start, s.mask.shape[1]) for s in out] == [(0, 5), (4, 3)]
