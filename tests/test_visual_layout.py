"""The adapter's one host layout (``FamilyAdapter.layout``): the eager executor lays out every input with it, and the
captured executor's ``visual_layout`` is the same layout where a batch has one image or one video per prompt."""

import pytest
import torch
from conftest import ALL_FAMILIES, rand_image


def _images(rt):
    return rt.processor(["what is this?", "what is shown here in the picture?"],
                        [rand_image(0, 56, 56), rand_image(1, 56, 84)])


@pytest.mark.parametrize("rt", ALL_FAMILIES, indirect=True)
def test_the_captured_layout_is_the_eager_layout(rt):
    """Two prompts of one image each: the captured layout's tokens, units, grids and sizes are the eager layout's (for
    InternVL, whose pixels do not say whose tiles are whose, the same tiles in the same order, grouped per prompt from
    the ids instead of a run per tile)."""
    batch = _images(rt)
    adapter = rt.prune("none", None).adapter
    visual = {k: v for k, v in batch.items() if k in adapter.visual_keys}
    (eager,) = adapter.layout(visual)
    ids = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -1)
    fast = adapter.visual_layout(visual, 2, ids)
    assert (fast.key, fast.token_id, fast.kind, fast.drop_cls) == (eager.key, eager.token_id, eager.kind,
                                                                   eager.drop_cls)
    for name in ("src", "unit", "patch", "unit_pos"):
        assert torch.equal(getattr(fast.units, name), getattr(eager.units, name)), name
    assert (fast.units.grid, fast.units.rows) == (eager.units.grid, eager.units.rows)
    placeholders = (batch["input_ids"] == eager.token_id).sum(1).tolist()
    assert list(fast.units.sizes) == placeholders and sum(eager.units.sizes) == sum(placeholders)
    if rt.family == "internvl":
        assert eager.units.sizes == (eager.units.sizes[0],) * len(eager.units.grid)  # a run per tile
    else:
        assert fast.units.sizes == eager.units.sizes and fast.units.counts == eager.units.counts


@pytest.mark.parametrize("rt", ["video-llava"], indirect=True)
def test_images_and_videos_in_one_batch_are_two_layouts_in_order(rt):
    """Video-LLaVA, an image prompt beside a video prompt: the images' layout (a unit per image, its [CLS] dropped),
    then the videos' (a unit per frame, its [CLS] fed); the captured executor refuses the mix."""
    batch = rt.processor(["what is this?", "what happens?"], [rand_image(0), None],
                         videos=[None, [rand_image(k) for k in range(8)]])
    adapter = rt.prune("none", None).adapter
    visual = {k: v for k, v in batch.items() if k in adapter.visual_keys}
    images, videos = adapter.layout(visual)
    f = batch["pixel_values_videos"].shape[1]
    assert (images.key, images.kind, images.drop_cls, len(images.units.grid)) == ("pixel_values", "image", True, 1)
    assert (videos.key, videos.kind, videos.drop_cls, len(videos.units.grid)) == ("pixel_values_videos", "frame",
                                                                                  False, f)
    assert videos.units.sizes == (f * (images.units.sizes[0] + 1),)  # f frames of the image's tokens and a [CLS]
    with pytest.raises(ValueError, match="images or videos in one batch, not both"):
        adapter.visual_layout(visual, 2)
