"""Parity with the official code on LLaVA-NeXT (anyres, spatial_unpad; docs/parity.md "LLaVA-NeXT"):
``python -m parity next`` runs the official LLaVA code (llava-torch 1.2.2.post1) and FlowCut (flowcut 1.0.2) in
``.venv-official`` beside ours.

The first tests need no official environment (our NeXT mapping, the two traced differences on worked values, the
comparison logic); the others are opt-in: skipped, with the command that builds it, when ``.venv-official`` is
absent.
"""

from __future__ import annotations

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from parity import next as nx
from parity.build import (LLM, NEXT_PINPOINTS, NEXT_TOWER, PARITY_SEED_IDS, PARITY_SEEDS, official_next_to_hf,
                          official_shapes)



# -- without the official environment ------------------------------------------------------------------------------
def _official_keys():
    """The official NeXT checkpoint's keys (meta tensors) as the build writes them: LLM + projector + newline, tower."""
    llm, tower = official_shapes(NEXT_TOWER, 400, newline=True)
    return ({k: torch.empty(s, device="meta") for k, s in llm.items()},
            {k: torch.empty(s, device="meta") for k, s in tower.items()})


def test_official_next_to_hf_gives_exactly_the_keys_of_llava_next_for_conditional_generation():
    import transformers as tf

    sd, tower = _official_keys()
    mapped = official_next_to_hf(sd, tower)
    cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**NEXT_TOWER),
                             text_config=tf.LlamaConfig(**LLM, vocab_size=400), image_grid_pinpoints=NEXT_PINPOINTS)
    with torch.device("meta"):
        model = tf.LlavaNextForConditionalGeneration(cfg)
    assert set(mapped) == set(model.state_dict())
    assert mapped["model.image_newline"] is sd["model.image_newline"]
    assert mapped["model.multi_modal_projector.linear_1.weight"] is sd["model.mm_projector.0.weight"]
    assert mapped["model.vision_tower.embeddings.position_embedding.weight"] is \
        tower["vision_model.embeddings.position_embedding.weight"]
    # 24 x 24 patches per crop (+ [CLS]): official FlowCut's NeXT packing hard-codes 24
    assert tuple(mapped["model.vision_tower.embeddings.position_embedding.weight"].shape) == (577, 64)


@pytest.mark.parametrize("key", ["model.mm_projector.1.weight", "model.image_newline_2", "vision_tower.x",
                                 "model.something.weight"])
def test_official_next_to_hf_refuses_keys_it_does_not_know(key):
    sd, tower = _official_keys()
    with pytest.raises(KeyError):
        official_next_to_hf(dict(sd, **{key: torch.zeros(1)}), tower)


def test_official_next_to_hf_refuses_a_checkpoint_without_image_newline():
    sd, tower = _official_keys()
    del sd["model.image_newline"]
    with pytest.raises(KeyError, match="image_newline"):
        official_next_to_hf(sd, tower)


def test_the_unpad_rounding_difference_on_the_176x99_image():
    """The 176 x 99 image on the 192 x 192 pinpoint: a 48 x 48 patch grid, unpadded height 99 * (48 / 176) =
    26.999999999999996 in floating point. The official int() (our ``unpad_official``, behind
    ``load(next_geometry="official")``) keeps 26 rows (11 cut top and bottom), transformers' int(round(x, 7)) 28 (10
    cut): 26 * (48 + 1) + 576 = 1850 vs 28 * 49 + 576 = 1948 visual tokens."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    from llava.families.llava_next import unpad_official

    assert 99 * (48 / 176) < 27
    grid = torch.arange(48 * 48, dtype=torch.float64).view(1, 48, 48)
    ours = unpad_official(grid, (99, 176))
    assert ours.shape == (1, 26, 48) and ours[0, 0, 0].item() == 11 * 48
    assert unpad_image(grid, (99, 176)).shape == (1, 28, 48) and unpad_image(grid, (99, 176))[0, 0, 0].item() == 10 * 48
    assert unpad_official(grid, (176, 99)).shape == (1, 48, 26)  # the tall case, on the width
    assert unpad_official(grid, torch.tensor([99, 176])).shape == (1, 26, 48)  # a tensor size, as the engine may pass
    assert 576 + 26 * 49 == 1850 and 576 + 28 * 49 == 1948


def test_the_official_geometry_packs_the_176x99_image_with_the_official_count():
    """Our NeXT packing (``next_token_layout``) on the parity model's config: 5 crops of 576 (base + 2 x 2 grid),
    transformers' geometry 576 + 28 rows x 49 = 1948 tokens, the official one (``config.next_unpad = "official"``,
    the pinpoints reversed as ``load(next_geometry="official")`` sets them) 576 + 26 x 49 = 1850; the first kept
    row of the grid is patch row 11 of the 48 (crop row 0 of the top crops)."""
    import transformers as tf

    from llava.families.llava_next import next_token_layout

    cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**NEXT_TOWER), text_config=tf.LlamaConfig(**LLM),
                             image_grid_pinpoints=NEXT_PINPOINTS)
    stock = next_token_layout((99, 176), cfg, 5, 576, "spatial_unpad")
    cfg.image_grid_pinpoints = [p[::-1] for p in NEXT_PINPOINTS]
    cfg.next_unpad = "official"
    off = next_token_layout((99, 176), cfg, 5, 576, "spatial_unpad")
    assert (stock.numel(), off.numel()) == (1948, 1850)
    assert int((stock < 0).sum()) == 28 and int((off < 0).sum()) == 26  # one newline per kept row
    # row 11 of the 48-row grid = row 11 of the top-left crop (crop 1): index 576 + 11 * 24
    assert off[576].item() == 576 + 11 * 24 and stock[576].item() == 576 + 10 * 24


def test_the_pinpoint_tie_on_the_square_image():
    """A 96 x 96 image: the 96 x 192 and 192 x 96 pinpoints tie (same effective and wasted resolution); the
    first listed wins on both sides, but transformers reads [96, 192] as (height, width) = a wide 1 x 2 grid, the
    official code as (width, height) = a tall 2 x 1 grid. With each pair reversed transformers picks the tall one."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    from transformers.image_processing_utils import select_best_resolution

    assert tuple(select_best_resolution((96, 96), NEXT_PINPOINTS)) == (96, 192)  # (height, width): wide
    assert get_anyres_image_grid_shape((96, 96), NEXT_PINPOINTS, 96) == (1, 2)
    reversed_ = [p[::-1] for p in NEXT_PINPOINTS]
    assert tuple(select_best_resolution((96, 96), reversed_)) == (192, 96)  # tall, the official choice
    assert get_anyres_image_grid_shape((96, 96), reversed_, 96) == (2, 1)
    # without a tie the two readings agree (the set of pinpoints is the same): 160 x 96 -> 192 x 96 either way
    assert get_anyres_image_grid_shape((96, 160), NEXT_PINPOINTS, 96) == \
        get_anyres_image_grid_shape((96, 160), reversed_, 96) == (1, 2)


def _runs(**change):
    """One official and one of our FlowCut NeXT runs (and the unpruned run before it) that agree; ``change``
    plants a difference in ours."""
    logits = torch.zeros(1, 6, 7)
    pix = [torch.zeros(3, 3, 2, 2)]
    none_off = {"method": {"name": "none"}, "batch": [0], "ids": [[1, -200, 4, 5]], "pixel_values": pix,
                "image_sizes": [(96, 160)], "logits": torch.zeros(1, 8, 7), "tokens": [[1, 9, 2]], "bos": 1,
                "kept": [], "layer_lengths": [8, 8, 8, 8]}
    none_ours = {"method": {"name": "none"}, "batch": [0], "input_ids": torch.tensor([[1, 3, 3, 3, 3, 3, 4, 5]]),
                 "attention_mask": torch.ones(1, 8, dtype=torch.long), "pixel_values": [p.clone() for p in pix],
                 "image_sizes": [[160, 96]], "logits": torch.zeros(1, 8, 7), "tokens": [[9, 2]], "kept": [],
                 "llm_kept": [], "visual_per_layer": None, "image_token_id": 3}
    meth = {"name": "flowcut", "budget": 2, "padding_side": "right", "batches": [[0]]}
    fc_off = {"method": meth, "batch": [0], "ids": [[1, -200, 4, 5]], "pixel_values": pix, "image_sizes": [(96, 160)],
              "logits": logits, "tokens": [[1, 9, 2, 0]], "bos": 1,
              "kept": [(1, torch.tensor([[0, 2, 3], [1, 2, 3]])), (5, torch.tensor([[0], [2]])),
                       ("llm1", torch.tensor([[0, 2]]))],
              "layer_lengths": [6, 6, 5, 5]}
    fc_ours = {"method": meth, "batch": [0], "input_ids": torch.tensor([[1, 3, 3, 3, 4, 5]]),
               "attention_mask": torch.ones(1, 6, dtype=torch.long), "pixel_values": pix, "image_sizes": [[160, 96]],
               "logits": logits.clone(), "tokens": [[9, 2, 5]],
               "kept": [(1, torch.tensor([[0, 2, 3], [1, 2, 3]])), (5, torch.tensor([[0], [2]]))],
               "llm_kept": [[0, 2]], "visual_per_layer": [[3, 3, 2, 2]], "image_token_id": 3}
    runs = {"none": none_ours, "flowcut": fc_ours}
    for key, value in change.items():
        which, field = key.split("__")
        runs[which][field] = value
    return {"runs": [none_off, fc_off]}, [none_ours, fc_ours]


def test_compare_agrees_on_the_same_runs():
    off, mine = _runs()
    checks = nx.compare(off, mine, "fp32 stock", 1e-5, eos=2)
    assert [c.group for c in checks] == ["next-prep", "next-unpruned", "next-flowcut"]
    assert all(c.ok for c in checks), [c.detail for c in checks]
    assert "visual tokens 5" in checks[0].detail
    assert checks[2].data["official_visual_per_layer"] == [[3, 3, 2, 2]]
    assert "(L1: 3, L5: 1)" in checks[2].detail and "(2 kept)" in checks[2].detail


@pytest.mark.parametrize("change, group, words", [
    ({"none__pixel_values": [torch.full((3, 3, 2, 2), 0.5)]}, "next-prep", "pixels max abs diff 0.5"),
    ({"none__pixel_values": [torch.zeros(2, 3, 2, 2)]}, "next-prep", "pixels max abs diff inf"),
    ({"none__image_sizes": [[96, 160]]}, "next-prep", "image sizes DIFFER"),  # (width, height) by mistake
    ({"none__input_ids": torch.tensor([[1, 3, 3, 3, 3, 4, 5, 5]])}, "next-prep", "ids differ"),
    ({"none__input_ids": torch.tensor([[1, 3, 3, 3, 3, 3, 3, 4]]), "none__attention_mask":
      torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])}, "next-prep", "visual tokens DIFFER: official 5, ours 6"),
    ({"flowcut__kept": [(1, torch.tensor([[0, 2, 3], [1, 2, 4]])), (5, torch.tensor([[0], [2]]))]},
     "next-flowcut", "CLIP layer DIFFER"),
    ({"flowcut__kept": [(1, torch.tensor([[0, 2, 3], [1, 2, 3]]))]}, "next-flowcut", "CLIP layer DIFFER"),
    ({"flowcut__llm_kept": [[0, 1]]}, "next-flowcut", "LLM stage kept set DIFFERS"),
    ({"flowcut__llm_kept": []}, "next-flowcut", "LLM stage kept set DIFFERS"),
    ({"flowcut__visual_per_layer": [[3, 3, 3, 3]]}, "next-flowcut", "per decoder layer DIFFER"),
    ({"flowcut__tokens": [[8, 2]]}, "next-flowcut", "greedy tokens DIFFER"),
    ({"flowcut__logits": torch.full((1, 6, 7), 2e-5)}, "next-flowcut", "logits max abs diff 2.00e-05"),
])
def test_compare_fails_on_each_kind_of_difference(change, group, words):
    off, mine = _runs(**change)
    checks = nx.compare(off, mine, "fp32 stock", 1e-5, eos=2)
    bad = [c for c in checks if not c.ok]
    assert [c.group for c in bad] == [group]
    assert words in bad[0].detail


def test_compare_refuses_runs_out_of_step():
    off, mine = _runs()
    with pytest.raises(ValueError, match="out of step"):
        nx.compare(off, mine[::-1], "fp32 stock", 1e-5, eos=2)


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build_next

    work = tmp_path_factory.mktemp("parity-next")
    return work, build_next(work, str(OFFICIAL_PY), seed=request.param)


@needs_official
def test_next_stock_differs_exactly_where_traced_and_our_official_geometry_is_bit_identical(built):
    """The square image (pinpoint tie) and the 176 x 99 one (unpad rounding), alone and together, fp32, FlowCut's
    official NeXT recipe at T = 64 (32 per crop in the tower, the LLM stage cutting the image to 64). ``stock`` =
    ``llava.load``'s default geometry (transformers'), ``official`` = ``load(next_geometry="official")``, both on
    the same mapped checkpoint."""
    work, info = built
    checks = nx.run(info, str(OFFICIAL_PY), work, budgets=(64,), max_new_tokens=2, image_ids=(0, 3))
    # per variant: prep + unpruned for [0], [1], [0, 1]; FlowCut for [0], [1]
    assert len(checks) == 2 * 8
    official = [c for c in checks if c.case.startswith("fp32 official")]
    assert len(official) == 8
    assert all(c.ok for c in official), [(c.case, c.detail) for c in official if not c.ok]
    assert all(max(c.data["logits_max_abs_diff"]) == 0 for c in official if c.group != "next-prep")
    # our runtime option, through our engine (the stock forward would round); stock fp32 unpruned: the model's forward
    runs = [c for c in checks if c.group != "next-prep"]
    assert all(c.data["our_next_geometry"] == ("official" if "official" in c.case else "transformers") for c in runs)
    assert all(c.data["our_engine"] for c in official if c.group != "next-prep")
    assert not any(c.data["our_engine"] for c in runs if c.case.startswith("fp32 stock none"))
    cut = [c for c in official if c.group == "next-flowcut"]
    assert all([i for i, _ in c.data["official_kept"]] == [1, 3, 5] for c in cut)  # adaptive, adaptive, final
    assert all(len(c.data["official_llm_kept"][0]) == 64 for c in cut)
    assert all(c.data["official_visual_per_layer"][0][2:] == [64, 64] for c in cut)
    # stock: the square image's pixels (its crops cut the other way), the 176 x 99 image's token count
    prep = {c.case: c for c in checks if c.group == "next-prep"}
    fc = {c.case: c for c in checks if c.group == "next-flowcut"}
    assert not prep["fp32 stock none batch [0]"].ok and prep["fp32 stock none batch [0]"].data["pixels_max_abs_diff"] > 0
    assert prep["fp32 official none batch [0]"].data["pixels_max_abs_diff"] == 0
    assert prep["fp32 stock none batch [1]"].data["official_visual"] == [1850]
    assert prep["fp32 stock none batch [1]"].data["our_visual"] == [1948]
    assert prep["fp32 official none batch [1]"].data["our_visual"] == [1850]
    # the 176 x 99 image's crops and pixels are the same on both sides: only the packing differs
    assert prep["fp32 stock none batch [1]"].data["pixels_max_abs_diff"] == 0
    assert not prep["fp32 stock none batch [1]"].ok and not prep["fp32 stock none batch [0, 1]"].ok
    assert not fc["fp32 stock flowcut T=64 batch [0]"].ok and not fc["fp32 stock flowcut T=64 batch [1]"].ok
    assert fc["fp32 stock flowcut T=64 batch [1]"].data["official_kept"] == \
        fc["fp32 stock flowcut T=64 batch [1]"].data["our_kept"]  # the tower's cuts agree; the packing does not
    # the tower's adaptive cut of the 176 x 99 image on each seed's exact inputs (parity.build): the official packing
    # (1850 tokens) and ours (1948) reach different counts before the LLM stage cuts both to 64
    cut_at = {0: 152, 4: 141}[info["seed"]]
    assert fc["fp32 stock flowcut T=64 batch [1]"].data["official_visual_per_layer"] == [[cut_at, cut_at, 64, 64]]
    assert fc["fp32 stock flowcut T=64 batch [1]"].data["our_visual_per_layer"] == [[160, 160, 64, 64]]
    assert fc["fp32 official flowcut T=64 batch [1]"].data["our_visual_per_layer"] == [[cut_at, cut_at, 64, 64]]
    # every stock check here holds one of the two images: all 8 differ (the unpruned logits too: 3.75 and 0.92 apart)
    assert not any(c.ok for c in checks if c.case.startswith("fp32 stock"))


@needs_official
def test_a_planted_change_in_our_next_llm_stage_makes_parity_fail(built, monkeypatch):
    import baselines.flowcut as fc

    work, info = built
    real = fc.flowcut_llm_select

    def relation_only(q_last, k_vis, v_last, v_vis, target, numerics="ours"):  # the semantic term dropped
        return real(q_last, k_vis, q_last, k_vis, target, numerics)

    monkeypatch.setattr(fc, "flowcut_llm_select", relation_only)
    checks = nx.run(info, str(OFFICIAL_PY), work, budgets=(64,), max_new_tokens=2, image_ids=(1,),
                    variants=("official",))
    cut = [c for c in checks if c.group == "next-flowcut"]
    assert all(c.ok for c in checks if c.group != "next-flowcut")
    assert cut and all("LLM stage kept set DIFFERS" in c.detail for c in cut)
    assert all(c.data["official_kept"] == c.data["our_kept"] for c in cut)  # the tower stage still agrees
