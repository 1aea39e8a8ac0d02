"""VisPruner: hand-worked duplicate removal, the official loop transcribed as a reference (official
shapes), the round count, odd |R| (our rule vs the official failure). The engine guarantees on the tiny
families (keep-all, tokens per unit, cache, batching): tests/test_method_guarantees.py."""

import math

import pytest
import torch

import baselines.vispruner  # noqa: F401  (registers "vispruner")
from baselines.vispruner import (VisPruner, removal_schedule, remove_duplicates, remove_duplicates_gram, vispruner,
                                 vispruner_units)
from llava.method import BudgetError


# ------------------------------------------------------------------ the official code as reference


def official_encode_images(image_features, image_attentions, visual_token_num, important_ratio, stable=True):
    """Theia-4869/VisPruner @ aefa01a ``llava_arch.py`` ``encode_images`` (index-mask part), transcribed
    for one image (B = 1): image_features (1, N, C) in the model dtype, image_attentions (1, H, N).
    ``stable``: the duplicate-removal ``argsort`` with ties to the lower index. The official call leaves
    the order of ties unspecified, and ties do occur: the max-similarities of 1024-d random vectors
    collide in fp32 in about one run in three (seed 0, T = 128, round 6), where PyTorch's unstable CPU
    sort puts the higher index first."""
    B, N, C = image_features.shape
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = image_attentions.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    rounds = 0
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True, stable=stable)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2]
        ], dim=-1)
        rounds += 1
    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool)
    index_masks.scatter_(1, selected_indices, True)
    return index_masks[0].nonzero().flatten(), rounds


def official_inputs(seed, n=576, dv=1024, heads=16):
    g = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(heads, n, generator=g) * 2, dim=-1)
    feats = torch.randn(n, dv, generator=g)
    return attn, feats


@pytest.mark.parametrize("T,rho", [(64, 0.75), (128, 0.5), (192, 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_official_loop_at_official_shapes(T, rho, seed):
    attn, feats = official_inputs(seed)
    unit, patch = torch.zeros(576, dtype=torch.long), torch.arange(576)
    want, rounds = official_encode_images(feats[None], attn[None], T, rho)
    got = vispruner(attn, feats, unit, patch, T, important_ratio=rho)
    assert got.numel() == T and torch.equal(got, want)
    assert torch.equal(got, got.sort().values)
    # rounds: ceil((|R| - T_div) / 8), |R| = N - T_imp
    t_imp = int(T * rho)
    assert rounds == math.ceil((576 - t_imp - (T - t_imp)) / 8) == len(removal_schedule(576 - t_imp, T - t_imp))
    # the default ratio is the README's: 0.75 for T <= 64, 0.5 above
    assert torch.equal(vispruner(attn, feats, unit, patch, T), got)


@pytest.mark.parametrize("T,rho", [(64, 0.75), (128, 0.5)])
def test_reference_mode_equals_official_fp16_numerics(T, rho):
    attn, feats = official_inputs(7)
    want, _ = official_encode_images(feats.half()[None], attn[None], T, rho)
    got = vispruner(attn, feats, torch.zeros(576, dtype=torch.long), torch.arange(576), T, important_ratio=rho,
                    reference=True)
    assert torch.equal(got, want)


def test_batched_units_equal_each_unit_alone():
    """Several crops of equal size run as one batch: same as each crop alone (index offsets)."""
    attn = torch.cat([official_inputs(s, n=100, dv=32, heads=4)[0] for s in range(3)], 1)
    feats = torch.cat([official_inputs(s, n=100, dv=32, heads=4)[1] for s in range(3)])
    unit, patch = torch.arange(300) // 100, torch.arange(300) % 100
    got = vispruner(attn, feats, unit, patch, 20, important_ratio=0.5)
    alone = [vispruner(attn[:, u * 100:(u + 1) * 100], feats[u * 100:(u + 1) * 100], unit[:100], patch[:100], 20,
                       important_ratio=0.5) + 100 * u for u in range(3)]
    assert torch.equal(got, torch.cat(alone))


# ------------------------------------------------------------------ worked by hand


def test_one_round_by_hand():
    """N = 10, T = 8, rho = 0.25: T_imp = 2, T_div = 6. Attention descends with the index, so the
    important tokens are 0, 1 and R = [2..9]; one round with r = min(8, 8 - 6) = 2:
    A = [2, 4, 6, 8], B = [3, 5, 7, 9]. Planted: 6 = copy of 3 (s = 1), 8 close to 9 (s = 0.8);
    2 and 4 are orthogonal to every B token (s = 0). The two duplicates go."""
    n = 10
    feats = torch.eye(n)
    feats[6] = feats[3]
    feats[8] = 0.6 * feats[8] + 0.8 * feats[9]
    attn = torch.arange(n, 0, -1).float()[None] / 55
    keep = vispruner(attn, feats, torch.zeros(n, dtype=torch.long), torch.arange(n), 8, important_ratio=0.25)
    assert keep.tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    assert removal_schedule(8, 6) == [2]


def test_survivors_reordered_by_descending_similarity():
    """Two rounds on R = [0..19] (attention order = token order), T_div = 10, r = 8 then 2.
    B tokens 2i+1 = e_i; A tokens 2i = s_i e_i + sqrt(1 - s_i^2) e_(10+i), s_i = .9 - .05 i; and B token
    17 = .6 e8 + .8 e9 (it touches only 16 and 18 in round 1).
    Round 1: s(A) = .9 .85 .8 .75 .7 .65 .6 .55 | .3 (16: .5 x .6) | .45 (18, with 19) -> drop the top 8,
    survivors in descending s: [18, 16]; R = [18, 16, 1, 3, ..., 19].
    Round 2: A = [18, 1, 5, 9, 13, 17], B = [16, 3, 7, 11, 15, 19]: s = .45 (18-19), 0, 0, 0, 0, .8 (17-19)
    -> 17 and 18 go; R = [1, 5, 9, 13] (ties at 0: lower position first) + B.
    (Survivors kept in their old order would make round 2 drop 17 and 16 instead.)"""
    feats = torch.zeros(20, 20)
    for i in range(10):
        s_i = 0.9 - 0.05 * i
        feats[2 * i + 1, i] = 1.0
        feats[2 * i, i] = s_i
        feats[2 * i, 10 + i] = (1 - s_i * s_i) ** 0.5
    feats[17] = 0.0
    feats[17, 8], feats[17, 9] = 0.6, 0.8
    assert removal_schedule(20, 10) == [8, 2]
    out = remove_duplicates(torch.arange(20)[None], feats[None], 10)
    assert out[0].tolist() == [1, 5, 9, 13, 16, 3, 7, 11, 15, 19]
    one = remove_duplicates(torch.arange(20)[None], feats[None], 12)  # round 1 only
    assert one[0].tolist() == [18, 16, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19]


def test_planted_duplicates_are_removed_in_the_first_round():
    """Official shapes, T = 64, rho = 0.75: the residual list's first 8 A-positions made copies of B
    tokens go in round 1, and none of them survives."""
    attn, feats = official_inputs(3)
    order = torch.sort(attn.mean(0), descending=True, stable=True).indices
    residual = order[48:]
    planted = residual[0:16:2]  # A positions 0..7
    feats[planted] = feats[residual[101:117:2]] * 3.0  # copies (up to scale) of B tokens
    normed = feats / feats.norm(dim=-1, keepdim=True)
    one_round = remove_duplicates(residual[None], normed[None], residual.numel() - 8)
    assert set(residual.tolist()) - set(one_round[0].tolist()) == set(planted.tolist())
    keep = vispruner(attn, feats, torch.zeros(576, dtype=torch.long), torch.arange(576), 64)
    assert keep.numel() == 64 and not set(planted.tolist()) & set(keep.tolist())


def test_odd_residual_our_rule_and_the_official_failure():
    """N = 9, T = 4, rho = 0.5: T_imp = 2, T_div = 2, |R| = 7 (odd). Official: the gather would fail.
    Ours: round 1 r = min(8, 5) capped at |A| = 4 (all of A goes, R = B = [3, 5, 7]); round 2 (|R| = 3):
    r = 1 of A = [3, 7] against B = [5]; 7 is a copy of 5 -> dropped. Keep 0, 1 + 3, 5."""
    n = 9
    feats = torch.eye(n)
    feats[7] = feats[5]
    attn = torch.arange(n, 0, -1).float()[None]
    unit, patch = torch.zeros(n, dtype=torch.long), torch.arange(n)
    assert removal_schedule(7, 2) == [4, 1]
    assert vispruner(attn, feats, unit, patch, 4, important_ratio=0.5).tolist() == [0, 1, 3, 5]
    with pytest.raises(BudgetError, match="official gather"):  # the budget decides |R|: one `error:` line
        vispruner(attn, feats, unit, patch, 4, important_ratio=0.5, reference=True)
    with pytest.raises(Exception):  # the transcription of the official loop fails here too
        official_encode_images(feats[None], attn[None], 4, 0.5)


@pytest.mark.parametrize("N,T,rho", [(16, 4, 0.75), (16, 2, 0.5), (17, 6, 0.5), (576, 58, 0.5), (576, 3, 0.0),
                                     (576, 64, 1.0), (9, 8, 0.5)])
def test_count_is_the_budget_for_any_sizes(N, T, rho):
    attn, feats = official_inputs(N, n=N, dv=16, heads=2)
    keep = vispruner(attn, feats, torch.zeros(N, dtype=torch.long), torch.arange(N), T, important_ratio=rho)
    assert keep.numel() == T and torch.equal(keep, keep.unique())


def test_important_only_and_keep_whole():
    attn, feats = official_inputs(0, n=16, dv=8, heads=2)
    top = torch.sort(attn.mean(0), descending=True, stable=True).indices[:4].sort().values
    unit, patch = torch.zeros(16, dtype=torch.long), torch.arange(16)
    assert torch.equal(vispruner(attn, feats, unit, patch, 4, important_ratio=1.0), top)
    assert vispruner(attn, feats, unit, patch, 16).tolist() == list(range(16))
    local = vispruner_units(attn.mean(0)[None], feats[None], 4, 0)
    assert torch.equal(local[0], top)


def test_video_cls_and_newlines():
    # 2 frames of [CLS] + 4 patches; then a newline token (layout)
    attn = torch.tensor([[0.9, 0.1, 0.4, 0.3, 0.2, 0.8, 0.05, 0.1, 0.6, 0.3, 0.0]])
    feats = torch.eye(11)
    unit = torch.tensor([0] * 5 + [1] * 5 + [-1])
    patch = torch.tensor([-1, 0, 1, 2, 3] * 2 + [-1])
    # T = 1, rho = 0.75 -> T_imp = 0, T_div = 1 ... use rho = 1: the top patch per frame
    assert vispruner(attn, feats, unit, patch, 1, important_ratio=1.0).tolist() == [2, 8, 10]
    assert vispruner(attn, feats, unit, patch, 1, important_ratio=1.0, keep_newlines=False).tolist() == [2, 8]
    assert vispruner(attn, feats, unit, patch, 2, important_ratio=1.0, cls_token="keep").tolist() == [0, 2, 5, 8, 10]


def test_options():
    m = VisPruner(64)
    assert m.config() == {"method": "vispruner", "budget": 64, "position_mode": "keep", "important_ratio": None,
                          "reference": False, "similarity": "rounds", "cls_token": "drop", "keep_newlines": True,
                          "numerics": "ours", "official_attention": "tower"}
    with pytest.raises(ValueError, match="official_attention must be one of"):
        VisPruner(64, official_attention="fp16")
    assert m.needs_vision_attention and m.vision_stage
    with pytest.raises(ValueError):
        VisPruner()
    with pytest.raises(ValueError):
        VisPruner(64, important_ratio=1.5)
    with pytest.raises(ValueError):
        VisPruner(64, cls_token="rank")


@pytest.mark.parametrize("seed", range(4))
def test_gram_form_equals_the_per_round_products(seed):
    """``similarity="gram"`` reads every round's similarities from one Gram matrix (:func:`remove_duplicates_gram`).
    On features whose dot products are exact in fp32 (integers from -3 to 3 over 64 channels: no rounding in any
    summation order, so on any CPU) it gives the same survivors, in the same order, as the loop that multiplies A and
    B afresh each round: on the official shapes (T = 64 / 128 / 192), on planted exact duplicates and the many tied
    products of small integers (tied maxima), on odd sizes (our capped rounds) and on a batch of five equal-size
    units (a NeXT image's crops); the round-1 products equal the Gram matrix's entries."""
    attn, _ = official_inputs(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    normed = torch.randint(-3, 4, (576, 64), generator=g).float()
    normed[1::37] = normed[2::37][: normed[1::37].shape[0]]  # exact duplicates: tied maxima in the sort
    order = torch.sort(attn.mean(0), descending=True, stable=True).indices
    for t_imp, t_div in ((48, 16), (64, 64), (96, 96), (0, 7)):
        residual = order[t_imp:][None]
        assert torch.equal(remove_duplicates_gram(residual, normed[None], t_div),
                           remove_duplicates(residual, normed[None], t_div))
    a, b = normed[order[48:][0::2]], normed[order[48:][1::2]]
    gram = normed @ normed.T
    assert torch.equal(a @ b.T, gram[order[48:][0::2]][:, order[48:][1::2]])
    crops = torch.randint(-3, 4, (5, 300, 64), generator=g).float()
    residual = torch.stack([torch.randperm(300, generator=g)[:251] for _ in range(5)])
    batched = remove_duplicates_gram(residual, crops, 11)
    assert torch.equal(batched, remove_duplicates(residual, crops, 11))
    for u in range(5):  # each unit alone
        assert torch.equal(remove_duplicates_gram(residual[u:u + 1], crops[u:u + 1], 11)[0], batched[u])


def test_the_similarity_option():
    """Ours multiplies each round's A and B by default (the official loop's shapes); ``similarity="gram"`` takes the
    Gram matrix, the same kept set where the products are exact; another value is refused."""
    attn, feats = official_inputs(0)
    unit, patch = torch.zeros(576, dtype=torch.long), torch.arange(576)
    assert VisPruner(64).similarity == "rounds" and VisPruner(64, similarity="gram").similarity == "gram"
    residual = torch.sort(attn.mean(0), descending=True, stable=True).indices[48:][None]
    normed = feats / feats.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    important = torch.sort(attn.mean(0), descending=True, stable=True).indices[:48]
    rounds = torch.cat([important, remove_duplicates(residual, normed[None], 16)[0]]).sort().values
    assert torch.equal(vispruner(attn, feats, unit, patch, 64), rounds)  # the default: each round's products
    exact = torch.randint(-3, 4, (576, 64), generator=torch.Generator().manual_seed(5)).float()
    assert torch.equal(vispruner(attn, exact, unit, patch, 64, similarity="gram"),
                       vispruner(attn, exact, unit, patch, 64, similarity="rounds"))
    with pytest.raises(ValueError, match="similarity must be one of"):
        vispruner(attn, feats, unit, patch, 64, similarity="cosine")
