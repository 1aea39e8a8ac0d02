"""TransPrune (baselines/transprune.py): the token transition weight, its accumulation and normalisation, the
instruction-guided attention and the keep rule on hand-built values; the schedules; then the method on the tiny
LLaVA against a hand-run of the stock eager model (its layer-0 sub-block states and layer-1 attention)."""

import math

import pytest
import torch
from conftest import make_batch, slice_batch

from baselines.transprune import (OFFICIAL_ACCUMULATE, TransPrune, accumulate, equivalent_tokens,
                                  instruction_attention, layer_transition, scale_ratios, transition_weight,
                                  transprune_keep, transprune_scores)
from llava.models import load
from llava.subblocks import SubBlockStates

E = math.e


def at_depth(m, depth=32):
    m.setup(num_layers=depth, num_vision_layers=24, family="llava")
    return m


# ------------------------------------------------------------------------------ pure functions


BEFORE = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
AFTER = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-3.0, 0.0]])
# token 0: |after|/|before| = 2, cos = 1 -> exp(0) = 1; token 1: 1/2, cos = 0 -> e; token 2: 3, cos = -1 -> e^2
Z = 1 + E + E ** 2
W = [2 * 1 / Z, 0.5 * E / Z, 3 * E ** 2 / Z]  # 0.1773, 0.1205, 1.9623


@pytest.mark.parametrize("numerics", ["ours", "official"])
def test_transition_weight_on_hand_built_vectors(numerics):
    w = transition_weight(BEFORE, AFTER, numerics)
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor(W), atol=1e-6)
    # the normaliser is the sum of exp over the rows given: a fourth identical row changes every weight
    w4 = transition_weight(torch.cat([BEFORE, BEFORE[:1]]), torch.cat([AFTER, AFTER[:1]]))
    assert torch.allclose(w4[:3], torch.tensor(W) * Z / (Z + 1), atol=1e-6)
    # reference mode in half precision stays in half precision (the official compute_transf_weight's dtype)
    h = transition_weight(BEFORE.half(), AFTER.half(), "official")
    assert h.dtype == torch.float16 and torch.allclose(h.float(), torch.tensor(W), atol=2e-3)
    assert transition_weight(BEFORE.half(), AFTER.half(), "ours").dtype == torch.float32


def test_transition_weight_is_the_cosine_similarity_formula_bit_for_bit():
    # "ours" reuses the two row norms inside the cosine (torch's F.cosine_similarity arithmetic: each row over
    # max(norm, 1e-8), the product summed) and divides its fp32 copies in place: the bits of the formula as
    # written, and the caller's states untouched, in every input dtype (an fp32 input is not copied, so it is
    # never written) and with a zero row (the eps floor)
    def formula(b, a):
        b, a = b.float(), a.float()
        e = torch.exp(1 - torch.nn.functional.cosine_similarity(b, a, dim=-1))
        return (torch.norm(a, dim=-1) / torch.norm(b, dim=-1)) * (e / e.sum())

    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        b, a = (torch.randn(2, 300, 96, generator=g) * torch.tensor([1.0, 30.0])[:, None, None]).to(dt)
        a[7] = 0  # |after| = 0: cos over the eps floor, weight 0
        b0, a0 = b.clone(), a.clone()
        w = transition_weight(b, a)
        assert torch.equal(w, formula(b, a)) and w[7] == 0
        assert torch.equal(b, b0) and torch.equal(a, a0)
        assert torch.equal(transition_weight(b, a.float()), formula(b, a))  # one copy only: out of place


def test_layer_weight_is_attention_plus_ffn():
    # attention sub-block: the three tokens above; FFN: after = before (ratio 1, cos 1 -> 1 each, /3)
    st = SubBlockStates(attn_in=BEFORE, attn_out=AFTER, mlp_in=BEFORE, mlp_out=BEFORE)
    assert torch.allclose(layer_transition(st), torch.tensor(W) + 1 / 3, atol=1e-6)


def test_accumulation_over_layers_and_stages():
    vis = torch.tensor([1, 2])
    w_a = torch.tensor([9.0, 0.5, 0.25])  # layer a over 3 rows (row 0 is text)
    w_b = torch.tensor([9.0, 0.125, 1.0])
    acc = accumulate(None, [w_a, w_b], vis)
    assert acc.dtype == torch.float32 and acc.tolist() == [0.625, 1.25]
    # carried to the next stage (already gathered to the kept tokens), plus a later layer's rows
    acc2 = accumulate(acc[torch.tensor([1])], [torch.tensor([3.0, 0.5])], torch.tensor([1]))
    assert acc2.tolist() == [1.75]
    # fp16 weights into an fp32 accumulator (the official torch.zeros(...) += weight)
    assert accumulate(None, [w_a.half()], vis).dtype == torch.float32


def test_instruction_attention_and_score():
    # 2 heads, 2 rows after the image, 4 columns; visual = columns 1, 2
    attn = torch.tensor([[[0.0, 0.5, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]],
                         [[0.0, 0.0, 0.5, 0.5], [0.0, 0.75, 0.0, 0.25]]])
    vis = torch.tensor([1, 2])
    # head means: row0 [0, .25, .375, .375], row1 [.125, .5, .125, .25]; visual [[.25, .375], [.5, .125]]
    # row mean: [.375, .25] -> / .625 -> [.6, .4]
    for numerics in ("ours", "official"):
        iga = instruction_attention(attn, vis, numerics, dtype=torch.float32)
        assert torch.allclose(iga, torch.tensor([0.6, 0.4]))
    assert instruction_attention(attn, vis, "official", dtype=torch.float16).dtype == torch.float16
    # accumulated transition [0.625, 1.25] -> [1/3, 2/3]; score = [0.9333, 1.0667]
    s = transprune_scores(torch.tensor([0.625, 1.25]), torch.tensor([0.6, 0.4]))
    assert torch.allclose(s, torch.tensor([0.6 + 1 / 3, 0.4 + 2 / 3]))
    assert transprune_keep(s, 1).tolist() == [1]
    # no transition at all (every weight 0): the attention alone (0 / (0 + 1e-8) = 0)
    assert torch.equal(transprune_scores(torch.zeros(2), torch.tensor([0.6, 0.4])), torch.tensor([0.6, 0.4]))


def test_keep_rule_ties_and_order():
    s = torch.tensor([0.5, 0.25, 0.5, 0.75, 0.5])
    assert transprune_keep(s, 3).tolist() == [0, 2, 3]  # ties to the lower index, ascending
    assert transprune_keep(s, 9).tolist() == [0, 1, 2, 3, 4]
    assert transprune_keep(s, 1, "official").tolist() == [3]


# ------------------------------------------------------------------------------ schedules


def test_official_schedule_and_its_equivalent_tokens():
    # stages before layers 7 / 9 / 12 keeping int(576 * 0.875 / 0.625 / 0.125) = 504 / 360 / 72
    # E = (7*576 + 2*504 + 3*360 + 20*72) / 32 = (4032 + 1008 + 1080 + 1440) / 32 = 7560 / 32 = 236.25
    m = at_depth(TransPrune())
    assert m.llm_layers == (7, 9, 12) and m.position_mode == "reindex"
    assert m.llm_subblock_layers == OFFICIAL_ACCUMULATE == (6, 7, 8, 9, 10, 11)  # official [7..12], 1-based
    assert m.stage_counts(576) == (504, 360, 72)
    assert equivalent_tokens(m.layer_counts(576)) == 236.25
    assert m.stage_counts(2880) == (2520, 1800, 360)  # int(N * ratio) of the sample's own count
    # explicit official lists = the default
    m2 = at_depth(TransPrune(ratios=[0.875, 0.625, 0.125], layer_list=[7, 9, 12]))
    assert m2.stage_counts(576) == (504, 360, 72) and m2.llm_subblock_layers == (6, 7, 8, 9, 10, 11)


@pytest.mark.parametrize("budget,counts,e", [(192, (300, 200, 110), 191.0), (128, (303, 110, 36), 126.25),
                                             (64, (66, 30, 17), 62.125)])
def test_budget_table_is_pyramiddrops(budget, counts, e):
    m = at_depth(TransPrune(budget))
    assert m.llm_layers == (2, 6, 16) and m.stage_counts(576) == counts
    assert equivalent_tokens(m.layer_counts(576)) == e
    assert m.llm_subblock_layers == tuple(range(1, 16))  # the layer before stage 1 .. the layer before stage 3


def test_other_budgets_scale_the_official_shape():
    # 200: alpha = (200/576 * 32 - 7) / (2*0.875 + 3*0.625 + 20*0.125) = (11.1111 - 7) / 6.125 = 0.671202
    r = scale_ratios((7, 9, 12), 32, 200 / 576)
    assert r == pytest.approx(tuple(0.671202 * x for x in (0.875, 0.625, 0.125)), rel=1e-5)
    m = at_depth(TransPrune(200))
    assert m.llm_layers == (7, 9, 12)
    assert m.stage_counts(576) == (338, 241, 48)  # int(576 * 0.58730), int(576 * 0.41950), int(576 * 0.08390)
    assert abs(equivalent_tokens(m.layer_counts(576)) - 200) < 1.0  # 199.875
    # the reachable range on 32 layers: 126 (all ratios 0) .. 252 (the first ratio 1)
    assert scale_ratios((7, 9, 12), 32, 252 / 576)[0] == pytest.approx(1.0)
    for b in (100, 260):
        with pytest.raises(ValueError, match="out of reach"):
            at_depth(TransPrune(b))


def test_depth_mapping_options_and_refusals():
    m = at_depth(TransPrune(), 4)  # 7 / 9 / 12 of 32 -> 1 / 2 / 3 of 4; accumulate 0..2
    assert m.llm_layers == (1, 2, 3) and m.llm_subblock_layers == (0, 1, 2)
    assert m.layer_counts(16) == [16, 14, 10, 2]  # int(16 * 0.875 / 0.625 / 0.125)
    m = at_depth(TransPrune(accumulate_layers=[1, 2]), 4)
    assert m.llm_subblock_layers == (1, 2)
    with pytest.raises(ValueError, match="before the last stage"):
        at_depth(TransPrune(accumulate_layers=[3]), 4)
    with pytest.raises(ValueError, match="either"):
        TransPrune(192, ratios=[0.5, 0.25, 0.1])
    with pytest.raises(ValueError):
        TransPrune(ratios=[0.5, 0.25])
    with pytest.raises(ValueError):
        TransPrune(numerics="fp64")
    assert "sub-block" in TransPrune().capture_refusal()
    assert not TransPrune.supports("qwen3_5") and TransPrune.supports("internvl")


# ------------------------------------------------------------------------------ the tiny LLaVA


@pytest.fixture(scope="module")
def stock():
    return load("tiny:llava", seed=1, attn_implementation="eager")


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
@pytest.mark.parametrize("numerics", ["ours", "official"])
def test_first_stage_against_a_hand_run_of_the_stock_model(rt, stock, numerics):
    """Stage 0 (before layer 1 of 4) on the unpruned prompt: layer 0's sub-block states hand-run from the stock
    eager model (its attention probabilities, v / o projections, norms, MLP), the transition of layer 0, and the
    instruction-guided attention = the stock layer 1's own attention rows after the image."""
    one = slice_batch(make_batch(rt), 0, rt)
    with torch.no_grad():
        out = stock.model(**one, output_attentions=True, output_hidden_states=True)
    lm = stock.model.model.language_model
    L0 = lm.layers[0]
    x = out.hidden_states[0]  # (1, S, D): the input of layer 0
    S = x.shape[1]
    with torch.no_grad():
        a_in = L0.input_layernorm(x)
        att = out.attentions[0]  # (1, H, S, S)
        H = att.shape[1]
        v = L0.self_attn.v_proj(a_in).view(1, S, -1, L0.self_attn.head_dim).transpose(1, 2)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
        a_out = L0.self_attn.o_proj((att @ v).transpose(1, 2).reshape(1, S, -1))
        h_mid = x + a_out
        m_in = L0.post_attention_layernorm(h_mid)
        m_out = L0.mlp(m_in)
    assert torch.allclose(h_mid + m_out, out.hidden_states[1], atol=1e-5)  # the hand-run is layer 0
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == stock.model.config.image_token_id).flatten()
    after = torch.arange(int(vis[-1]) + 1, S)
    w = transition_weight(a_in[0], a_out[0]) + transition_weight(m_in[0], m_out[0])
    acc = w[vis]
    iga = out.attentions[1][0][:, after].mean(0)[:, vis].mean(0)  # layer 1's own rows after the image
    score = acc / acc.sum() + iga / iga.sum()
    expected = torch.topk(score, 4).indices.sort().values

    m = TransPrune(ratios=[0.25, 0.125, 0.0625], numerics=numerics)  # 16 -> 4 / 2 / 1
    seen = {}
    inner = m.select_llm

    def spy(stage, sig):
        seen.setdefault(stage, {k: v for k, v in sig.subblocks.items()})
        return inner(stage, sig)

    m.select_llm = spy
    eng = rt.prune(m)
    with torch.no_grad():
        rt.model(**one)
    got = seen[0][0]
    for name, ref in [("attn_in", a_in), ("attn_out", a_out), ("mlp_in", m_in), ("mlp_out", m_out)]:
        assert torch.allclose(getattr(got, name), ref[0], atol=1e-5), name
    assert sorted(seen[0]) == [0] and sorted(seen[1]) == [1] and sorted(seen[2]) == [2]  # each stage: its new layers
    assert torch.equal(eng.selections[(0, 0)].keep, expected)
    assert [s.visual_per_layer for s in eng.stats.samples] == [[16, 4, 2, 1]]
    # the later stages select among the survivors
    assert eng.selections[(1, 0)].keep.numel() == 2 and int(eng.selections[(1, 0)].keep.max()) < 4


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_later_stage_carries_the_kept_tokens_accumulated_transition(rt):
    """Stage 1 adds layer 1's weights (recorded on the pruned rows) to stage 0's accumulated weights gathered by
    its keep: the accumulator the method leaves for stage 1 equals that sum, recomputed from the signals."""
    one = slice_batch(make_batch(rt), 1, rt)
    m = TransPrune(ratios=[0.5, 0.25, 0.125])
    seen = []
    inner = m.select_llm

    def spy(stage, sig):
        before = sig.state.get("transprune_acc")
        sel = inner(stage, sig)
        seen.append((before, {k: v for k, v in sig.subblocks.items()}, sig.visual, sel.keep, sig.state["transprune_acc"]))
        return sel

    m.select_llm = spy
    rt.prune(m)
    with torch.no_grad():
        rt.model(**one)
    (_, sb0, vis0, keep0, acc0), (before1, sb1, vis1, keep1, acc1) = seen[0], seen[1]
    w0 = layer_transition(sb0[0])[vis0]
    assert torch.equal(acc0, w0[keep0]) and torch.equal(before1, acc0)
    w1 = layer_transition(sb1[1])[vis1]
    assert torch.equal(acc1, (acc0 + w1)[keep1])
