"""DivPrune reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``:
  * ``LlavaMetaForCausalLM.pairwise_cosine_similarity`` (rows divided by their norms, ``torch.mm``);
  * ``LlavaMetaForCausalLM.DivPrune`` (k = int(round(ratio * N)); first pick = argmax of the
    second-smallest entry of each distance column via ``topk(2, largest=False)``; each next pick =
    argmax over ALL tokens of the min distance to the picked rows, picked ones not excluded);
  * the ``#divprune`` block at the end of ``prepare_inputs_labels_for_multimodal`` (``LAYER_INDEX=0``:
    the visual rows of ``new_input_embeds``, in the model's dtype - fp16 under the official builder's load,
    fp32 in a model loaded in fp32 - are handed to ``DivPrune``; the picks plus prefix / text positions are
    sorted and gathered).

The transcription is compared with ``baselines.divprune`` on worked examples and random LLM-input rows
with the official shapes (LLaVA-1.5-7B: 576 visual tokens x 4096), in fp16 and fp32 (the official code on
rows of that dtype; ``reference_dtype="float16"``: the always-fp16 cast), with planted duplicate tokens (exact
ties), at the README ratio 0.098 and the 64/128/192 budgets.
"""

import pytest
import torch
from conftest import FAMILIES

from types import SimpleNamespace

from baselines.divprune import DivPrune, divprune, max_min_diversity
from llava.ops import unit_layout

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
    """The visual positions the official code feeds on rows of this dtype, the model's (sorted; a re-pick
    appears once here)."""
    return sorted(set(official_divprune(visual_tokens, ratio)))


def ours(x, k, numerics, official_dtype=None):
    return divprune(x, torch.zeros(x.shape[0], dtype=torch.long), budget=k, numerics=numerics,
                    official_dtype=official_dtype).tolist()


def method_keep(x, budget, **options):
    """``DivPrune.select_vision`` on one image's LLM-input rows ``x`` (a vision signal with what it reads)."""
    unit = torch.zeros(x.shape[0], dtype=torch.long)
    sig = SimpleNamespace(features=x, unit=unit, unit_kind="image", captured=False,
                          unit_layout=lambda: unit_layout(unit))
    return DivPrune(budget, **options).select_vision(sig).keep.tolist()


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_without_the_guard_a_token_is_picked_twice(dtype):
    # three copies of one direction and one other direction, k = 3: after picking both directions
    # every min distance is ~0 (in fp16 the picked token's own 1 - cos(x, x) may be the largest), the
    # official argmax re-picks. Reference mode reproduces the picks; the kept set has the distinct ones.
    x = torch.tensor([[1., 0], [2, 0], [3, 0], [0, 1]], dtype=dtype)
    off = official_divprune(x, 0.75)
    assert max_min_diversity(x, 3, "official").tolist() == off
    assert ours(x, 3, "official") == sorted(set(off))
    assert len(ours(x, 3, "ours")) == 3  # the default mode keeps 3 distinct tokens


# Two near-parallel pairs, their nearest-neighbour distances 1 - 1 / sqrt(1 + t^2) 1.9e-6 apart in fp32:
#   x0 = (1, 0), x1 = (1, 1/8): t = 1/8          -> d(0, 1) = 0.0077221 (fp32)
#   x2 = (0, 1), x3 = (-(1/8 + 2^-16), 1)        -> d(2, 3) = 0.0077240 (fp32), the larger
# In fp16 -(1/8 + 2^-16) rounds to -1/8 (the fp16 step at 1/8 is 2^-13): x3 mirrors x1 and
# d(0, 1) = d(2, 3) = 2^-7 = 0.0078125 exactly.
# fp32 distances: first pick 2 (largest nearest-neighbour distance), then the token farthest from x2:
#   d(2, 0) = 1, d(2, 1) = 0.876, d(2, 3) = 0.0077 -> 0; picks [2, 0], kept {0, 2}.
# fp16 distances: the four nearest-neighbour distances tie -> argmax takes 0, then the token farthest from
#   x0: d(0, 1) = 0.0078, d(0, 2) = 1, d(0, 3) = 1.124 -> 3; picks [0, 3], kept {0, 3}.
PAIRS = torch.tensor([[1., 0], [1, 0.125], [0, 1], [-(0.125 + 2 ** -16), 1]])
FP32_PICKS, FP16_PICKS = [2, 0], [0, 3]


def test_reference_mode_computes_in_the_models_dtype():
    """The official ``pairwise_cosine_similarity`` computes in the dtype of the LLM input rows it is handed,
    the model's: fp32 in an fp32 run. The reference mode cast them to fp16 always and kept patch 5 where the
    official code keeps 21 (seed 11, fp32, T = 32, image 1; docs/parity.md). Fails without the fix."""
    assert official_divprune(PAIRS, 0.5) == FP32_PICKS  # the official code, fp32 model
    assert official_divprune(PAIRS.to(OFFICIAL_DTYPE), 0.5) == FP16_PICKS  # the official code, fp16 model
    # fp32 input (an fp32 run): the fp32 picks, as the official code in fp32
    assert max_min_diversity(PAIRS, 2, "official").tolist() == FP32_PICKS
    assert ours(PAIRS, 2, "official") == [0, 2]
    assert method_keep(PAIRS, 2, numerics="official") == [0, 2]
    assert method_keep(PAIRS, 2, numerics="official", reference_dtype="model") == [0, 2]
    # fp16 input (an fp16 run): the fp16 picks, as before
    half = PAIRS.to(OFFICIAL_DTYPE)
    assert max_min_diversity(half, 2, "official").tolist() == FP16_PICKS
    assert ours(half, 2, "official") == [0, 3]
    assert method_keep(half, 2, numerics="official") == [0, 3]
    # the always-fp16 cast (the earlier behaviour) stays an option
    assert max_min_diversity(PAIRS, 2, "official", OFFICIAL_DTYPE).tolist() == FP16_PICKS
    assert ours(PAIRS, 2, "official", OFFICIAL_DTYPE) == [0, 3]
    assert method_keep(PAIRS, 2, numerics="official", reference_dtype="float16") == [0, 3]
    # the default mode computes in fp32 whatever the option: the fp32 picks on fp32 rows
    assert method_keep(PAIRS, 2) == method_keep(PAIRS, 2, reference_dtype="float16") == [0, 2]


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
    # the official code on rows of this dtype (the model's); and with the always-fp16 cast, on fp16 rows
    x = random_rows(seed, dtype)
    k = int(round(ratio * 576))
    off = official_divprune(x, ratio)
    assert max_min_diversity(x, k, "official").tolist() == off
    sel = divprune(x, torch.zeros(576, dtype=torch.long), ratio=ratio, numerics="official")
    assert sel.tolist() == sorted(set(off)) == official_kept(x, ratio)
    off16 = official_divprune(x.to(OFFICIAL_DTYPE), ratio)
    assert max_min_diversity(x, k, "official", OFFICIAL_DTYPE).tolist() == off16


def test_method_option():
    assert DivPrune(64).numerics == "ours" and DivPrune(64, numerics="official").numerics == "official"
    assert DivPrune(64).reference_dtype == "model"
    with pytest.raises(ValueError):
        DivPrune(64, numerics="half")
    with pytest.raises(ValueError, match="reference_dtype"):
        DivPrune(64, numerics="official", reference_dtype="fp16")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (4,), "llava_next": (4,), "video_llava": (4,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "divprune", *ENGINE_ARGS[rt.family], stage="vision")
