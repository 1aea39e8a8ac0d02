"""SparseVLM reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): Gumpest/SparseVLMs, branch ``main`` (= tag ``v2.0``; v1 with the
default ``USE_VERSION=1_0``), run with transformers 4.37.2 (``pyproject.toml``) and the fp16 model of
``llava/model/builder.py`` ``load_pretrained_model`` (``torch_dtype=torch.float16``):
  * ``llava/model/language_model/modelling_sparse_llama.py`` ``LlamaModel.forward``:
    "Select Text Raters" - ``v_t @ t_t.transpose(1, 2)``, ``softmax(2).mean(1)``, ``torch.where(m > m.mean())``
    on the fp16 input embeddings; the sparse layer's attention ``layer_outputs[2]``; v2 "Text-Visual
    Attention Gravity Correction" (all-ones q / k rotated by the layer's fp16 RoPE, ``matmul / sqrt(d)``,
    ``attn_logits / rope_weights``); the v1 recycling block (``merge_token_stage1.topk(int(P * 0.3) + 1)``,
    ``cluster_num = int(m / 10) + 1``, merged tokens after the kept visual tokens);
  * ``modelling_sparse_llama.py`` ``LlamaDynamicvitSdpaAttention.forward`` -> ``utils.scaled_dot_product_attention``:
    ``torch.softmax`` of the fp16 logits (no dtype argument): the probabilities are fp16;
  * ``llava/model/language_model/score.py`` ``attn_postprocess_topk`` (``mean(1)`` over heads, rater rows,
    visual columns, ``mean(1)`` over raters, ``torch.topk(min(n_s, v - 1))``, boolean mask) and
    ``select_attn_head_by_sum`` (``sum((1, 2))``, ``topk(14)``);
  * ``llava/model/language_model/utils.py`` ``cluster_and_merge`` / ``index_points`` (DPC-kNN in the dtype of
    the layer output, ``rand * 1e-6`` density noise, ``torch.topk`` centres, ``argmin`` assignment, merged =
    ``index_add_`` of x * 1 / (count + 1e-6));
  * transformers 4.37.2 ``LlamaRotaryEmbedding`` (cos / sin cache of fp32 angles cast to the model dtype) and
    ``apply_rotary_pos_emb`` (``q * cos + rotate_half(q) * sin``).

Compared with ``baselines.sparsevlm.SparseVLM.select_llm`` on worked examples and random signals with the
official shapes (LLaVA-1.5-7B: 32 heads of 128, D = 4096, 35 prefix + 576 image + 40 text tokens; stages
after layer 2 (576 visual) and layer 6 (v1: 300 + 9 recycled; v2: 300 kept at their original position
ids)), fp32 and fp16 signals, with planted duplicate image tokens (identical keys and hidden states: exact
ties in every score, equal densities in the clustering), duplicate text tokens and a heavy low-attention
tail (many fp16 ties).
"""

import math

import pytest
import torch
from conftest import FAMILIES

from baselines.sparsevlm import (SparseVLM, density_peak_clusters, official_density_peak_clusters,
                                 official_rope_gravity, rater_scores, select_raters)
from llava.ops import merge_tokens
from llava.selection import Selection
from llava.signals import LLMSignals

F16 = torch.float16
SYS, NV, NT, HEADS, HD, D = 35, 576, 40, 32, 128, 4096
THETA = 10000.0

# ------------------------------------------------------------------------------ transcription


def official_raters(inputs_embeds, v_start, v_num):
    """"Select Text Raters": inputs_embeds (1, L, D) fp16 -> rater indices relative to the text start."""
    v_t = inputs_embeds[:, v_start:v_start + v_num, :]
    t_t = inputs_embeds[:, v_start + v_num:, :]
    m = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    return torch.where(m > m.mean())[1]


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def official_rope_weights(position_ids, seq, heads, head_dim, theta=THETA, max_pos=4096, dtype=F16):
    """v2 gravity: all-ones fp16 q / k rotated with transformers 4.37.2's cached fp16 cos / sin (``dtype``: the
    model's; fp32 in an fp32 run)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    t = torch.arange(max(max_pos, int(position_ids.max()) + 1), dtype=inv_freq.dtype)
    emb = torch.cat((torch.outer(t, inv_freq),) * 2, dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q = torch.ones(1, seq, heads, head_dim, dtype=dtype).transpose(1, 2)
    k = torch.ones(1, seq, heads, head_dim, dtype=dtype).transpose(1, 2)
    cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    return torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)


def official_cluster_and_merge(x, cluster_num, noise=None):
    """``cluster_and_merge`` on x (1, N, C); ``noise``: a generator for the official ``rand * 1e-6``."""
    B, N, C = x.shape
    dist = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (C ** 0.5)
    dist_nearest = torch.topk(dist, k=cluster_num, dim=-1, largest=False)[0]
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + torch.rand(density.shape, generator=noise, dtype=density.dtype) * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
    delta = (dist * mask + dist_max * (1 - mask)).min(dim=-1)[0]
    index_down = torch.topk(delta * density, k=cluster_num, dim=-1)[1]
    idx_cluster = dist[torch.arange(B)[:, None], index_down].argmin(dim=1)  # index_points, then argmin
    idx_cluster[torch.arange(B)[:, None].expand(B, cluster_num).reshape(-1), index_down.reshape(-1)] = \
        torch.arange(cluster_num)[None].expand(B, cluster_num).reshape(-1)
    w = x.new_ones(B, N, 1)
    idx = idx_cluster + torch.arange(B)[:, None] * cluster_num
    all_w = w.new_zeros(B * cluster_num, 1)
    all_w.index_add_(0, idx.reshape(B * N), w.reshape(B * N, 1))
    norm_w = w / (all_w + 1e-6)[idx]
    merged = x.new_zeros(B * cluster_num, C)
    merged.index_add_(0, idx.reshape(B * N), (x * norm_w).reshape(B * N, C).type(x.dtype))
    return merged.reshape(B, cluster_num, C), index_down[0], idx_cluster[0], density[0]


def official_sparse_layer(attn, hidden_out, position_ids, rater_idx, v_start, v_num, n_s, version, noise=None):
    """One sparse layer: attn (1, H, S, S) fp16 probabilities, hidden_out (1, S, D) fp16 layer output.
    Returns kept visual indices (ascending) and, for v1, the recycled clusters (member visual indices per
    cluster, in cluster order) and their merged values."""
    text_start = v_start + v_num
    rows = rater_idx + text_start
    if version == "v2":
        seq = attn.shape[2]
        attn = attn / official_rope_weights(position_ids, seq, attn.shape[1], HD, dtype=attn.dtype)
        each = attn[0][:, rows, v_start:text_start]
        attn = attn[:, each.sum((1, 2)).topk(14)[1], :, :]
    rel = attn.mean(1)[:, rows, v_start:v_start + v_num].mean(1)
    _, ind = torch.topk(rel, min(n_s, v_num - 1), dim=1)
    mask = torch.zeros_like(rel, dtype=torch.bool)
    mask[0][ind] = 1
    kept = torch.nonzero(mask[0]).flatten().tolist()
    if version == "v2":
        return kept, None, None, None
    pruned = torch.where(mask[0] == 0)[0]
    m = int(pruned.shape[0] * 0.3) + 1
    idx2 = rel[0][pruned].topk(m)[1]
    x = hidden_out[:, v_start + pruned][:, idx2]
    c = int(x.shape[1] / 10) + 1
    merged, down, assign, density = official_cluster_and_merge(x, c, noise)
    members = pruned[idx2]
    clusters = [sorted(members[assign == j].tolist()) for j in range(c)]
    return kept, clusters, merged[0], density


# ------------------------------------------------------------------------------ random signals


def make_case(seed, version, stage, dups=48, text_dups=4):
    """Official-shape signals of one sparse layer. Returns a dict of fp32 tensors."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(SYS + NV + NT, D, generator=g) * 0.02  # layer-0 inputs (576 visual)
    emb[SYS:SYS + NV] += torch.randn(NV, 1, generator=g) * 0.05 + torch.randn(1, D, generator=g) * 0.02
    src = torch.randint(0, NT, (text_dups,), generator=g)
    emb[SYS + NV + torch.randperm(NT, generator=g)[:text_dups]] = emb[SYS + NV + src]  # duplicate text tokens
    vis_src = torch.randint(0, NV, (dups,), generator=g)
    vis_dst = torch.randperm(NV, generator=g)[:dups]
    emb[SYS + vis_dst] = emb[SYS + vis_src]
    if stage == 0:
        v = NV
        pos = torch.arange(SYS + NV + NT)
        origin = torch.arange(NV)
    else:
        v = 309 if version == "v1" else 300  # 300 kept (+ 9 recycled clusters in v1)
        origin = torch.randperm(NV, generator=g)[:v].sort().values
        if version == "v2":  # original position ids kept
            pos = torch.cat([torch.arange(SYS), SYS + origin, SYS + NV + torch.arange(NT)])
        else:  # re-indexed
            pos = torch.arange(SYS + v + NT)
    S = SYS + v + NT
    logits = torch.randn(1, HEADS, S, S, generator=g) * 2
    logits[..., SYS + torch.randperm(v, generator=g)[:25]] += 6  # a few strongly attended image tokens
    # duplicate image tokens (same key: same logit in every row and head; same hidden state)
    src = SYS + torch.randint(0, v, (dups,), generator=g)
    dst = SYS + torch.randperm(v, generator=g)[:dups]
    logits[..., dst] = logits[..., src]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1, dtype=torch.float32)
    # hidden states around 12 directions with varied spread (distinct densities, as real hidden states)
    hidden = torch.randn(12, D, generator=g)[torch.randint(0, 12, (S,), generator=g)]
    hidden += torch.randn(S, D, generator=g) * torch.rand(S, 1, generator=g)
    hidden[dst] = hidden[src]
    return dict(emb=emb, probs=probs, hidden=hidden, pos=pos, v=v, S=S, origin=origin)


def signals(case, dtype):
    S, v = case["S"], case["v"]
    visual = torch.arange(SYS, SYS + v)
    after = torch.arange(SYS + v, S)
    probs = case["probs"][0].to(dtype)
    return LLMSignals(layer=3, hidden=case["hidden"].to(dtype), position_ids=case["pos"], visual=visual,
                      origin=case["origin"], text_after=after, question=after,
                      entry_visual_embeds=case["emb"][SYS:SYS + NV].to(dtype),
                      text_embeds=case["emb"][SYS + NV:].to(dtype), num_visual_entry=NV,
                      _attn_fn=lambda rows, which, **kw: probs[:, rows],
                      _keys_fn=lambda which, rope: torch.zeros(S, HEADS, HD))


def official(case, version, n_s, noise=None, dtype=F16):
    """The official sparse layer on the case's signals in ``dtype``: fp16 under the official builder, fp32 when
    the official code runs in fp32 (it computes in its hidden states' dtype)."""
    emb = case["emb"].to(dtype)[None]
    raters = official_raters(emb, SYS, NV)
    return official_sparse_layer(case["probs"].to(dtype), case["hidden"].to(dtype)[None], case["pos"][None], raters,
                                 SYS, case["v"], n_s, version, noise)


def ours(case, version, budget, stage, dtype, numerics):
    m = SparseVLM(budget, version=version, numerics=numerics)
    sig = signals(case, dtype)
    sel = m.select_llm(stage, sig)
    return m, sig, sel


def clusters_of(sel: Selection):
    """Member visual indices per merged token (target first, then assigned), in target order."""
    out = []
    for j, t in enumerate(sel.targets.tolist()):
        mem = set(torch.nonzero(sel.assign == j).flatten().tolist()) | {t}
        out.append(sorted(mem - set(sel.keep.tolist()) | {t}))
    return out


def merge_bound(x16, clusters):
    """Per cluster and channel: how far the official fp16 merge (1/n rounded to fp16, each x/n rounded,
    n - 1 rounded fp16 additions) may be from the exact mean rounded to fp16: (n + 2) half-ulps of
    max |x| plus one ulp of the result."""
    u = 2.0 ** -11
    rows = []
    for mem in clusters:
        xm = x16[mem].float().abs().max(0).values
        rows.append((len(mem) + 2) * u * xm + 2 * u * xm)
    return torch.stack(rows)


CASES = [(seed, dtype, version, budget, stage)
         for seed in range(3) for dtype in (torch.float32, torch.float16)
         for version, budget, stage in (("v1", 192, 0), ("v1", 64, 0), ("v1", 192, 1), ("v2", 192, 0),
                                        ("v2", 128, 1))]


@pytest.mark.parametrize("seed,dtype,version,budget,stage", CASES)
def test_reference_mode_equals_the_official_selection(seed, dtype, version, budget, stage):
    case = make_case(seed, version, stage)
    m, sig, sel = ours(case, version, budget, stage, dtype, "official")
    n_s = m.stage_counts(NV)[stage]
    kept, clusters, merged, density = official(case, version, n_s, dtype=dtype)  # the run's dtype on both sides
    assert sel.keep.tolist() == kept
    if version == "v2":
        assert sel.targets is None
        return
    assert clusters_of(sel) == clusters
    # the merged values: the reference mode's merge (the official CPU index_add_ of fp16 x * fl(1/(n + 1e-6)),
    # summed in fp32 in the recycled rows' topk order) is the official fp16 merge bit for bit; the engine's fp32
    # mean of the same clusters is within the official code's own rounding
    x = sig.hidden[sig.visual]
    assert sel.arithmetic == "sequential" and sel.rule == "weighted_mean"
    assert torch.equal(merge_tokens(x, sel), merged)
    fp32 = Selection(keep=sel.keep, targets=sel.targets, assign=sel.assign, rule="mean")
    diff = (merge_tokens(x, fp32).to(dtype).float() - merged.float()).abs()
    assert bool((diff <= merge_bound(x, clusters)).all())
    if dtype != F16:  # fp32: the official noise (1e-6) is above fp32's ulps: random, not reproduced (docs/parity.md)
        return
    # with the official random density noise: unchanged, as every density is >= 2^-8 (the noise is then
    # below half an fp16 ulp)
    assert float(density.min()) >= 2.0 ** -8
    noisy = official(case, version, n_s, noise=torch.Generator().manual_seed(seed))
    assert noisy[1] == clusters and torch.equal(noisy[2], merged)


def test_official_clustering_equals_the_transcription_with_duplicates():
    # 120 recycled tokens of D = 4096 (m for P = 400), 13 clusters, 30 duplicated rows (equal densities)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(120, D, generator=g).half()
    x[torch.randperm(120, generator=g)[:30]] = x[torch.randint(0, 120, (30,), generator=g)]
    _, down, assign, _ = official_cluster_and_merge(x[None], 13)
    centres, slots = official_density_peak_clusters(x, 13)
    assert centres.tolist() == down.tolist() and slots.tolist() == assign.tolist()


# ------------------------------------------------------------------------------ worked examples


def test_worked_example_fp16_raters():
    # one visual token V = [a, 0, 0, 0], T = identity (4 text tokens): relevance = softmax([a, 0, 0, 0]),
    # mean .25. a = 1e-4: fp32 relevance[0] = e^a / (e^a + 3) = .250019 > .25 -> rater [0]; in fp16 the
    # softmax rounds every entry to .25 (half an ulp at .25 is 6.1e-5) -> no rater, as the official code
    v = torch.tensor([[1e-4, 0.0, 0.0, 0.0]])
    assert select_raters(v, torch.eye(4)).tolist() == [0]
    assert select_raters(v, torch.eye(4), "official").tolist() == []
    assert official_raters(torch.cat([v, torch.eye(4)]).half()[None], 0, 1).tolist() == []


def test_worked_example_fp16_score_tie():
    # 2 heads, 1 rater, 3 visual tokens: fp32 means .4 / .40001 / .19999 -> default keeps token 1 at k = 1;
    # in fp16 tokens 0 and 1 tie and reference mode takes what torch.topk takes on the fp16 means
    a = torch.tensor([[[.4, .40002, .19998]], [[.4, .4, .2]]])
    assert rater_scores(a).topk(1).indices.tolist() == [1]
    s16 = rater_scores(a, "official")
    assert s16.dtype == F16 and s16[0] == s16[1]
    assert s16.tolist() == a.half()[None].mean(1).mean(1)[0].tolist()


def test_worked_example_duplicate_tokens_in_the_clustering():
    # 1-D points [0, 0, 5], 2 clusters (k = 2 nearest, self included): densities 1, 1, exp(-12.5).
    # Default: the lower duplicate counts as denser, so point 1's delta is 0 -> centres 0 (score 5) and
    # 2 (5 * exp(-12.5)): clusters {0, 1}, {2}. Official (strict >): neither duplicate is denser than
    # the other, both get the largest distance 5 -> both are centres (score 5 each, topk's order) and
    # point 2 joins the first centre (equal distances, first minimum).
    x = torch.tensor([[0.0], [0.0], [5.0]])
    c, a = density_peak_clusters(x, 2)
    assert c.tolist() == [0, 2] and a.tolist() == [0, 0, 1]
    c, a = official_density_peak_clusters(x, 2)
    _, down, assign, _ = official_cluster_and_merge(x.half()[None], 2)
    assert sorted(c.tolist()) == [0, 1] and c.tolist() == down.tolist() and a.tolist() == assign.tolist()
    assert a[2] == 0


# 1-D points (C = 1), 3 clusters (k = 3 nearest, self included): three groups and one point between the first two.
#   A = 0, .125, .375    densest .125 (squared distances to its two nearest .125^2 + .25^2 = .078)
#   B = 2, 2.125, 2.5    densest 2.125 (.125^2 + .375^2 = .156); C = 10, 10.125, 10.5 the same shape
#   x = 1.125 + 2^-12    between .125 and 2.125 (1.125 is their midpoint), 2^-12 nearer to 2.125
# Centres (delta * density): .125 (the densest: the largest distance), 10.125 (nearest denser: .125),
# 2.125 (nearest denser: .125, 2 away) -> slots 0, 1, 2 = points 1, 7, 4; x's delta * density is lower.
# fp32: x joins 2.125 (slot 2). fp16 (ulp 2^-10 at 1.125): x rounds to 1.125, equidistant, and joins the first
# centre in topk order, .125 (slot 0). The official cluster_and_merge computes in its hidden states' dtype.
THREE_GROUPS = torch.tensor([0, .125, .375, 2, 2.125, 2.5, 10, 10.125, 10.5, 1.125 + 2 ** -12])[:, None]


def test_worked_example_clustering_in_the_run_dtype():
    x = THREE_GROUPS
    for dtype, slot in ((torch.float32, 2), (F16, 0)):
        c, a = official_density_peak_clusters(x, 3, dtype)
        assert c.tolist() == [1, 7, 4] and a.tolist() == [0, 0, 0, 2, 2, 2, 1, 1, 1, slot]
        _, down, assign, _ = official_cluster_and_merge(x.to(dtype)[None], 3)
        assert c.tolist() == down.tolist() and a.tolist() == assign.tolist()
    assert official_density_peak_clusters(x, 3)[1][9] == 0  # the default: the official builder's fp16


@pytest.mark.parametrize("dtype,slot", [(torch.float32, 2), (F16, 0)])
def test_reference_mode_clusters_in_the_run_dtype(dtype, slot):
    # parity, LLaVA-1.5 fp32, seed 4, T = 128 / 96 / 64, image 3: the reference mode clustered the fp32 run's
    # recycled tokens in fp16 and one joined another cluster. One sparse stage on 11 visual tokens whose states
    # are [100] + the ten points above, one text token after them (it rates), one head: token 0 scores highest
    # and is kept (schedule 60 of 576: floor(11 * 60 / 576) = 1), the ten others are pruned and all recycled
    # (ratio 1) into int(10 / 4) + 1 = 3 clusters, in score order = index order. x (visual 10) joins the centre
    # 2.125 (visual 5) in an fp32 run, .125 (visual 2) in an fp16 one.
    S = 12
    hidden = torch.cat([torch.tensor([[100.0]]), THREE_GROUPS, torch.zeros(1, 1)]).to(dtype)
    row = torch.cat([torch.tensor([1.0]), 0.5 - 0.01 * torch.arange(1, 11), torch.zeros(1)])  # (S,)
    probs = row[None, None].expand(1, S, S).to(dtype)  # (H, rows, S): every row the same
    sig = LLMSignals(layer=3, hidden=hidden, position_ids=torch.arange(S), visual=torch.arange(11),
                     origin=torch.arange(11), text_after=torch.tensor([11]), question=torch.tensor([11]),
                     entry_visual_embeds=torch.ones(11, 1, dtype=dtype), text_embeds=torch.ones(1, 1, dtype=dtype),
                     num_visual_entry=11, _attn_fn=lambda rows, which, **kw: probs[:, rows],
                     _keys_fn=lambda which, rope: torch.zeros(S, 1, 1))
    m = SparseVLM(schedule=(60,), layers=(2,), recycle_ratio=1.0, cluster_divisor=4, numerics="official")
    assert m.stage_counts(11) == (1,)
    sel = m.select_llm(0, sig)
    assert sel.keep.tolist() == [0] and sel.targets.tolist() == [2, 8, 5]
    assert sel.assign.tolist() == [-1, 0, 0, 0, 2, 2, 2, 1, 1, 1, slot]


def test_worked_example_gravity_in_fp16():
    # gravity of positions 0..3 against 0..3 at d = 8: diagonal 2 * 4 / sqrt(8) = 2.828 (fp16 2.828125);
    # the official fp16 rounding of the rotated rows differs from the fp64 closed form by < 1e-2
    from baselines.sparsevlm import rope_gravity
    pos = torch.arange(4)
    g16 = official_rope_gravity(pos, pos, 8)
    assert g16.dtype == F16 and float(g16[0, 0]) == 2.828125
    assert torch.equal(g16, official_rope_weights(pos[None], 4, 1, 8)[0, 0])
    assert (g16.double() - rope_gravity(pos, pos, 8)).abs().max() < 1e-2


def test_method_option():
    assert SparseVLM().numerics == "ours" and SparseVLM(numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        SparseVLM(numerics="fp16")


# ------------------------------------------------------------------------------ tiny models, engine


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models (v1, recycling on): batch 3 selections equal each sample alone,
    and cached generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "sparsevlm", 192, stage=0)
