"""DUET-VLM reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): AMD-AGI/DUET-VLM @ cd69e489f39a2a51e3b278a470dc8dc32c00e0fb
  * stage 1, ``visionzip/clip_encoder_cw.py`` ``CLIPVisionTower_VisionZip.forward`` (lines 50-144) after the
    tower ran (fp32: ``llava/model/builder.py`` leaves the tower uncast): the [CLS] row of ``attentions[-2]``
    summed over heads, ``topk(dominant_num, dim=1)`` (+1, the [CLS] index 0 prepended; ``visionzip/main.py``
    passes ``dominant - 1``), a boolean mask, the dominant tokens by ``masked_select`` (index order); the
    leftovers' metric normalised by ``m / m.norm()``, their scores by ``masked_select``; the pool
    ``topk(min(max(1, w*C), M), dim=1)``; anchors ``arange(0, P, max(1, P // max(1, C)))[:C]`` of the pool;
    the other pool entries assigned by ``bmm`` + ``argmax``; ``target + bmm(one_hot^T, hidden) / counts``; the
    output ``.to(images.dtype)`` (fp16); the metric = the head mean of the select layer's raw ``k_proj``
    output (``visionzip/utils.py``);
  * stage 2, ``llava/model/modeling_llama_pdrop.py`` ``pdrop_rank_drop`` (inference branch, salient words off
    as ``config.use_salient_tokens`` is False for the public checkpoints): query rows
    ``image_index + image_tokens:`` (every row after the image), ``matmul(q, k^T) / sqrt(d)`` + the 4-D causal
    mask, ``softmax(.., dtype=float32).to(query dtype)`` (fp16), ``mean(dim=0)`` over heads, the image
    columns, ``mean(dim=0)`` over the rows, ``topk(int(N * ratio))``, ``+ image_index``, ``sort``.

Stage 1 is compared with ``baselines.duet.duet_vision`` on random select-layer tensors of the official shapes
(577 tokens, 16 heads, width 1024, key width 64; batches of 1 and 3) at 300 + 7 (budget 192), 170 + 35 (128) and
85 + 17 (64, our design), w = 4, fp32 and fp16-valued, with planted duplicate patches (exact ties in the scores
and keys): identical dominant sets, anchors in the official order, assignments, dropped leftovers, and the
output tokens equal to the official fp16 output (the contextual ones within one fp16 rounding). Stage 2 is
compared with ``baselines.duet.duet_rank`` on random rows of the official shapes (32 heads, 35 prefix tokens,
the stage's image tokens, 40 text rows; 307 -> 153 -> 0 and 205 -> 102 -> 0).
"""

import math

import pytest
import torch
from conftest import FAMILIES

import baselines.duet  # noqa: F401  (registers "duet")
from baselines.duet import DUET, duet_rank, duet_vision
from llava.ops import merge_tokens
from llava.attention_rows import causal_attention_rows

N, H, W, HD = 577, 16, 1024, 64
CONFIGS = [(300, 7), (170, 35), (85, 17)]  # budgets 192 / 128 (official) and 64 (our design)


# ------------------------------------------------------------------ stage 1: the official code, transcribed


def official_stage1(cls_row, hidden, metric, dominant_num, contextual_num, cluster_width=4,
                    out_dtype=torch.float16):
    """``CLIPVisionTower_VisionZip.forward`` after the tower, batch B: cls_row (B, H, 577) = the [CLS] query row
    of ``attentions[-2]`` (the only row it reads), hidden (B, 577, W) = ``hidden_states[-2]``, metric
    (B, 577, d). ``dominant_num`` = D - 1. Returns per sample (dominant official indices ascending, anchors
    and members as official token indices in pool-rank order, the member slots) and the output (B, D + C, W)
    in ``out_dtype`` (the images' dtype: fp16 in the official runs)."""
    B, S, C = hidden.shape
    cls_sum = cls_row[:, :, 1:].sum(dim=1)  # (B, 576)
    picked = cls_sum.topk(dominant_num, dim=1).indices + 1
    with_cls = torch.cat([torch.zeros((B, 1), dtype=picked.dtype), picked], dim=1)
    left = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, with_cls, False)
    dominant = hidden.masked_select(~left.unsqueeze(-1)).view(B, dominant_num + 1, C)
    M = S - (dominant_num + 1)
    m = metric[left].view(B, M, metric.shape[2])
    h_left = hidden.masked_select(left.unsqueeze(-1)).view(B, M, C)
    m = m / m.norm(dim=-1, keepdim=True)
    s_left = cls_sum.masked_select(left[:, 1:]).view(B, M)
    P = min(max(1, cluster_width * contextual_num), M)
    pool = s_left.topk(P, dim=1).indices  # positions among the leftovers, best first
    step = max(1, P // max(1, contextual_num))
    anchor_pos = torch.arange(0, P, step)[:contextual_num]
    if anchor_pos.numel() == 0:
        anchor_pos = torch.tensor([0])
    anchor_pos = anchor_pos.unsqueeze(0).expand(B, -1)
    anchors = pool.gather(1, anchor_pos)
    not_anchor = torch.ones(P, dtype=torch.bool)
    not_anchor[anchor_pos[0]] = False
    members = pool[:, not_anchor]
    grab = lambda idx, d: idx.unsqueeze(-1).expand(-1, -1, d)  # noqa: E731
    m_anchor = torch.gather(m, 1, grab(anchors, m.shape[2]))
    if members.shape[1] > 0:
        m_member = torch.gather(m, 1, grab(members, m.shape[2]))
        slot = torch.bmm(m_member, m_anchor.transpose(1, 2)).argmax(dim=2)
        one_hot = torch.zeros(B, members.shape[1], anchors.shape[1], dtype=h_left.dtype)
        one_hot.scatter_(2, slot.unsqueeze(-1), 1)
        counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
        mean = torch.bmm(one_hot.transpose(1, 2), torch.gather(h_left, 1, grab(members, C))) / counts
    else:
        slot = torch.zeros(B, 0, dtype=torch.long)
        mean = torch.zeros(B, anchors.shape[1], C, dtype=h_left.dtype)
    contextual = torch.gather(h_left, 1, grab(anchors, C)) + mean
    out = torch.cat([dominant, contextual], dim=1).to(out_dtype)  # .to(images.dtype)
    per_sample = []
    for b in range(B):
        left_idx = torch.nonzero(left[b]).flatten()  # leftover position -> official token index
        per_sample.append((with_cls[b].sort().values.tolist(), left_idx[anchors[b]].tolist(),
                           left_idx[members[b]].tolist(), slot[b].tolist()))
    return per_sample, out


def random_layer(seed, batch=1, dups=80):
    """Select-layer tensors: the [CLS] row (B, H, 577) softmax of random logits with 30 peaked patches, hidden
    states, head-mean keys in 6 loose clusters; ``dups`` planted duplicate patches (same [CLS] logit in every
    head, same key: exact ties in the head sums and the cosines)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, H, N, generator=g)
    for b in range(batch):
        logits[b, :, 1 + torch.randperm(N - 1, generator=g)[:30]] += 5
    hidden = torch.randn(batch, N, W, generator=g) * 2
    centres = torch.randn(6, HD, generator=g)
    metric = torch.randn(batch, N, HD, generator=g) + 0.5 * centres[torch.randint(0, 6, (batch, N), generator=g)]
    src = 1 + torch.randint(0, N - 1, (dups,), generator=g)
    dst = 1 + torch.randperm(N - 1, generator=g)[:dups]
    logits[:, :, dst] = logits[:, :, src]
    metric[:, dst] = metric[:, src]
    return logits.softmax(-1), hidden, metric


# our layout: patches 0..575 (official 1..576), then the [CLS] candidate 576 (official 0)
TO_OFFICIAL = torch.cat([torch.arange(1, N), torch.zeros(1, dtype=torch.long)])
UNIT = torch.zeros(N, dtype=torch.long)
PATCH = torch.cat([torch.arange(N - 1), torch.tensor([-1])])


def ours_stage1(cls_row, hidden, metric, b, d, c, numerics):
    """Our selection of sample b and its outputs in feeding order (fp32)."""
    sel = duet_vision(cls_row[b][:, TO_OFFICIAL], metric[b, TO_OFFICIAL], UNIT, PATCH, d, c, 4, num_stock=N - 1,
                      numerics=numerics)
    x = hidden[b, TO_OFFICIAL].float()
    return sel, torch.cat([x[sel.keep], merge_tokens(x, sel)])


def compare_stage1(cls_row, hidden, metric, d, c, numerics):
    """Per sample: (same selection as the official, ours, official) for a batch of select-layer tensors."""
    off, off_out = official_stage1(cls_row.float(), hidden.float(), metric.float(), d - 1, c)  # fp32 tower
    out = []
    for b, (dom, anchors, members, slots) in enumerate(off):
        sel, mine = ours_stage1(cls_row, hidden, metric, b, d, c, numerics)
        assign = torch.empty(N, dtype=torch.long)
        assign[TO_OFFICIAL] = sel.assign
        member_set = set(members)
        same = (sorted(TO_OFFICIAL[sel.keep].tolist()) == dom
                and TO_OFFICIAL[sel.targets].tolist() == anchors
                and assign[members].tolist() == slots
                # every leftover outside the pool is dropped: assigned nowhere
                and all(assign[i] == -1 for i in range(N) if i not in member_set))
        out.append((same, sel, mine, off_out[b]))
    return out


CASES = [(seed, dtype, d, c) for seed in range(4) for dtype in (torch.float32, torch.float16) for d, c in CONFIGS]


@pytest.mark.parametrize("seed,dtype,d,c", CASES)
def test_stage1_reference_mode_equals_the_official_selection_and_merge(seed, dtype, d, c):
    batch = 1 if seed < 2 else 3  # the official batched call (B, ...) and one image alone
    cls_row, hidden, metric = (t.to(dtype) for t in random_layer(seed, batch))
    for same, sel, mine, off_out in compare_stage1(cls_row, hidden, metric, d, c, "official"):
        assert same
        assert sel.num_out == d + c
        # the official output order: [CLS], dominant patches ascending, contextual tokens in pool-rank order;
        # dominant rows exact, contextual rows within one fp16 rounding (another fp32 summation order)
        assert torch.equal(mine[:d].half(), off_out[:d])
        torch.testing.assert_close(mine[d:].half(), off_out[d:], rtol=2 ** -10, atol=2 ** -14)


#: default-mode agreement (48 samples: the 24 cases above, 1 or 3 samples each). Without planted ties the
#: default mode (stable top-k, ties to the lower index; the cosine with a clamped norm) selects exactly as the
#: official code. With the 80 planted duplicates the dominant sets still agree in 46 / 48 (a tie on the cut),
#: but the pool's rank order among tied leftovers (torch.topk's order on the CPU is not the lower index
#: first) decides which pool positions become anchors and in which order: 3 / 48 agree in full. Measured on
#: torch 2.13 CPU (torch.topk's tie order is unspecified).
DEFAULT_AGREE = {0: (48, 48), 80: (46, 3)}


@pytest.mark.parametrize("dups", sorted(DEFAULT_AGREE))
def test_stage1_default_mode_agreement(dups):
    dominant = full = total = 0
    for seed, dtype, d, c in CASES:
        cls_row, hidden, metric = (t.to(dtype) for t in random_layer(seed, 1 if seed < 2 else 3, dups=dups))
        off, _ = official_stage1(cls_row.float(), hidden.float(), metric.float(), d - 1, c)
        for (same, sel, *_), (dom, *_) in zip(compare_stage1(cls_row, hidden, metric, d, c, "ours"), off):
            dominant += sorted(TO_OFFICIAL[sel.keep].tolist()) == dom
            full, total = full + same, total + 1
    assert total == 48 and (dominant, full) == DEFAULT_AGREE[dups]


def test_stage1_planted_ties_are_real():
    cls_row, _, metric = random_layer(0)
    s = cls_row[0, :, 1:].sum(0)
    assert s.unique().numel() < N - 1 and metric[0].unique(dim=0).shape[0] < N


def test_stage1_pool_smaller_than_contextual_and_no_leftover_outside():
    # 300 + 200 with w = 4: M = 277 leftovers, P = 277 (all), step = 1: 200 anchors, 77 members, none dropped
    cls_row, hidden, metric = random_layer(7)
    off, _ = official_stage1(cls_row, hidden, metric, 299, 200)
    sel, _ = ours_stage1(cls_row, hidden, metric, 0, 300, 200, "official")
    dom, anchors, members, slots = off[0]
    assert TO_OFFICIAL[sel.targets].tolist() == anchors and len(anchors) == 200 and len(members) == 77
    assert int((sel.assign >= 0).sum()) == 77


# ------------------------------------------------------------------ stage 2: the official code, transcribed

SYS, NT, HEADS, HD2 = 35, 40, 32, 128


def official_stage2(q, k, mask4, image_index, n_image, keep_length):
    """``pdrop_rank_drop``'s inference branch for one sample after q / k (RoPE applied): q, k (H, S, d), mask4
    (S, S) the additive causal mask. Returns the kept image positions (ascending)."""
    rows_q = q[:, image_index + n_image:, :]  # every row after the image
    rows_m = mask4[image_index + n_image:, :]
    w = torch.matmul(rows_q, k.transpose(1, 2)) / math.sqrt(q.shape[-1]) + rows_m
    return official_stage2_probs(torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), image_index, n_image,
                                 keep_length)


def official_stage2_probs(probs, image_index, n_image, keep_length):
    """The same from the cast probabilities (H, Q, S)."""
    per_head = torch.mean(probs, dim=0)  # (Q, S)
    per_head = per_head[:, image_index:image_index + n_image]
    per_row = torch.mean(per_head, dim=0)  # (N,)
    top = per_row.topk(keep_length).indices + image_index
    return top.sort().values.tolist()


def random_logits(seed, n_image, dups=48):
    """Causal logits (H, Q, S) of the Q = 40 rows after the image, S = 35 + n_image + 40: a few strongly
    attended image tokens, ``dups`` duplicated image columns (same logit in every head and row)."""
    g = torch.Generator().manual_seed(seed)
    s = SYS + n_image + NT
    logits = torch.randn(HEADS, NT, s, generator=g) * 2
    logits[..., SYS + torch.randperm(n_image, generator=g)[:20]] += 5
    src = SYS + torch.randint(0, n_image, (min(dups, n_image),), generator=g)
    dst = SYS + torch.randperm(n_image, generator=g)[:min(dups, n_image)]
    logits[..., dst] = logits[..., src]
    rows = torch.arange(SYS + n_image, s)
    return logits.masked_fill(torch.arange(s)[None, :] > rows[:, None], float("-inf"))


def ours_stage2(logits, n_image, k, numerics, dtype):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(dtype)  # (H, Q, S) as the signal gives it
    return (duet_rank(probs, torch.arange(SYS, SYS + n_image), k, numerics) + SYS).tolist()


#: (current image tokens, kept): N = 307 (192: 300 + 7) and 205 (128: 170 + 35), ratios 0.5 then 0.0
STAGES = [(307, 153), (153, 0), (205, 102), (102, 0)]
CASES2 = [(seed, dtype, n, k) for seed in range(4) for dtype in (torch.float32, torch.float16) for n, k in STAGES]


@pytest.mark.parametrize("seed,dtype,n,k", CASES2)
def test_stage2_reference_mode_equals_the_official_ranking(seed, dtype, n, k):
    logits = random_logits(seed, n)
    want = official_stage2_probs(torch.softmax(logits, dim=-1, dtype=torch.float32).to(torch.float16), SYS, n, k)
    assert ours_stage2(logits, n, k, "official", dtype) == want
    assert len(want) == k


def test_stage2_default_mode_differs_only_at_the_cut():
    """The default mode (fp32 means, ties to the lower index) keeps the official set in most of the 32 cases;
    where it does not, every token it swaps sits at the cut: its score (the fp32 mean of the official fp16
    probabilities) is within 1e-3 relative of the k-th best. Which of two such tokens wins is decided by
    rounding: the fp16 means of the official code, and in our fp32 mean even two exactly duplicated columns can
    differ in the last bit (a CPU reduction's order depends on the column's position), so the count of exact
    agreements is machine-dependent (29 of 32 on this project's CPUs: seed 0 and 1 at 307 -> 153) and is
    bounded here, not pinned."""
    agree = 0
    for seed, dtype, n, k in CASES2:
        logits = random_logits(seed, n)
        p16 = torch.softmax(logits, dim=-1, dtype=torch.float32).to(torch.float16)
        want = official_stage2_probs(p16, SYS, n, k)
        got = ours_stage2(logits, n, k, "ours", dtype)
        assert len(got) == k == len(set(got))
        agree += got == want
        if got != want:
            score = p16.float().mean(0)[:, SYS:SYS + n].mean(0)
            cut = score.sort(descending=True).values[k - 1]
            swapped = torch.tensor(sorted(set(got) ^ set(want))) - SYS
            assert len(swapped) <= 4, (seed, dtype, n, k)
            assert ((score[swapped] - cut).abs() <= 1e-3 * cut).all(), (seed, dtype, n, k)
    assert agree >= 28


@pytest.mark.parametrize("seed", range(3))
def test_stage2_from_q_and_k_as_the_signal_computes_the_rows(seed):
    """From fp32 q / k (an fp32 LLM: the official ``.to(query dtype)`` then keeps fp32): the official rows
    (matmul / sqrt(d) + the additive finfo.min mask, softmax, fp32 means) and the default mode on ours
    (:func:`llava.signals.causal_attention_rows`, which LLMSignals.attention uses) keep the same tokens. (The
    fp16 LLM's q k^T in fp16 is not reproduced: our rows are computed in fp32.)"""
    g = torch.Generator().manual_seed(100 + seed)
    n = 307
    s = SYS + n + NT
    q = torch.randn(HEADS, s, HD2, generator=g)
    k = torch.randn(HEADS, s, HD2, generator=g) + 0.3 * torch.randn(HD2, generator=g)
    mask = torch.zeros(s, s).masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    want = official_stage2(q, k, mask, SYS, n, 153)
    rows = torch.arange(SYS + n, s)
    probs = causal_attention_rows(q[:, rows], k, rows, HD2 ** -0.5)
    assert probs.shape == (HEADS, NT, s)
    assert (duet_rank(probs, torch.arange(SYS, SYS + n), 153) + SYS).tolist() == want


def test_stage2_worked_example_fp16_flips_the_order():
    # 4 heads, 2 query rows, 3 image columns (no prefix). Image token 0: .40002 in every cell; token 1: .40003
    # in 7 of the 8 (head, row) cells and .39992 in (head 3, row 0). fp32: token 1's mean .40001625 < .40002
    # -> the default keeps token 0. fp16 (grid step 2^-12 near .4): .40002 -> .39990234, .40003 -> .40014648,
    # .39992 -> .39990234; token 1's head means .40008545 -> .40014648 (row 0) and .40014648 (row 1), row
    # mean .40014648 > token 0's .39990234 -> the reference mode keeps token 1, as the official code
    rows = torch.full((4, 2, 3), .40003)
    rows[:, :, 0], rows[:, :, 2], rows[3, 0, 1] = .40002, .2, .39992
    assert duet_rank(rows, torch.arange(3), 1).tolist() == [0]
    assert duet_rank(rows, torch.arange(3), 1, "official").tolist() == [1]
    assert official_stage2_probs(rows.half(), 0, 3, 1) == [1]
    assert duet_rank(rows, torch.arange(3), 2, "official").tolist() == [0, 1]


def test_stage2_reference_mode_ranks_in_the_models_dtype():
    """The official ``.to(query_states.dtype)`` is fp32 in an fp32 run: on the fp32 rows of the worked example
    above the official code keeps token 0 (fp32 means), and so does the reference mode in the run's dtype; the
    fp16 run keeps token 1 as before. The method passes its LLM's dtype (``sig.hidden``): an always-fp16 cast
    kept token 1 in an fp32 run. Fails without the fix."""
    from types import SimpleNamespace

    rows = torch.full((4, 2, 3), .40003)
    rows[:, :, 0], rows[:, :, 2], rows[3, 0, 1] = .40002, .2, .39992
    assert official_stage2_probs(rows, 0, 3, 1) == [0]  # the official code, fp32 model
    assert duet_rank(rows, torch.arange(3), 1, "official", dtype=torch.float32).tolist() == [0]
    assert duet_rank(rows, torch.arange(3), 1, "official", dtype=torch.float16).tolist() == [1]

    def keep(dtype):  # stage 2 (ratio 0.5 of 3 -> 1) on a signal with the rows and an LLM of this dtype
        sig = SimpleNamespace(num_visual_entry=3, num_visual=3, visual=torch.arange(3), text_mask=None,
                              hidden=torch.zeros(5, 8, dtype=dtype), attention=lambda *a, **kw: rows.to(dtype))
        m = DUET(192, numerics="official", ratios=(0.5, 0.0))
        return m.select_llm(0, sig).keep.tolist()

    assert keep(torch.float32) == [0]
    assert keep(torch.float16) == [1] == official_stage2_probs(rows.half(), 0, 3, 1)


def test_method_option():
    assert DUET(192).numerics == "ours" and DUET(192, numerics="official").numerics == "official"
    assert DUET(192).capture_refusal() is None and "reference mode" in DUET(192, numerics="official").capture_refusal()
    with pytest.raises(ValueError, match="numerics"):
        DUET(192, numerics="fp16")
    with pytest.raises(ValueError, match="numerics"):
        duet_rank(torch.ones(1, 1, 3), torch.arange(3), 1, "half")


# ------------------------------------------------------------------------------ tiny models, engine


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
@pytest.mark.parametrize("stage", ["vision", 0])
def test_reference_mode_runs_in_the_engine(rt, stage):
    """Reference mode on the tiny models (6 -> 8 + 2 per unit, stages before layers 2 and 3): batch 3
    selections equal each sample alone, and cached generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "duet", 6, stage=stage)
