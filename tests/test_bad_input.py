"""Bad input gets a clear error or a documented no-op, never a silent wrong answer."""

import logging

import numpy as np
import pytest
import torch
from conftest import FAMILIES, make_batch, rand_image
from PIL import Image

import llava.preprocess as pre
from llava.method import get_method

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_budget_must_be_a_positive_whole_number(budget):
    with pytest.raises(ValueError, match="budget"):
        get_method("test_keep_first_k", budget)


def test_unknown_method_lists_known_ones():
    with pytest.raises(KeyError) as e:
        get_method("fastvv", 64)
    assert "known methods" in str(e.value) and "none" in str(e.value) and "test_keep_first_k" in str(e.value)


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="unknown option"):
        get_method("test_every_other_after2", strid=3)


@ALL
def test_budget_above_available_tokens_is_a_reported_noop(rt, caplog):
    inputs = make_batch(rt, n=2)
    eng = rt.prune("test_keep_first_k", 10**6)
    with caplog.at_level(logging.INFO, logger="llava.engine"), torch.no_grad():
        rt.model(**inputs)
    assert all(s.vision_noop for s in eng.stats.samples)
    assert all(s.visual_entering_llm == s.visual_candidates for s in eng.stats.samples)
    assert "nothing pruned" in caplog.text


def test_missing_and_corrupt_image_files(runtimes, tmp_path):
    rt = runtimes["llava"]
    with pytest.raises(FileNotFoundError, match="not found"):
        rt.processor(["what?"], [tmp_path / "nope.png"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image"):
        rt.processor(["what?"], [bad])
    trunc = tmp_path / "trunc.png"
    rand_image(0, 64, 64).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read image"):
        rt.processor(["what?"], [trunc])


def test_too_large_image_is_refused_clearly(runtimes, tmp_path, monkeypatch):
    rt = runtimes["llava"]
    p = tmp_path / "big.png"
    rand_image(0, 300, 400).save(p)
    monkeypatch.setattr(pre, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(ValueError, match="pixel limit"):
        rt.processor(["what?"], [p])


def _odd_images(tmp_path):
    rgba = Image.fromarray((np.random.RandomState(1).rand(30, 50, 4) * 255).astype("uint8"), "RGBA")
    grey = Image.fromarray((np.random.RandomState(2).rand(45, 20) * 255).astype("uint8"), "L")
    one = Image.new("RGB", (1, 1), (200, 10, 10))
    big = Image.new("RGB", (4000, 3000), (10, 200, 10))
    pal = rgba.convert("P")
    path = tmp_path / "rgba.png"
    rgba.save(path)
    return {"rgba": rgba, "grey": grey, "one_pixel": one, "large": big, "palette": pal, "rgba_file": path}


@ALL
def test_unusual_images_work(rt, tmp_path):  # Video-LLaVA: its image tower path
    imgs = _odd_images(tmp_path)
    rt.prune("test_keep_first_k", 4)
    for name, img in imgs.items():
        inputs = rt.processor(["what is this?"], [img])
        assert inputs["pixel_values"].shape[-3] == 3, name
        with torch.no_grad():
            out = rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2, name
        assert rt.engine.stats.samples[0].visual_entering_llm == 4, name


def test_unusual_video_frames_work(runtimes, tmp_path):
    rt = runtimes["video-llava"]
    imgs = _odd_images(tmp_path)
    frames = [imgs["rgba"], imgs["grey"], imgs["one_pixel"], imgs["palette"]] * 2
    inputs = rt.processor(["what happens?"], videos=[frames])
    assert inputs["pixel_values_videos"].shape == (1, 8, 3, 56, 56)
    with torch.no_grad():
        rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_placeholder_count_must_match_images(runtimes):
    rt = runtimes["llava"]
    img = rand_image(0)
    with pytest.raises(ValueError, match="placeholder"):
        rt.processor(["q"], [img], prompts=["USER: <image> <image>\nq ASSISTANT:"])
    with pytest.raises(ValueError, match="no image was given"):
        rt.processor(["q"], [None], prompts=["USER: <image>\nq ASSISTANT:"])
    # the model called directly with one placeholder run too short for its image
    inputs = rt.processor(["what is this?"], [img])
    ids = inputs["input_ids"]
    img_id = rt.model.config.image_token_id
    first = int((ids[0] == img_id).nonzero()[0])
    short = torch.cat([ids[:, :first], ids[:, first + 1:]], 1)
    rt.prune("test_keep_first_k", 4)
    with pytest.raises(ValueError, match="placeholder tokens"):
        rt.model(input_ids=short, attention_mask=torch.ones_like(short), pixel_values=inputs["pixel_values"])
    rt.unprune()


def test_images_split_across_rows_is_an_error(runtimes):
    rt = runtimes["llava"]
    inputs = rt.processor(["what is this?", "what is it?"], [[rand_image(0), rand_image(1)], None],
                          prompts=["USER: <image><image>\nwhat is this? ASSISTANT:", "USER: what is it? ASSISTANT:"])
    ids = inputs["input_ids"].clone()
    img_id = rt.model.config.image_token_id
    # move 8 of the second image's 16 placeholders into row 1: counts still match overall, but
    # that image now straddles two rows
    row0 = (ids[0] == img_id).nonzero().flatten()
    ids[0, row0[-8:]] = 5
    ids[1, -8:] = img_id
    rt.prune("test_keep_first_k", 4)
    with pytest.raises(ValueError, match="split across batch rows"):
        rt.model(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    rt.unprune()


def test_labels_are_refused_while_pruning(runtimes):
    rt = runtimes["llava"]
    inputs = rt.processor(["what is this?"], [rand_image(0)])
    rt.prune("test_keep_first_k", 4)
    with pytest.raises(ValueError, match="labels"):
        rt.model(**inputs, labels=inputs["input_ids"])
    rt.unprune()


def test_llm_stage_layer_out_of_range():
    from llava.models import load

    rt = load("tiny:llava")
    with pytest.raises(ValueError, match="llm stage layers"):
        rt.prune("test_every_other_after2", layer=4)
    with pytest.raises(ValueError, match="llm stage layers"):
        rt.prune("test_every_other_after2", layer=0)
