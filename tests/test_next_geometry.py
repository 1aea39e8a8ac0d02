"""``llava.load(next_geometry="official")`` (LLaVA-NeXT): LLaVA's own anyres geometry, which python -m parity next
traced as the two differences from transformers' (docs/parity.md): a pinpoint pair read as (width, height) - the
pairs are reversed for transformers, which reads (height, width) - and the unpadded side truncated
(``unpad_official``), not rounded."""

import pytest
import torch
from conftest import make_batch, rand_image, slice_batch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from llava.families.llava_next import unpad_official
from llava.models import load


def test_unpad_official_truncates_where_transformers_rounds():
    """A 48 x 48 map of an image 176 wide, 99 high: 99 * 48 / 176 = 26.999999999999996 -> int() 26 rows, padding
    11 per end, 26 rows kept (official); transformers rounds to 27 -> padding 10, 28 rows. The tall case cuts the
    width. Exact scales agree: 640 x 480 on 48 x 48 keeps 36 rows in both."""
    grid = torch.arange(48 * 48, dtype=torch.float64).view(1, 48, 48)
    assert unpad_official(grid, (99, 176)).shape == (1, 26, 48)
    assert unpad_image(grid, (99, 176)).shape == (1, 28, 48)
    assert torch.equal(unpad_official(grid, (99, 176)), grid[:, 11:37])
    assert unpad_official(grid, (176, 99)).shape == (1, 48, 26)
    assert unpad_official(grid, (480, 640)).shape == unpad_image(grid, (480, 640)).shape == (1, 36, 48)


def test_load_options_and_refusals():
    rt = load("tiny:llava-next", seed=1, next_geometry="official")
    stock = load("tiny:llava-next", seed=1)
    pins = stock.model.config.image_grid_pinpoints
    assert rt.model.config.image_grid_pinpoints == [p[::-1] for p in pins]
    assert rt.processor.image_processor.image_grid_pinpoints == [p[::-1] for p in pins]
    assert rt.model.config.next_unpad == "official" and rt.info["next_geometry"] == "official"
    assert rt.engine is not None and rt.engine_by_load  # the stock forward rounds: the engine runs the unpruned model
    assert getattr(stock.model.config, "next_unpad", "transformers") == "transformers" and stock.engine is None
    with pytest.raises(ValueError, match="next_geometry must be one of"):
        load("tiny:llava-next", seed=1, next_geometry="llava")
    with pytest.raises(ValueError, match="LLaVA-NeXT only"):
        load("tiny:llava", seed=1, next_geometry="official")


def test_pinpoint_tie_picks_the_official_grid():
    """The tiny pinpoints [[56, 112], [112, 56], [112, 112]]: a square image up to 56 px ties the first two. LLaVA reads
    [56, 112] as 56 wide x 112 high (a tall 2 x 1 grid); transformers as 56 high x 112 wide (a wide 1 x 2 grid)."""
    stock = load("tiny:llava-next", seed=1)
    off = load("tiny:llava-next", seed=1, next_geometry="official")
    assert stock.model.config.image_grid_pinpoints[0] == [56, 112]
    side = stock.model.config.vision_config.image_size
    assert get_anyres_image_grid_shape((40, 40), stock.model.config.image_grid_pinpoints, side) == (1, 2)
    assert get_anyres_image_grid_shape((40, 40), off.model.config.image_grid_pinpoints, side) == (2, 1)
    # the processor cuts the same grid: the tall 112 x 56 canvas' two crops are its top and bottom halves
    img = rand_image(3, 40, 40)
    px_off = off.processor(["q"], [img])["pixel_values"][0]
    px_stock = stock.processor(["q"], [img])["pixel_values"][0]
    assert px_off.shape == px_stock.shape and not torch.equal(px_off[1:3], px_stock[1:3])
    assert torch.equal(px_off[0], px_stock[0])  # the base crop does not depend on the grid


def test_token_count_follows_the_truncation_end_to_end():
    """An image 392 wide, 147 high on the tiny model (4 x 4 patches per 56-px crop; both geometries cut a 1 x 2 grid,
    a 4 x 8 patch map): 147 * (8 / 392) = 2.9999999999999996 -> official 2 rows kept (padding 1 per end), transformers
    3 -> padding 0, all 4 rows. Tokens: 16 (base) + rows x (8 + 1 newline) = 34 official, 52 transformers. The
    prompt's image tokens, the processor's count and the visual tokens the engine feeds the LLM agree, generation
    runs, and a batch holding that image equals each sample alone."""
    stock = load("tiny:llava-next", seed=1)
    off = load("tiny:llava-next", seed=1, next_geometry="official")
    h, w = 147, 392
    side = stock.model.config.vision_config.image_size
    assert get_anyres_image_grid_shape((h, w), stock.model.config.image_grid_pinpoints, side) == (1, 2)
    assert get_anyres_image_grid_shape((h, w), off.model.config.image_grid_pinpoints, side) == (1, 2)
    n_stock, n_off = stock.processor.image_tokens((h, w)), off.processor.image_tokens((h, w))
    assert (n_stock, n_off) == (16 + 4 * 9, 16 + 2 * 9)
    img = rand_image(5, h, w)
    inputs = off.processor(["what is this?"], [img])
    assert int((inputs["input_ids"] == off.model.config.image_token_id).sum()) == n_off
    with torch.no_grad():
        out = off.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert off.engine.stats.samples[0].visual_entering_llm == n_off
    batch = off.processor(["what is this?", "what color is the circle on the left?"], [img, rand_image(6, 40, 70)])
    with torch.no_grad():
        both = off.model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)[:, -3:]
    for i in range(2):
        one = slice_batch(batch, i, off)
        with torch.no_grad():
            alone = off.model.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)[:, -3:]
        assert torch.equal(alone[0], both[i])


def test_pruning_runs_under_the_official_geometry():
    off = load("tiny:llava-next", seed=1, next_geometry="official")
    inputs = make_batch(off)
    eng = off.prune("flowcut", 4, next_half=True, next_llm_stage=True)
    with torch.no_grad():
        off.model(**inputs)
    assert all(s.visual_per_layer[2:] == [4, 4] for s in eng.stats.samples)
    off.unprune()
    assert off.engine is not None and off.engine.method.name == "none"


def test_eval_run_takes_next_geometry(data, tmp_path, run_env):
    """``eval run --next-geometry official``: the run answers, its folder and config say so, the model record carries
    it (transformers' by default), a resume with the other geometry is refused, and another family is one clear error
    (exit 2)."""
    import json

    from eval.runner import RunConfig, run, run_dir_of

    kw = dict(benchmark="pope", model="tiny:llava-next", method="fastv", budget=8, data_root=str(data),
              out=str(tmp_path), wandb=False, max_new_tokens=2, limit=3)
    cfg = RunConfig(**kw, next_geometry="official")
    assert run(cfg) == 0
    rd = run_dir_of(cfg)
    assert "geom-official" in rd.name
    res = json.loads((rd / "results.json").read_text())
    assert res["model"]["next_geometry"] == "official" and res["counts"]["answered"] == 3
    assert json.loads((rd / "run_config.json").read_text())["config"]["next_geometry"] == "official"
    plain = RunConfig(**kw)
    assert run(plain) == 0 and run_dir_of(plain) != rd
    assert json.loads((run_dir_of(plain) / "results.json").read_text())["model"]["next_geometry"] == "transformers"
    clash = RunConfig(**kw, next_geometry="transformers", run_name=rd.name)
    assert run(clash) == 2  # the folder holds the official geometry's answers
    bad = RunConfig(**{**kw, "model": "tiny:llava", "out": str(tmp_path / "b")}, next_geometry="official")
    assert run(bad) == 2
