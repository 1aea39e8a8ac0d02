"""VisionDrop reference mode (``numerics="official"``) against transcriptions of the official selection.

Official source (read, not copied): Ruixxxx/VisionDrop
  * stage 0 (CLIP select layer): ``llava/visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``
    (VisionZip's code): [CLS] row of ``attentions[-2]`` summed over heads, ``topk(dominant_num, dim=1)``
    (``llava/visionzip/main.py`` passes ``dominant - 1``; [CLS] index 0 prepended), dominant tokens by
    ``masked_select`` (index order); the rest: metric (head-mean keys, ``llava/visionzip/utils.py``
    ``CLIPAttention_forward``) normalised by ``m / m.norm()``, targets ``arange(0, R, step)[:C]``,
    ``bmm`` similarity, ``argmax`` one-hot, ``bmm(one_hot^T, hidden) / counts`` + target, output
    ``.to(images.dtype)`` (fp16). The tower is fp32: ``llava/model/builder.py`` ``load_pretrained_model``
    (default ``device_map='auto'``, as ``llava/eval_visiondrop/model_vqa_loader.py`` calls it) casts it to
    fp16 only when ``device_map != 'auto'``;
  * stages 1-3 (before LLM layers 8 / 16 / 24): ``llava/model/modeling_llama_visiondrop.py``
    ``LlamaModel.visiondrop_rank_drop`` (fp16 LLM: ``torch_dtype=torch.float16``): the image tokens' queries
    under the layer's norm + q/k + RoPE, ``softmax(.., dtype=torch.float32).to(query_states.dtype)``
    (fp16), ``torch.mean(attn, dim=0)`` (heads, fp16), image columns, ``torch.mean(.., dim=0)`` (image
    queries, fp16), ``topk(dominant_num)``, dominant tokens by a boolean mask (index order); metric
    ``cur_key_states.mean(0)`` (RoPE-rotated keys, head mean in fp16), ``m / m.norm()``, uniform targets,
    ``torch.matmul`` similarity (fp16), ``argmax(dim=1)`` one-hot in the hidden dtype (fp16),
    ``matmul(one_hot.T, hidden) / counts`` + target (fp16), output [dominant..., contextual...].

Compared with ``visiondrop.visiondrop`` on random tensors with the official shapes - stage 0: CLIP
ViT-L/14-336 (577 tokens, 16 heads, width 1024, head dim 64) at 42+6 / 84+12 / 168+24 / 252+36; LLM stages:
LLaMA-7B (32 heads, head dim 128, width 4096; 35 prefix + current image tokens + 40 text tokens) for the
budget-32 and budget-192 schedules - with fp32 and fp16 signals, planted duplicate tokens (identical
keys, hidden states and received attention: exact ties in scores and similarities) and, in half of the
cases, an exact score tie planted across the top-k cut.
"""

import pytest
import torch
from conftest import FAMILIES

from llava.ops import merge_tokens
from llava.selection import Selection
from visiondrop.visiondrop import (VisionDrop, image_schedule, llm_stage_metric, llm_stage_score, llm_stage_select,
                                   stage0_scores, stage0_unit)


def plant_tie(cols, score_fn, k, causal=False):
    """Make the tokens ranked k-1 and k by ``score_fn(cols)`` (the last kept and the first dropped) tie
    exactly: both columns of ``cols`` (H, Q, T) become the same vector (``causal``: zero in the query rows
    before the later of the two), scaled so that their score lies halfway between the neighbours ranked
    k-2 and k+1 (so the tie straddles the cut). In place."""
    score = score_fn(cols)
    order = score.sort(descending=True).indices
    a, b = int(order[k - 1]), int(order[k])
    col = cols[..., a].clone()
    if causal:
        col[:, :max(a, b)] = 0
    target = (score[order[k - 2]] + score[order[k + 1]]) / 2
    col = col * (target / score_fn(col[..., None])[0])
    cols[..., a] = col
    cols[..., b] = col


# ------------------------------------------------------------------------------ stage 0 (CLIP tower)

N, H, W, HD = 577, 16, 1024, 64


def official_stage0(attn, hidden, metric, dominant_num, contextual_num):
    """Transcription of ``CLIPVisionTower_VisionZip.forward`` after the tower ran (batch 1, fp32 tower):
    attn (1, H, 1, N) = the [CLS] query row of ``attentions[-2]`` (the only row it reads), hidden (1, N, W),
    metric (1, N, d). ``dominant_num`` = D0 - 1. Returns (dominant indices ascending, target positions
    among the filtered tokens, assignment, output tokens in fp16)."""
    cls_sum = attn[:, :, 0, 1:].sum(dim=1)
    top = cls_sum.topk(dominant_num, dim=1).indices + 1
    chosen = torch.cat([torch.zeros((1, 1), dtype=top.dtype), top], dim=1)
    rest = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, chosen, False)
    dom = hidden.masked_select(~rest.unsqueeze(-1)).view(1, dominant_num + 1, W)
    m = metric[rest].view(1, N - dominant_num - 1, metric.shape[2])
    h = hidden.masked_select(rest.unsqueeze(-1)).view(1, N - dominant_num - 1, W)
    m = m / m.norm(dim=-1, keepdim=True)
    step = max(1, m.shape[1] // contextual_num)
    tgt = torch.arange(0, m.shape[1], step)[:contextual_num]
    other = ~torch.isin(torch.arange(m.shape[1]), tgt)
    sim = torch.bmm(m[:, other, :], m[:, tgt, :].transpose(1, 2))
    slot = sim.argmax(dim=2)
    one_hot = torch.zeros(1, int(other.sum()), contextual_num, dtype=h.dtype).scatter_(2, slot.unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    ctx = h[:, tgt, :] + torch.bmm(one_hot.transpose(1, 2), h[:, other, :]) / counts
    out = torch.cat([dom, ctx], dim=1).to(torch.float16)  # .to(images.dtype)
    return torch.nonzero(~rest[0]).flatten(), tgt, slot[0], out[0]


def random_tower(seed, d0, dups=80, cut=False):
    """[CLS] row probabilities (1, H, 1, N) (peaked), hidden states, head-mean keys; ``dups`` planted
    duplicate patches (same probability in every head, same key, same hidden state); with ``cut`` the
    patches ranked D0-2 and D0-1 (the last dominant one and the first left out) tie exactly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, H, 1, N, generator=g)
    logits[..., 1 + torch.randperm(N - 1, generator=g)[:30]] += 5
    hidden = torch.randn(1, N, W, generator=g) * 2
    metric = torch.randn(1, N, HD, generator=g)
    metric = metric + torch.randn(6, HD, generator=g)[torch.randint(0, 6, (N,), generator=g)]
    src = 1 + torch.randint(0, N - 1, (dups,), generator=g)
    dst = 1 + torch.randperm(N - 1, generator=g)[:dups]
    logits[..., dst] = logits[..., src]
    metric[:, dst] = metric[:, src]
    hidden[:, dst] = hidden[:, src]
    attn = logits.softmax(-1)
    if cut:
        # among the patches ([CLS] is forced), score = head sum (H, 1, 576) -> (576,)
        plant_tie(attn[0, :, :, 1:], lambda x: x.sum(0)[0], d0 - 1)
    return attn, hidden, metric


# our layout (LLaVA-1.5): patches 0..575 (official 1..576), then the [CLS] candidate 576 (official 0)
PERM = torch.cat([torch.arange(1, N), torch.zeros(1, dtype=torch.long)])


def ours_stage0(attn, hidden, metric, d0, c0, numerics):
    a = stage0_scores(attn[0, :, 0, PERM], "sum", numerics)
    dom, tg, asg = stage0_unit(a, metric[0, PERM], torch.arange(N - 1), torch.tensor([N - 1]), d0, c0, N, numerics)
    sel = Selection(keep=dom, targets=tg, assign=asg, rule="target_plus_mean")
    return sel, merge_tokens(hidden[0, PERM], sel)


def stage0_agrees(attn, hidden, metric, d0, c0, numerics, dtype):
    """(index sets / targets / assignment identical, contextual values) of ours against the official."""
    attn, hidden, metric = (t.to(dtype) for t in (attn, hidden, metric))
    off_dom, off_tgt, off_slot, off_out = official_stage0(attn.float(), hidden.float(), metric.float(), d0 - 1, c0)
    sel, merged = ours_stage0(attn, hidden, metric, d0, c0, numerics)
    dom = PERM[sel.keep]
    same = dom[0] == 0 and dom[1:].tolist() == sorted(dom[1:].tolist())  # [CLS] first, then index order
    same = same and sorted(dom.tolist()) == off_dom.tolist()
    filtered = [i for i in range(N) if i not in set(off_dom.tolist())]
    same = same and PERM[sel.targets].tolist() == [filtered[p] for p in off_tgt.tolist()]
    others = [filtered[p] for p in range(len(filtered)) if p not in set(off_tgt.tolist())]
    assign = torch.empty(N, dtype=torch.long)
    assign[PERM] = sel.assign
    same = same and assign[others].tolist() == off_slot.tolist()
    return bool(same), hidden[0, PERM[sel.keep]].float(), merged, off_out


STAGE0 = [(seed, dtype, d0, c0, cut) for seed in range(2) for dtype in (torch.float32, torch.float16)
          for d0, c0 in ((42, 6), (84, 12), (168, 24), (252, 36)) for cut in (False, True)]


@pytest.mark.parametrize("seed,dtype,d0,c0,cut", STAGE0)
def test_stage0_reference_mode_equals_the_official_selection_and_merge(seed, dtype, d0, c0, cut):
    attn, hidden, metric = random_tower(seed, d0, cut=cut)
    same, dominant, merged, off_out = stage0_agrees(attn, hidden, metric, d0, c0, "official", dtype)
    assert same
    # dominant rows exact; contextual rows = the official fp16 output within one fp16 rounding (our fp32
    # merge sums in another order than the official fp32 bmm)
    assert torch.equal(dominant.half(), off_out[:d0])
    torch.testing.assert_close(merged.half(), off_out[d0:], rtol=2 ** -10, atol=2 ** -14)


def test_stage0_planted_tie_straddles_the_cut():
    attn, _, _ = random_tower(0, 42, cut=True)
    s = attn[0, :, 0, 1:].sum(0).sort(descending=True).values
    assert s[40] == s[41] and s[39] > s[40] > s[42]


# ------------------------------------------------------------------------------ LLM stages (fp16 LLM)

SYS, NT, LH, LHD, LW = 35, 40, 32, 128, 4096


def official_llm_stage(probs, keys, hidden, dominant_num, contextual_num, image_index=SYS):
    """Transcription of the inference branch of ``visiondrop_rank_drop`` for one sample from the fp32
    softmax output on: probs (H, Nv, S) = the image queries' causal softmax in fp32, keys (H, S, d) the
    layer's RoPE-rotated keys (fp16), hidden (Nv, D) the image tokens' hidden states (fp16). Returns
    (dominant indices ascending, target positions among the filtered tokens, assignment, output (fp16))."""
    nv = hidden.shape[0]
    attn = probs.to(torch.float16)  # .to(query_states.dtype)
    avg_head = torch.mean(attn, dim=0)
    avg_head = avg_head[:, image_index:image_index + nv]
    avg_image = torch.mean(avg_head, dim=0)
    metric = keys.mean(0)[image_index:image_index + nv, :]
    top = avg_image.topk(dominant_num).indices
    mask = torch.ones_like(hidden[:, 0], dtype=torch.bool)
    mask[top] = False
    dom = hidden[~mask].view(dominant_num, hidden.shape[1])
    m = metric[mask].view(nv - dominant_num, metric.shape[1])
    h = hidden[mask].view(nv - dominant_num, hidden.shape[1])
    m = m / m.norm(dim=-1, keepdim=True)
    step = max(1, m.shape[0] // contextual_num)
    tgt = torch.arange(0, m.shape[0], step)[:contextual_num]
    other = ~torch.isin(torch.arange(m.shape[0]), tgt)
    sim = torch.matmul(m[other, :], m[tgt, :].T)
    slot = sim.argmax(dim=1, keepdim=True)
    one_hot = torch.zeros(int(other.sum()), contextual_num, dtype=h.dtype).scatter_(1, slot, 1)
    counts = one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
    ctx = h[tgt, :] + torch.matmul(one_hot.T, h[other, :]) / counts
    out = torch.cat([dom, ctx], dim=0).to(hidden.dtype)
    return torch.nonzero(~mask).flatten(), tgt, slot[:, 0], out


def random_llm(seed, nv, dominant, dups=None, cut=False):
    """Image-query probabilities (H, Nv, S) (causal softmax in fp32, a few strongly attended image
    tokens), keys (H, S, d) and hidden states (Nv, D) with fp16 values (as the fp16 LLM holds them);
    ``dups`` planted duplicate image tokens (same key, same hidden state, same received attention -
    columns equal, zero above both diagonals - so exact ties in the score and the similarity); with
    ``cut`` an exact score tie between the last dominant token and the first merged one."""
    g = torch.Generator().manual_seed(seed)
    s = SYS + nv + NT
    dups = nv // 6 if dups is None else dups
    logits = torch.randn(LH, nv, s, generator=g) * 2
    logits[..., SYS + torch.randperm(nv, generator=g)[:max(2, nv // 20)]] += 5
    future = torch.arange(s)[None, :] > (SYS + torch.arange(nv))[:, None]
    probs = logits.masked_fill(future, float("-inf")).softmax(-1)
    keys = torch.randn(LH, s, LHD, generator=g)
    keys = keys + 2 * torch.randn(5, LHD, generator=g)[torch.randint(0, 5, (s,), generator=g)]
    keys = keys.half().float()
    hidden = (torch.randn(nv, LW, generator=g) * 3).half().float()
    src = torch.randint(0, nv, (dups,), generator=g)
    dst = torch.randperm(nv, generator=g)[:dups]
    for a, b in zip(src.tolist(), dst.tolist()):
        if a == b:
            continue
        col = probs[:, :, SYS + a].clone()
        col[:, :max(a, b)] = 0  # rows where either token is still in the future
        probs[:, :, SYS + a] = col
        probs[:, :, SYS + b] = col
        keys[:, SYS + b] = keys[:, SYS + a]
        hidden[b] = hidden[a]
    if cut:
        plant_tie(probs[:, :, SYS:SYS + nv], lambda x: x.mean(0).mean(0), dominant, causal=True)
    return probs, keys, hidden


def llm_agrees(probs, keys, hidden, d, c, numerics, dtype):
    """(index sets / targets / assignment identical, ours merged (fp32), official output (fp16))."""
    nv = hidden.shape[0]
    off_dom, off_tgt, off_slot, off_out = official_llm_stage(probs, keys.half(), hidden.half(), d, c)
    img = slice(SYS, SYS + nv)
    score = llm_stage_score(probs.to(dtype), torch.arange(SYS, SYS + nv), numerics)  # (H, Nv, S) as the signal
    metric = llm_stage_metric(keys.transpose(0, 1)[img].to(dtype), numerics)  # (Nv, H, d) as sig.keys gives
    sel = llm_stage_select(score, metric, d, c, numerics)
    same = sel.keep.tolist() == off_dom.tolist()
    filtered = [i for i in range(nv) if i not in set(off_dom.tolist())]
    same = same and sel.targets.tolist() == [filtered[p] for p in off_tgt.tolist()]
    others = [filtered[p] for p in range(len(filtered)) if p not in set(off_tgt.tolist())]
    same = same and sel.assign[others].tolist() == off_slot.tolist()
    return bool(same), sel, merge_tokens(hidden.to(dtype), sel), off_out


# (current image tokens, dominant, contextual): budget 32 (official) and budget 192 (x6) schedules
LLM_STAGES = [(sum(image_schedule(b)[s]), *image_schedule(b)[s + 1]) for b in (32, 192) for s in range(3)]
LLM_CASES = [(seed, dtype, nv, d, c, cut) for seed in range(2) for dtype in (torch.float32, torch.float16)
             for nv, d, c in LLM_STAGES for cut in (False, True)]


def test_llm_stage_shapes():
    assert LLM_STAGES == [(48, 30, 5), (35, 22, 4), (26, 16, 3), (288, 180, 30), (210, 132, 24), (156, 96, 18)]


@pytest.mark.parametrize("seed,dtype,nv,d,c,cut", LLM_CASES)
def test_llm_stage_reference_mode_equals_the_official_selection(seed, dtype, nv, d, c, cut):
    probs, keys, hidden = random_llm(seed, nv, d, cut=cut)
    same, sel, merged, off_out = llm_agrees(probs, keys, hidden, d, c, "official", dtype)
    assert same
    assert torch.equal(hidden.half()[sel.keep], off_out[:d])  # dominant rows, [dominant..., contextual...]
    # contextual rows: the official merge is fp16 (one-hot matmul, / counts, + target, each rounded);
    # our fp32 merge, cast to fp16, is within that formula's own rounding plus one fp16 rounding
    off16 = off_out[d:].float()
    h = hidden.half()
    off32 = official_llm_stage(probs, keys.half(), h.float(), d, c)[3][d:]  # same formula in fp32
    own = (off16 - off32).abs()
    # (one fp16 rounding of ours: half an ulp of |merged|; fp32 summation order: far below 2^-20 here)
    assert ((merged.half().float() - off16).abs() <= own + (off16.abs() + merged.abs()) * 2 ** -10 + 2 ** -20).all()
    if dtype == torch.float16:  # fp16 rows: the reference mode's merge rounds where the official one does
        assert sel.arithmetic == "sequential" and torch.equal(merged, off_out[d:])


def test_llm_planted_ties_are_real():
    probs, keys, _ = random_llm(0, 48, 30, cut=True)
    # the official fp16 score (the planted columns are identical)
    s = probs.half().mean(0)[:, SYS:SYS + 48].mean(0).sort(descending=True).values
    assert s[29] == s[30] and s[28] > s[29] > s[31]
    # planted duplicates: exact ties in the fp16 similarity too (identical metric rows)
    m = keys.half().mean(0)[SYS:SYS + 48]
    assert m.unique(dim=0).shape[0] < 48


def test_worked_example_llm_stage():
    # 2 heads, 4 visual tokens, queries = the visual tokens; scores (mean over heads, then queries):
    #   fp32: token 0 .40002, token 1 .4000025 -> default keeps 0;
    #   fp16: heads round to .39990234 / .40014648 (grid near .4), token 1's mean .40008545 -> .40014648 > token
    #   0's .39990234 -> reference mode keeps 1 (as the official code)
    p = torch.zeros(4, 1, 4)
    p[:, 0, 0] = .40002
    p[:, 0, 1] = torch.tensor([.40003, .40003, .40003, .39992])
    p[:, 0, 2:] = torch.tensor([.1, .05])
    vis = torch.arange(4)
    assert llm_stage_score(p, vis).argmax().item() == 0
    assert llm_stage_score(p, vis, "official").argmax().item() == 1
    # merge metric: token 2 and 3 remain (targets: 2, then 3 merges into it)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.9]])
    sel = llm_stage_select(llm_stage_score(p, vis), keys, 1, 1)
    assert sel.keep.tolist() == [0] and sel.targets.tolist() == [1] and sel.assign.tolist() == [-1, -1, 0, 0]
    sel = llm_stage_select(llm_stage_score(p, vis, "official"), keys, 1, 1, "official")
    assert sel.keep.tolist() == [1] and sel.targets.tolist() == [0] and sel.assign.tolist() == [-1, -1, 0, 0]
    off_dom, off_tgt, off_slot, _ = official_llm_stage(p.expand(4, 4, 4), keys[None].half(), torch.eye(4).half(),
                                                       1, 1, image_index=0)
    assert off_dom.tolist() == [1] and off_tgt.tolist() == [0] and off_slot.tolist() == [0, 0]


def test_worked_example_fp16_similarity_tie():
    # metric in fp16: tokens 1 and 2 (targets 0 and 1 of the remaining list [1, 2, 3], C = 2 -> step 1,
    # targets positions 0, 1) and token 3 with cosines .99995 / .99996 in fp32 but equal in fp16 (both 1.0):
    # the default joins target 1 (the larger fp32 cosine), reference mode target 0 (argmax: first maximum)
    keys = torch.tensor([[5.0, 5.0], [1.0, 0.010], [1.0, 0.0089], [1.0, 0.0]])
    m = keys / keys.norm(dim=-1, keepdim=True)
    cos32 = m[3] @ m[1:3].T
    assert cos32[1] > cos32[0]
    mh = keys.half() / keys.half().norm(dim=-1, keepdim=True)
    assert (mh[3] @ mh[1:3].T).unique().numel() == 1
    score = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert llm_stage_select(score, keys, 1, 2).assign.tolist() == [-1, -1, -1, 1]
    assert llm_stage_select(score, keys, 1, 2, "official").assign.tolist() == [-1, -1, -1, 0]


def test_llm_stage_assignment_in_the_models_dtype():
    """The official similarity runs in its LLM's dtype: fp32 in an fp32 run, where the cosines of the tie above
    differ (.99995 / .99996) and token 3 joins target 1; the fp16 run ties and joins target 0. The method passes
    its LLM's dtype (``sig.hidden``); the LLM-stage assignment cast the metric to fp16 always. Fails without
    the fix."""
    from types import SimpleNamespace

    keys = torch.tensor([[5.0, 5.0], [1.0, 0.010], [1.0, 0.0089], [1.0, 0.0]])
    score = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert llm_stage_select(score, keys, 1, 2, "official", dtype=torch.float32).assign.tolist() == [-1, -1, -1, 1]
    assert llm_stage_select(score, keys, 1, 2, "official", dtype=torch.float16).assign.tolist() == [-1, -1, -1, 0]

    def assign(dtype):  # one LLM stage (D = 1, C = 2) on a signal of this dtype: token 0 dominant, as above
        probs = torch.zeros(1, 4, 4)
        probs[..., 0] = 1.0
        sig = SimpleNamespace(state={}, vision=None, num_visual=4, visual=torch.arange(4),
                              hidden=torch.zeros(4, 2, dtype=dtype), attention=lambda *a, **kw: probs.to(dtype),
                              keys=lambda *a, **kw: keys[:, None].to(dtype))  # (S, H_kv, d)
        m = VisionDrop(32, numerics="official", schedule=((8, 2), (1, 2), (1, 1), (1, 1)))
        m.setup(num_layers=4, num_vision_layers=2, family="llava")
        sel = m.select_llm(0, sig)
        assert sel.keep.tolist() == [0] and sel.targets.tolist() == [1, 2]
        return sel.assign.tolist()

    assert assign(torch.float32) == [-1, -1, -1, 1]
    assert assign(torch.float16) == [-1, -1, -1, 0]


def test_method_option():
    assert VisionDrop(32).numerics == "ours" and VisionDrop(32, numerics="official").numerics == "official"
    with pytest.raises(ValueError, match="numerics"):
        VisionDrop(32, numerics="fp16")
    for fn, args in ((llm_stage_score, (torch.ones(2, 3, 3), torch.arange(3))),
                     (llm_stage_metric, (torch.ones(3, 2, 4),)), (stage0_scores, (torch.ones(2, 3), "sum"))):
        with pytest.raises(ValueError, match="numerics"):
            fn(*args, numerics="half")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": 8, "llava_next": 8, "video_llava": 4}


@pytest.mark.parametrize("stage", ["vision", 0])
@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt, stage):
    """Reference mode on the tiny models: batch 3 selections (stage 0 in the tower, the first LLM stage)
    equal each sample alone, and cached generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "visiondrop", ENGINE_ARGS[rt.family], stage=stage)
