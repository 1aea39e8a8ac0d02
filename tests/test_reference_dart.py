"""DART reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): ZichenWen1/DART, read from its public fork xqy1111111/DART,
``llava/model/language_model/modeling_llama_self.py``:
  * ``LlamaModel.forward`` (the ``DART_config`` branch at layer K): ``last_layer_state =
    self.norm(layer_outputs[0])``, ``any_states = layer_outputs[-2]`` (the layer's post-RoPE keys,
    (B, H, S, d)), everything in the LLM's dtype (fp16 in the official runs);
  * ``get_retained_image_token``: L1 key norms (heads concatenated), ``topk`` pivots, a Python ``set``
    of pivot positions iterated once, per pivot ``topk`` of the negative ``F.cosine_similarity`` over a
    list made from a Python ``set`` of candidate positions, text pivots removed at the end.

The transcription below follows that function step by step (batch 1, image at a fixed start) and is
compared with ``baselines.dart`` on worked examples and random tensors with the official shapes
(LLaVA-1.5-7B: 35 prefix tokens, 576 visual tokens, 32 heads x 128, hidden 4096), in fp16 and fp32,
with planted duplicate tokens (exact ties in both the key norms and the similarities).
"""

import math

import pytest
import torch
from conftest import FAMILIES

from baselines.dart import DART, dart_key_l1, dart_select

OFFICIAL_DTYPE = torch.float16


def official_retained(last_layer_state, any_states, start, length, budget, pivot_image=4, pivot_text=4):
    """Transcription of DART's ``get_retained_image_token`` (official code, see module doc).

    last_layer_state: (1, S, D) final-normed layer K-1 output; any_states: (1, H, S, d) its keys; both in
    the official dtype. Returns the retained image positions as a sorted list."""
    per_pivot = math.ceil(budget // (pivot_image + pivot_text))  # TOKEN_TOPK
    keys = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    image_norm = torch.norm(keys[0][start:start + length, :], p=1, dim=-1)
    text_norm = torch.norm(keys[0][start + length:, :], p=1, dim=-1)
    image_pivots = (image_norm.topk(pivot_image).indices + start).tolist()
    text_pivots = (text_norm.topk(pivot_text).indices + start + length).tolist()
    pivots = set(image_pivots + text_pivots)
    candidates = set(range(start, start + length)) - set(image_pivots)
    cand_list = list(candidates)
    for p in list(pivots):  # one pass over the pivot set as it was before the loop
        sims = -torch.nn.functional.cosine_similarity(last_layer_state[0][p, :], last_layer_state[0][cand_list, :], dim=-1)
        chosen = [cand_list[i] for i in sims.topk(per_pivot).indices]
        pivots.update(chosen)
        candidates.difference_update(chosen)
        cand_list = list(candidates)
    pivots.difference_update(text_pivots)
    return sorted(pivots)


def ours(feats, keys_shd, start, length, budget, numerics):
    """baselines.dart on the same tensors: feats (S, D), keys (S, H, d); returns image positions."""
    S = feats.shape[0]
    visual = torch.arange(start, start + length)
    text = torch.arange(start + length, S)
    key_l1 = dart_key_l1(keys_shd, numerics)
    keep = dart_select(feats, visual, text, key_l1, int(budget // 8), 4, 4, numerics=numerics)
    return (keep + start).tolist()


def random_case(seed, dtype, start=35, length=576, n_text=40, heads=32, head_dim=128, dim=4096, dups=48):
    """Random keys (1, H, S, d) and final-normed states (1, S, D) with ``dups`` planted duplicate image
    tokens (a copy of another image token's key and state: equal norms, equal similarities)."""
    g = torch.Generator().manual_seed(seed)
    S = start + length + n_text
    keys = torch.randn(1, heads, S, head_dim, generator=g)
    feats = torch.randn(1, S, dim, generator=g)
    # a few strong directions so that several candidates are near-duplicates in fp16
    feats[0, start:start + length] += 3 * torch.randn(8, dim, generator=g)[torch.randint(0, 8, (length,), generator=g)]
    src = start + torch.randint(0, length, (dups,), generator=g)
    dst = start + torch.randperm(length, generator=g)[:dups]
    keys[:, :, dst] = keys[:, :, src]
    feats[:, dst] = feats[:, src]
    # planted top-norm tie: two image tokens share the largest key vector
    big = keys[:, :, start + 7] * 3
    keys[:, :, start + 7] = big
    keys[:, :, start + 300] = big
    return keys.to(dtype), feats.to(dtype)


def compare(keys, feats, start, length, budget):
    """(ours default, ours reference, official) image position lists for one case. The official run
    sees the signals in its own dtype (fp16); ours sees them as given (keys as (S, H, d))."""
    off = official_retained(feats.to(OFFICIAL_DTYPE), keys.to(OFFICIAL_DTYPE), start, length, budget)
    k_shd = keys[0].permute(1, 0, 2)
    return (ours(feats[0], k_shd, start, length, budget, "ours"),
            ours(feats[0], k_shd, start, length, budget, "official"), off)


# ------------------------------------------------------------------------------ worked examples


def unit(*degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_worked_example_set_order_decides_a_shared_candidate():
    # positions 0..6: image tokens 0..4 (start 0, length 5), text tokens 5, 6.
    # one image pivot and one text pivot, B = 2 -> t = B // 2 = 1 pick per pivot.
    # image pivot = 3 (largest key norm), text pivot = 6; candidates 0, 1, 2, 4 at 225, 120, 330, 30 deg.
    # Python's set {3, 6} iterates 3 first (slot 3 < slot 6): pivot 3 (90 deg) takes its least similar
    # candidate 0 (225 deg: cos -.707); then text pivot 6 (0 deg) takes 1 (120 deg: -.5).
    feats = unit(225, 120, 330, 90, 30, 10, 0)[None].to(OFFICIAL_DTYPE)
    keys = torch.tensor([1., 1, 1, 6, 1, 1, 5]).reshape(1, 1, 7, 1).to(OFFICIAL_DTYPE)
    off = official_retained(feats, keys, 0, 5, 2, pivot_image=1, pivot_text=1)
    assert off == [0, 1, 3]
    key_l1 = dart_key_l1(keys[0].permute(1, 0, 2), "official")
    keep = dart_select(feats[0], torch.arange(5), torch.tensor([5, 6]), key_l1, 1, 1, 1, numerics="official")
    assert keep.tolist() == off


def test_set_order_is_not_position_order():
    # pivots at positions 9 (image) and 16 (text): in the set's 8-slot table 16 sits in slot 0 and 9 in
    # slot 1, so the official loop runs the text pivot first although the image pivot comes earlier.
    assert list({9, 16}) == [16, 9]
    # image tokens 0..15 (start 0), text 16, 17; t = 1. Pivot 9 at 0 deg, pivot 16 at 90 deg;
    # x = 2 (225 deg: cos -.707 to both), y = 5 (120 deg: -.5 to 9, .866 to 16), z = 11 (330 deg:
    # .866 to 9, -.5 to 16); the other candidates at 45 deg (.707 to both) are never taken.
    #   official / reference (16 first): 16 takes x, then 9 takes y  -> [2, 5, 9]
    #   default (position order, 9 first): 9 takes x, then 16 takes z -> [2, 9, 11]
    deg = [45.0] * 18
    deg[9], deg[16], deg[2], deg[5], deg[11] = 0, 90, 225, 120, 330
    feats = unit(*deg)[None]
    keys = torch.ones(1, 1, 18, 1)
    keys[0, 0, 9], keys[0, 0, 16] = 5, 5
    off = official_retained(feats.half(), keys.half(), 0, 16, 2, pivot_image=1, pivot_text=1)
    assert off == [2, 5, 9]
    k = keys[0].permute(1, 0, 2)
    vis, txt = torch.arange(16), torch.tensor([16, 17])
    assert dart_select(feats[0], vis, txt, dart_key_l1(k, "official"), 1, 1, 1, numerics="official").tolist() == off
    assert dart_select(feats[0], vis, txt, dart_key_l1(k), 1, 1, 1).tolist() == [2, 9, 11]


# ------------------------------------------------------------------------------ random, official shapes

CASES = [(seed, dtype, budget) for seed in range(6) for dtype in (torch.float16, torch.float32)
         for budget in (64, 128, 192)]


@pytest.mark.parametrize("seed,dtype,budget", CASES)
def test_reference_mode_equals_the_official_selection(seed, dtype, budget):
    keys, feats = random_case(seed, dtype)
    _, ref, off = compare(keys, feats, 35, 576, budget)
    assert ref == off and len(off) == 4 + 8 * (budget // 8)


def test_official_candidate_list_is_ascending_at_the_official_shapes():
    # the official candidate list is list(set(...)) of positions; for 35 + 576 (LLaVA-1.5) and
    # 35 + 2880 (LLaVA-NeXT, 5 crops) it iterates in ascending order, as reference mode assumes
    for start, length in ((35, 576), (35, 2880)):
        c = set(range(start, start + length)) - {start + 3, start + 100, start + 7, start + 9}
        assert list(c) == sorted(c)
        c.difference_update(range(start + 10, start + 200, 3))
        assert list(c) == sorted(c)


def test_method_option():
    assert DART(128).numerics == "ours" and DART(128, numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        DART(128, numerics="fp16")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (8,), "llava_next": (16,), "video_llava": (64,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "dart", *ENGINE_ARGS[rt.family], stage=0)
