"""DivPrune reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``:
  * ``LlavaMetaForCausalLM.pairwise_cosine_similarity`` (rows divided by their norms, ``torch.mm``);
  * ``LlavaMetaForCausalLM.DivPrune`` (k = int(round(ratio * N)); first pick = argmax of the
    second-smallest entry of each distance column via ``topk(2, largest=False)``; each next pick =
    argmax over ALL tokens of the min distance to the picked rows, picked ones not excluded);
  * the ``#divprune`` block at the end of ``prepare_inputs_labels_for_multimodal`` (``LAYER_INDEX=0``:
    the visual rows of ``new_input_embeds`` - fp16 in the official runs, the model is loaded in fp16 -
    are handed to ``DivPrune``; the picks plus prefix / text positions are sorted and gathered).

The transcription is compared with ``baselines.divprune`` on worked examples and random LLM-input rows
with the official shapes (LLaVA-1.5-7B: 576 visual tokens x 4096), in fp16 and fp32, with planted
duplicate tokens (exact ties), at the README ratio 0.098 and the 64/128/192 budgets.
"""

import pytest
import torch
from conftest import FAMILIES

from baselines.divprune import DivPrune, divprune, max_min_diversity

OFFICIAL_DTYPE = torch.float16


def official_divprune(visual_tokens, ratio):
    """Transcription of the official ``DivPrune`` (+ ``pairwise_cosine_similarity``) on the visual rows
    (N, D) in the official dtype; returns the picks in pick order (a list, may repeat)."""
    n = visual_tokens.shape[0]
    k = int(round(ratio * n))
    unit_rows = visual_tokens / visual_tokens.norm(dim=1, keepdim=True)
    dist = 1.0 - torch.mm(unit_rows, unit_rows.t())
    picks = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            score = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            rows = torch.index_select(dist, 0, torch.index_select(picks, 0, torch.arange(0, i)))
            score = torch.min(rows, dim=0).values
        picks[i] = torch.argmax(score)
    return picks.tolist()


def official_kept(visual_tokens, ratio):
    """The visual positions the official code feeds (sorted; a re-pick appears once here)."""
    return sorted(set(official_divprune(visual_tokens.to(OFFICIAL_DTYPE), ratio)))


def ours(x, k, numerics):
    return divprune(x, torch.zeros(x.shape[0], dtype=torch.long), budget=k, numerics=numerics).tolist()


# ------------------------------------------------------------------------------ worked examples


def test_worked_example_five_points():
    # 2-D points at 0, 5, 90, 180, 185 degrees; distances 1 - cos. Nearest-neighbour distances:
    # 0: .0038 (to 5), 5: .0038, 90: 1 - cos 85 = .913, 180: .0038, 185: .0038 -> first pick 2 (90 deg);
    # then min distance to 90 deg: 0 -> 1, 5 -> .913, 180 -> 1, 185 -> 1.087 -> 4 (185 deg);
    # then min(d to 90, d to 185): 0 -> min(1, 1.996) = 1, 5 -> .913, 180 -> .0038 -> 0.
    deg = torch.tensor([0., 5, 90, 180, 185]).deg2rad()
    x = torch.stack([deg.cos(), deg.sin()], 1) * torch.tensor([[1.], [2], [3], [1], [.5]])
    assert official_divprune(x.to(OFFICIAL_DTYPE), 0.6) == [2, 4, 0]
    assert max_min_diversity(x, 3, "official").tolist() == [2, 4, 0]
    assert ours(x, 3, "official") == [0, 2, 4] == ours(x, 3, "ours")


def test_without_the_guard_a_token_is_picked_twice():
    # three copies of one direction and one other direction, k = 3: after picking both directions
    # every min distance is ~0 (in fp16 the picked token's own 1 - cos(x, x) may be the largest), the
    # official argmax re-picks. Reference mode reproduces the picks; the kept set has the distinct ones.
    x = torch.tensor([[1., 0], [2, 0], [3, 0], [0, 1]])
    off = official_divprune(x.to(OFFICIAL_DTYPE), 0.75)
    assert max_min_diversity(x, 3, "official").tolist() == off
    assert ours(x, 3, "official") == sorted(set(off))
    assert len(ours(x, 3, "ours")) == 3  # the default mode keeps 3 distinct tokens


# ------------------------------------------------------------------------------ random, official shapes


def random_rows(seed, dtype, n=576, dim=4096, dups=64):
    """Projected-token-like rows: a shared offset (high mutual cosine, as real LLaVA embeddings), a few
    clusters, and ``dups`` planted exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * 0.5 + torch.randn(dim, generator=g)
    x += 2 * torch.randn(12, dim, generator=g)[torch.randint(0, 12, (n,), generator=g)]
    src = torch.randint(0, n, (dups,), generator=g)
    dst = torch.randperm(n, generator=g)[:dups]
    x[dst] = x[src]
    return x.to(dtype)


CASES = [(seed, dtype, ratio) for seed in range(4) for dtype in (torch.float16, torch.float32)
         for ratio in (0.098, 64 / 576, 128 / 576, 192 / 576)]


@pytest.mark.parametrize("seed,dtype,ratio", CASES)
def test_reference_mode_equals_the_official_selection(seed, dtype, ratio):
    x = random_rows(seed, dtype)
    k = int(round(ratio * 576))
    off = official_divprune(x.to(OFFICIAL_DTYPE), ratio)
    assert max_min_diversity(x, k, "official").tolist() == off
    sel = divprune(x, torch.zeros(576, dtype=torch.long), ratio=ratio, numerics="official")
    assert sel.tolist() == sorted(set(off))


def test_method_option():
    assert DivPrune(64).numerics == "ours" and DivPrune(64, numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        DivPrune(64, numerics="half")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (4,), "llava_next": (4,), "video_llava": (4,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "divprune", *ENGINE_ARGS[rt.family], stage="vision")
