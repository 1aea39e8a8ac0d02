"""IVC-Prune (baselines/ivcprune.py): the value similarity, the coordinate scores, the fill and the counts on
hand-built inputs with worked-out values; then the method on the tiny LLaVA against an independent computation from
the stock model's own layer K-1 input and RoPE frequencies; the caches of the official rules (layer 0's whole for the
LLaVA rule, every earlier layer's pruned for the Qwen rule) and a decode step on them."""

import math

import pytest
import torch
from conftest import check_generate_batch_equals_alone, make_batch, slice_batch
from transformers import DynamicCache

from baselines.ivcprune import IVCPrune, coordinate_scores, fill, value_scores
from llava.models import load

# S = 4 tokens, one head, d = 1: values v = [1, 0, 2, -1]; visual tokens 1 and 2; query row 3 (v = -1).
# LLaVA rule: row 3's logits over all S: v3 * v = [-1, 0, -2, 1] -> softmax, read at columns 1, 2:
#   e^0 / Z and e^-2 / Z, Z = e^-1 + 1 + e^-2 + e
# Qwen rule: the softmax over the visual columns only: [0, -2] -> [1, e^-2] / (1 + e^-2)
V = torch.tensor([[1.0], [0.0], [2.0], [-1.0]])[:, None, :]  # (S, H_kv, d)
VIS = torch.tensor([1, 2])


def test_value_scores_llava_rule_softmax_over_all_tokens():
    z = math.exp(-1) + 1 + math.exp(-2) + math.e
    got = value_scores(V, torch.tensor([3]), VIS, "llava")
    assert torch.allclose(got, torch.tensor([1 / z, math.exp(-2) / z]), atol=1e-7)
    # anchors = the seed row (token 2: v = 2, logits [2, 0, 4, -2]) and row 3, averaged
    z2 = math.exp(2) + 1 + math.exp(4) + math.exp(-2)
    want = torch.tensor([(1 / z + 1 / z2) / 2, (math.exp(-2) / z + math.exp(4) / z2) / 2])
    assert torch.allclose(value_scores(V, torch.tensor([3]), VIS, "llava", seeds=torch.tensor([2])), want, atol=1e-7)
    # the reference arithmetic (the whole S x S map, its head mean, in the model's dtype) agrees in fp32
    off = value_scores(V, torch.tensor([3]), VIS, "llava", numerics="official", seeds=torch.tensor([2]))
    assert torch.allclose(off, want, atol=1e-7)


def test_value_scores_qwen_rule_softmax_over_the_image_only_and_repeated_heads():
    got = value_scores(V, torch.tensor([3]), VIS, "qwen")
    assert torch.allclose(got, torch.tensor([1, math.exp(-2)]) / (1 + math.exp(-2)), atol=1e-7)
    # with the seed row (token 2: logits over the image [0, 4]) the mean of the two rows
    s2 = torch.tensor([1, math.exp(4)]) / (1 + math.exp(4))
    want = (torch.tensor([1, math.exp(-2)]) / (1 + math.exp(-2)) + s2) / 2
    for num, heads in (("ours", None), ("official", 4)):  # 4 query heads over one value head: the same mean
        got = value_scores(V, torch.tensor([3]), VIS, "qwen", numerics=num, heads=heads, seeds=torch.tensor([2]))
        assert torch.allclose(got, want.float(), atol=1e-6)


def test_value_scores_qwen2_vl_rule_is_the_llava_softmax_with_one_mean():
    """Qwen2-VL's file: the anchor rows (seeds, then the query rows) against every token, one mean over heads and
    rows: on one head, the LLaVA rule's numbers, in both arithmetics (the official with the heads repeated)."""
    want = value_scores(V, torch.tensor([3]), VIS, "llava", seeds=torch.tensor([2]))
    for num, heads in (("ours", None), ("official", None), ("official", 4)):
        got = value_scores(V, torch.tensor([3]), VIS, "qwen2_vl", numerics=num, heads=heads, seeds=torch.tensor([2]))
        assert torch.allclose(got, want, atol=1e-7), (num, heads)


@pytest.mark.parametrize("rule", ["qwen", "llava", "qwen2_vl"])
def test_value_scores_of_padded_rows_with_seeds_equal_the_real_rows(rule):
    """A captured prefill's padded query rows (``row_mask``) with seeds: the real anchors' mean, whatever order the rule
    puts seeds and rows in. Query row 3 padded by two rows pointing at token 0 (masked out), seed token 2: equal to
    the unpadded rows. Worked value for the Qwen rule (softmax over the visual columns 1, 2): row 3 gives
    [1, e^-2] / (1 + e^-2); seed 2 (v = 2): logits [0, 4] -> [1, e^4] / (1 + e^4); the score is their mean."""
    seeds = torch.tensor([2])
    want = value_scores(V, torch.tensor([3]), VIS, rule, seeds=seeds)
    got = value_scores(V, torch.tensor([3, 0, 0]), VIS, rule, seeds=seeds, row_mask=torch.tensor([True, False, False]),
                       key_mask=torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    if rule == "qwen":
        e2, e4 = math.exp(-2), math.exp(4)
        expect = torch.tensor([(1 / (1 + e2) + 1 / (1 + e4)) / 2, (e2 / (1 + e2) + e4 / (1 + e4)) / 2])
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)


def test_coordinate_scores_average_the_tables():
    t = torch.tensor([[1.0, 3.0], [0.0, 1.0], [-1.0, -3.0]])  # (S, d)
    assert torch.equal(coordinate_scores(t, torch.tensor([0, 2])), torch.tensor([2.0, -2.0]))
    m = torch.stack([t, 2 * t, 3 * t])  # M-RoPE: three position rows, averaged too
    assert torch.equal(coordinate_scores(m, torch.tensor([1])), torch.tensor([1.0]))


def test_fill_keeps_the_priority_then_the_best_others():
    pri = torch.tensor([False, True, False, False, True])
    sc = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0])
    assert fill(pri, sc, 3).tolist() == [0, 1, 4]  # priority {1, 4}, then the best other: 0
    assert fill(pri, sc, 4).tolist() == [0, 1, 2, 4]
    assert fill(pri, sc, 1).tolist() == [4]  # a priority larger than k keeps its best k (4 scores 2 > 1)
    assert fill(pri, sc, 5, numerics="official").tolist() == [0, 1, 2, 3, 4]


def test_counts_and_refusals():
    m = IVCPrune()
    m.family, m.num_layers = "llava", 32
    assert (m.k_layer, m.rule_run, m.past_cache_from) == (16, "llava", 1)
    assert m.counts(576, None) == (6, 115, 29)  # official LLaVA: 1 %, 20 %, 5 % per table (Python's round)
    assert m.counts(576, 64) == (6, 0, 10)  # 64 * 0.05 / 0.31 = 10.3
    q = IVCPrune(rule="auto")
    q.family, q.num_layers = "qwen2_5_vl", 28
    assert (q.k_layer, q.rule_run, q.past_cache_from) == (16, "qwen", 0)  # the official 7B K, not 16 * 28 / 32
    assert q.counts(576, None) == (6, 0, 58)
    assert q.counts(576, 64) == (6, 0, 13)  # 64 * 0.1 / 0.5 = 12.8
    q.num_layers = 36
    assert q.k_layer == 22
    # Qwen2-VL's own file: K = 16 of 28 (scaled to other depths), no seed below 50 image tokens (round(0.01 n)),
    # foreground 40 %, IVC 10 % per table, the union; every earlier layer's cache pruned with caches="pruned"
    q2 = IVCPrune(rule="auto")
    q2.family, q2.num_layers = "qwen2_vl", 28
    assert (q2.k_layer, q2.rule_run, q2.past_cache_from) == (16, "qwen2_vl", 0)
    assert q2.counts(576, None) == (6, 230, 58)  # 5.76 -> 6, 230.4 -> 230, 57.6 -> 58
    assert q2.counts(40, None) == (0, 16, 4)
    assert q2.counts(576, 64) == (6, 0, 10)  # 64 * 0.1 / 0.61 = 10.49
    q2.num_layers = 4
    assert q2.k_layer == 2  # round(16 * 4 / 28) = round(2.29)
    assert IVCPrune(value_ratio=0.3).value_share == 0.3 and IVCPrune(rule="qwen").value_share == 0.0
    t = IVCPrune(layer=16)
    t.family, t.num_layers = "llava", 4
    assert t.k_layer == 2
    t.family = "qwen2_5_vl"
    assert t.k_layer == 2 and IVCPrune(keep_tokens=6).kept_count(4) == 4
    for bad in ({"keep_tokens": -1}, {"rows": "all"}, {"rule": "internvl"}, {"caches": "some"}, {"layer": 0},
                {"numerics": "fp16"}, {"seed_ratio": 2}):
        with pytest.raises(ValueError, match="ivcprune"):
            IVCPrune(**bad)
    with pytest.raises(ValueError, match="either a budget"):
        IVCPrune(64, keep_tokens=6)


@pytest.fixture(scope="module")
def rts():
    return load("tiny:llava", seed=1), load("tiny:llava", seed=1)  # pruned, stock


def _one(rt):
    return slice_batch(make_batch(rt), 1, rt)


def _reference(ref, one, rule="llava"):
    """Independent: the stock model's input to layer K-1 = 1 (K = 16 of 32 -> 2 of 4), its values, the similarity
    rows in fp64, the cos / sin of each position from the rotary frequencies, the official fractions of n = 16
    (1 seed, 3 foreground, 1 + 1 IVC; Qwen: 2 + 2 IVC, filled to 8; Qwen2-VL: round(0.16) = no seed, 6 foreground,
    2 + 2 IVC)."""
    with torch.no_grad():
        h = ref.model(**one, output_hidden_states=True).hidden_states[1][0]  # the input to decoder layer 1
    lay = ref.model.model.language_model.layers[1]
    with torch.no_grad():
        v = lay.self_attn.v_proj(lay.input_layernorm(h)).double()
    S = v.shape[0]
    H = ref.model.config.text_config.num_key_value_heads
    v = v.view(S, H, -1).transpose(0, 1)  # (H, S, d)
    d = v.shape[-1]
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == ref.model.config.image_token_id).flatten()
    n = vis.numel()
    rows = torch.arange(int(vis[-1]) + 3, S)

    every_column = rule in ("llava", "qwen2_vl")

    def score(anchor):
        cols = v if every_column else v[:, vis]
        w = torch.softmax(v[:, anchor] @ cols.transpose(1, 2) / math.sqrt(d), -1).mean(0).mean(0)
        return w[vis] if every_column else w

    seeds = torch.topk(score(rows), 0 if rule == "qwen2_vl" else 1).indices
    sc = score(torch.cat([vis[seeds], rows]))
    theta = ref.model.config.text_config.rope_parameters["rope_theta"]
    f = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = vis.double()[:, None] * f[None]
    n_ivc = 1 if rule == "llava" else 2
    keep = set(seeds.tolist()) | set(torch.topk(ang.cos().mean(1), n_ivc).indices.tolist())
    keep |= set(torch.topk(ang.sin().mean(1), n_ivc).indices.tolist())
    if every_column:
        keep |= set(torch.topk(sc, 3 if rule == "llava" else 6).indices.tolist())
    else:
        target = max(8, len(keep))  # the fill to round(0.5 n), never below the priority
        for j in torch.sort(sc, descending=True).indices.tolist():
            if len(keep) >= target:
                break
            keep.add(j)
    assert n == 16
    return sorted(keep)


@pytest.mark.parametrize("rule", ["llava", "qwen", "qwen2_vl"])
def test_selection_matches_an_independent_computation(rts, rule):
    rt, ref = rts
    one = _one(rt)
    want = _reference(ref, one, rule)
    for num in ("ours", "official"):
        eng = rt.prune("ivcprune", None, rule=rule, numerics=num)
        with torch.no_grad():
            rt.model(**one)
        assert eng.selections[(0, 0)].keep.tolist() == want, num
        assert eng.stats.samples[0].visual_per_layer == [16, 16, len(want), len(want)]
    if rule == "llava":
        assert len(want) <= 6
    elif rule == "qwen2_vl":
        assert 6 <= len(want) <= 10
    else:
        assert len(want) == 8


def test_a_count_keeps_exactly_that_many(rts):
    rt, _ = rts
    one = _one(rt)
    for k in (1, 3, 6, 12):
        eng = rt.prune("ivcprune", None, keep_tokens=k)
        with torch.no_grad():
            rt.model(**one)
        keep = eng.selections[(0, 0)].keep
        assert keep.numel() == k and torch.equal(keep, keep.sort().values)


@pytest.mark.parametrize("rule,first", [("llava", 1), ("qwen", 0)])
def test_the_official_caches_and_a_decode_step_on_them(rts, rule, first):
    """caches="pruned": the LLaVA rule leaves layer 0's cache whole and keeps the kept rows in layer 1 (K-1), the Qwen
    rule prunes both; the prefill is unchanged; the next token equals the stock language model run by hand on those
    caches at the original position L."""
    rt, ref = rts
    one = _one(rt)
    ids = one["input_ids"][0]
    L = ids.numel()
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    gen = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    eng = rt.prune("ivcprune", None, rule=rule)
    with torch.no_grad():
        kept_run = rt.model(**one, use_cache=True)
        out_kept = rt.model.generate(**one, **gen)
    keep = torch.ones(L, dtype=torch.bool)
    keep[vis] = False
    keep[vis[eng.selections[(0, 0)].keep]] = True
    rows = torch.nonzero(keep).flatten()
    rt.prune("ivcprune", None, rule=rule, caches="pruned")
    with torch.no_grad():
        pre = rt.model(**one, use_cache=True)
        out = rt.model.generate(**one, **gen)
    assert torch.equal(pre.logits, kept_run.logits)
    lens = [layer.keys.shape[2] for layer in pre.past_key_values.layers]
    assert lens == ([L] * first + [rows.numel()] * (2 - first) + [rows.numel()] * 2)
    assert torch.equal(out.logits[0], out_kept.logits[0])
    t1 = out.sequences[0, L]
    cache = DynamicCache()
    for i, layer in enumerate(kept_run.past_key_values.layers):
        k, v = layer.keys, layer.values
        if i < 2 and i >= first:  # a layer before the stage whose cache the rule prunes
            k, v = k[:, :, rows], v[:, :, rows]
        cache.update(k, v, i)
    lm = ref.model.model.language_model
    with torch.no_grad():
        h = ref.model.get_input_embeddings()(t1.view(1, 1))
        pe = lm.rotary_emb(h, position_ids=torch.tensor([[L]]))
        for i, layer in enumerate(lm.layers):
            h = layer(h, attention_mask=None, position_embeddings=pe, past_key_values=cache, use_cache=True)
        want = ref.model.lm_head(lm.norm(h))[0, -1]
    assert torch.allclose(out.logits[1][0], want, atol=1e-5)
    assert not torch.allclose(out.logits[1][0], out_kept.logits[1][0], atol=1e-6)


@pytest.mark.parametrize("opts", [{}, {"keep_tokens": 6}, {"rule": "qwen", "numerics": "official", "caches": "pruned"},
                                  {"caches": "pruned", "numerics": "official"}])
def test_batch_equals_alone(rts, opts):
    check_generate_batch_equals_alone(rts[0], "ivcprune", None, **opts)


def test_the_fast_path_captures_a_count_and_refuses_the_official_rule_with_the_reason():
    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=4, fast_backend="none")
    assert fast.prune("ivcprune", None).fast.refusal.startswith("ivcprune: the official rule's kept count")
    assert fast.prune("ivcprune", None, keep_tokens=6, rows="question").fast.refusal.startswith("ivcprune: rows=")
    assert fast.prune("ivcprune", None, keep_tokens=6, caches="pruned").fast.refusal == \
        "ivcprune: pruning the earlier layers' caches runs on the eager engine"
    assert fast.prune("ivcprune", 40).fast.refusal is None


def test_the_rotary_signal_gives_each_mrope_row_its_own_table():
    """Qwen2.5-VL: LLMSignals.rotary is one (cos, sin) table per M-RoPE position row before the sections are merged
    (transformers 4's rotary output, which the official Qwen code averages; 5's merges them inside), worked out from
    the positions and the rotary frequencies; on LLaVA (1-D) the model's own table."""
    for fam in ("qwen2.5-vl", "llava"):
        rt = load(f"tiny:{fam}", seed=1)
        one = slice_batch(make_batch(rt), 1, rt)
        eng = rt.prune("ivcprune", None, keep_tokens=2)
        seen = []
        inner = eng.method.select_llm

        def spy(stage, sig):
            seen.append((sig.position_ids, sig.rotary("prev"), sig.rotary("prev", fp32=True)))
            return inner(stage, sig)

        eng.method.select_llm = spy
        with torch.no_grad():
            rt.model(**one)
        (pos, (cos, sin), (cos32, sin32)), = seen
        rot = rt.model.model.language_model.rotary_emb
        f = pos.double()[..., None] * rot.inv_freq.double()
        want = torch.cat((f, f), -1)
        assert cos.shape == (((3,) if fam == "qwen2.5-vl" else ()) + (pos.shape[-1], want.shape[-1]))
        assert torch.allclose(cos32.double(), want.cos(), atol=1e-6) and torch.allclose(sin32.double(), want.sin(),
                                                                                         atol=1e-6)
        if fam == "qwen2.5-vl":
            assert not torch.equal(pos[0], pos[1])  # the image's rows differ: three different tables
