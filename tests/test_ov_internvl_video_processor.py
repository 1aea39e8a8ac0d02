"""LLaVA-OneVision and InternVL3 / 3.5 video prompts built by our processor (llava/preprocess_ov_internvl_video.py, no
torchvision).

* Equal to transformers' own processors: tests/fixtures/ov_internvl_video/ holds what ``LlavaOnevisionProcessor`` +
  ``LlavaOnevisionVideoProcessor`` and ``InternVLProcessor`` + ``InternVLVideoProcessor`` (torchvision backend, CPU)
  returned for small synthetic videos (1, 2, 3 and 5 frames; 20x100 to 150x130 frames that grow, shrink, or already
  have the tower's size; batches of two; the tiny models' settings, and CLIP mean / std once); recorded by
  ``/tmp/tvenv/bin/python tests/fixtures/ov_internvl_video/generate.py`` (see its docstring). Ours gives the same
  ``input_ids`` / ``attention_mask`` exactly and bit-identical pixels (``pixel_values_videos`` / ``pixel_values``; no
  tolerance: the resize is the uint8 bicubic kernel torchvision itself calls on a CPU; checked value by value and by
  the sha256 of the float32 bytes), and writes InternVL's ``Frame{i}: <img>...</img>`` text as transformers does.
* Through the engine on the tiny models: keep-all == the stock model (logits and greedy tokens); a pruned video
  (ConsensusDrop, VisionZip: per frame) decodes as a no-cache recompute; a batch of two videos answers as each alone
  (InternVL: unequal frame counts; OneVision: equal counts, unequal ones refused as the model stacks the videos); bad
  inputs are refused with the reason.
* The harness: ``MODEL=tiny:llava-onevision bash scripts/eval/msvd.sh consensusdrop 16`` (and InternVL) on the MSVD
  fixture data runs end to end, records the video preprocessing, and prunes where the budget is below the count.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import greedy_no_cache, rand_image
from PIL import Image

from llava.preprocess_ov_internvl_video import FrameVideoSettings, internvl_video_text, onevision_video_tokens

FIX = Path(__file__).resolve().parent / "fixtures" / "ov_internvl_video"
MANIFEST = json.loads((FIX / "cases.json").read_text())
ARRAYS = np.load(FIX / "cases.npz")
CASES = {c["name"]: c for c in MANIFEST["cases"]}
QUESTION, QUESTION2 = MANIFEST["questions"]
TINY = {"llava_onevision": "llava-onevision", "internvl": "internvl"}
PIXELS = {"llava_onevision": "pixel_values_videos", "internvl": "pixel_values"}
GEN = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
REPO = Path(__file__).resolve().parents[1]


def processor(runtimes, family, settings=None):
    """A copy of the tiny model's processor (its own settings cache), optionally with other video settings."""
    proc = dataclasses.replace(runtimes[TINY[family]].processor, extra={})
    if settings is not None:
        proc.video_settings = settings
    return proc


def case_settings(case) -> FrameVideoSettings:
    s = case["settings"]
    return FrameVideoSettings(family=case["family"], height=s["side"], width=s["side"],
                              image_mean=tuple(s["image_mean"]), image_std=tuple(s["image_std"]))


def case_videos(case) -> list:
    return [[Image.fromarray(f) for f in ARRAYS["frames/" + "_".join(map(str, v))].transpose(0, 2, 3, 1)]
            for v in case["videos"]]


def frames(seed, n, h, w):
    return [rand_image(100 * seed + k, h, w) for k in range(n)]


# -- equal to transformers' processors ------------------------------------------------------------------------------
def test_fixtures_use_the_tiny_models_settings_and_our_prompts(runtimes):
    assert MANIFEST["transformers"] == "5.23.0" and MANIFEST["torchvision"].startswith("0.29.1")
    for family, case in (("llava_onevision", "ov_tiny_3f_up"), ("internvl", "ivl_tiny_3f_up")):
        got = processor(runtimes, family).video_settings
        assert got == dataclasses.replace(case_settings(CASES[case]), source=got.source)
        proc = processor(runtimes, family)
        assert [proc.prompt_text(q, 0, video=True) for q in (QUESTION, QUESTION2)] == MANIFEST["prompts"][family]
        # transformers' processors refuse a batch of unequal frame counts (they stack the videos)
        assert MANIFEST[f"{family}_unequal_frames"].startswith("ValueError")


@pytest.mark.parametrize("name", list(CASES))
def test_equal_to_transformers_video_processor(runtimes, name):
    case = CASES[name]
    family = case["family"]
    proc = processor(runtimes, family, case_settings(case))
    videos = case_videos(case)
    out = proc([QUESTION, QUESTION2][:len(videos)], videos=videos)
    assert sorted(out) == case["keys"]
    for key in ("input_ids", "attention_mask"):
        assert out[key].dtype == torch.int64 and np.array_equal(out[key].numpy(), ARRAYS[f"{name}/{key}"]), key
    px = out[case["pixel_key"]]
    assert px.dtype == torch.float32 and list(px.shape) == case["pixel_shape"]
    lut, codes = ARRAYS[f"{name}/pixel_lut"], ARRAYS[f"{name}/pixel_codes"]  # transformers' floats, losslessly
    ref = lut[np.arange(3).reshape(3, 1, 1), codes]
    assert np.array_equal(px.numpy().view(np.uint32), ref.view(np.uint32))  # bit-identical
    assert hashlib.sha256(px.numpy().tobytes()).hexdigest() == case["pixel_sha256"]
    for v, reps in zip(videos, case["replacements"]):  # what the placeholder became, in transformers' processor
        if family == "internvl":
            assert reps == [internvl_video_text(len(v), proc.tokens_per_crop)]
        else:
            assert reps == ["<video>" * onevision_video_tokens(proc.model_config, len(v))]


# -- through the engine -------------------------------------------------------------------------------------------
def _run(rt, inputs):
    with torch.no_grad():
        return rt.model(**inputs).logits, rt.model.generate(**inputs, **GEN)


@pytest.mark.parametrize("family", list(TINY))
def test_keep_all_video_prompt_is_the_stock_model(runtimes, family):
    rt = runtimes[TINY[family]]
    inputs = rt.processor([QUESTION], videos=[frames(1, 3, 48, 64)])
    cfg = rt.model.config
    ids = inputs["input_ids"][0]
    if family == "llava_onevision":  # 3 frames x 2x2 pooled + 1 newline
        n_vid = int((ids == cfg.video_token_id).sum())
        assert n_vid == 13 and tuple(inputs["pixel_values_videos"].shape) == (1, 3, 3, 56, 56)
    else:  # 3 frames x 16 tokens, one tile each, each in <img> ... </img>
        n_vid = int((ids == cfg.image_token_id).sum())
        assert n_vid == 48 and tuple(inputs["pixel_values"].shape) == (3, 3, 112, 112)
        assert int((ids == rt.tokenizer.convert_tokens_to_ids("<img>")).sum()) == 3
    rt.unprune()
    stock = _run(rt, inputs)
    try:
        eng = rt.prune("none")
        got = _run(rt, inputs)
    finally:
        rt.unprune()
    assert torch.equal(got[0], stock[0]) and torch.equal(got[1], stock[1])
    assert eng.stats.samples[0].visual_candidates == n_vid


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("method", ["consensusdrop", "visionzip"])
def test_pruned_video_decodes_as_a_no_cache_recompute(runtimes, family, method):
    rt = runtimes[TINY[family]]
    inputs = rt.processor([QUESTION], videos=[frames(2, 3, 40, 60)])
    n = 13 if family == "llava_onevision" else 48
    try:
        eng = rt.prune(method, 2)
        with torch.no_grad():
            gen = rt.model.generate(**inputs, **GEN)
        s = eng.stats.samples[0]
        assert s.visual_candidates == n and s.visual_entering_llm < n
        if method == "consensusdrop":  # 2 per frame (+ OneVision's newline)
            assert s.visual_entering_llm == (7 if family == "llava_onevision" else 6)
        eng.replay = True
        assert torch.equal(gen, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))
    finally:
        rt.unprune()


@pytest.mark.parametrize("family", list(TINY))
def test_batch_of_two_videos_answers_as_each_alone(runtimes, family):
    rt = runtimes[TINY[family]]
    qs = [QUESTION, QUESTION2]
    counts = (3, 3) if family == "llava_onevision" else (2, 4)  # OneVision stacks the videos: one frame count
    vids = [frames(4, counts[0], 48, 64), frames(5, counts[1], 60, 40)]
    batch = rt.processor(qs, videos=vids)
    alone = [rt.processor([q], videos=[v]) for q, v in zip(qs, vids)]
    key = PIXELS[family]
    assert torch.equal(batch[key], torch.cat([a[key] for a in alone]))
    for i, a in enumerate(alone):
        real = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][real].tolist() == a["input_ids"][0].tolist()
    gen = dict(GEN, output_logits=True, return_dict_in_generate=True)
    try:
        for method, b in (("none", None), ("consensusdrop", 2)):
            rt.prune(method, b)
            with torch.no_grad():
                got = rt.model.generate(**batch, **gen)
                ref = [rt.model.generate(**a, **gen) for a in alone]
            L = batch["input_ids"].shape[1]
            for i, r in enumerate(ref):
                assert torch.equal(got.sequences[i, L:], r.sequences[0, -GEN["max_new_tokens"]:])
                torch.testing.assert_close(torch.stack(got.logits, 1)[i], torch.stack(r.logits, 1)[0], atol=1e-5,
                                           rtol=0)
    finally:
        rt.unprune()
    if family == "llava_onevision":
        with pytest.raises(ValueError, match=r"one frame count .*got \[2, 3\]"):
            rt.processor(qs, videos=[frames(4, 2, 48, 64), frames(5, 3, 48, 64)])


def test_bad_video_inputs_are_refused_with_the_reason(runtimes):
    ov, ivl = processor(runtimes, "llava_onevision"), processor(runtimes, "internvl")
    for proc in (ov, ivl):
        with pytest.raises(ValueError, match="one size"):
            proc([QUESTION], videos=[frames(0, 2, 40, 60) + frames(1, 1, 50, 60)])
        with pytest.raises(ValueError, match="at least one frame"):
            proc([QUESTION], videos=[[]])
        with pytest.raises(ValueError, match="mixing images and a video"):
            proc([QUESTION], images=[rand_image(0)], videos=[frames(0, 2, 40, 60)])
        with pytest.raises(ValueError, match="no such file"):
            proc([QUESTION], videos=["/nonexistent/video"])
        with pytest.raises(ValueError, match="only bicubic"):
            dataclasses.replace(proc.video_settings, resample=2)
        with pytest.raises(ValueError, match="crops"):  # frames must be the tower's square: one crop / tile each
            proc.video_settings = dataclasses.replace(proc.video_settings, height=64, width=64)
    with pytest.raises(ValueError, match="1 video placeholder"):  # a <video> but no video
        ov([QUESTION], prompts=[MANIFEST["prompts"]["llava_onevision"][0]])
    with pytest.raises(ValueError, match="1 video placeholder"):
        ivl([QUESTION], prompts=[MANIFEST["prompts"]["internvl"][0]])
    with pytest.raises(ValueError, match="this one has 2"):
        ivl([QUESTION], videos=[frames(0, 2, 40, 60)], prompts=["<video>\n<video>\nwhat?"])
    with pytest.raises(ValueError, match="must not hold <IMG_CONTEXT>"):
        ivl([QUESTION], videos=[frames(0, 2, 40, 60)], prompts=["<IMG_CONTEXT>\n<video>\nwhat?"])
    with pytest.raises(ValueError, match="image and video samples in one batch"):  # one pixel_values tensor
        ivl([QUESTION, QUESTION], images=[rand_image(0), None], videos=[None, frames(0, 2, 40, 60)])
    from llava.preprocess_ov_internvl_video import settings_from_config

    s = settings_from_config("internvl", {"size": {"height": 448, "width": 448}})  # over transformers' class defaults
    assert (s.height, s.width, s.image_mean, s.resample) == (448, 448, (0.48145466, 0.4578275, 0.40821073), 3)
    with pytest.raises(ValueError, match="only a fixed"):
        settings_from_config("llava_onevision", {"size": {"shortest_edge": 384}})
    with pytest.raises(ValueError, match="centre crop"):
        settings_from_config("llava_onevision", {"do_center_crop": True})


def test_a_checkpoint_folder_gives_its_video_processor_config(runtimes, tmp_path):
    """transformers' order: video_preprocessor_config.json, else preprocessor_config.json (the image processor's)."""
    from llava import load

    rt = runtimes["llava-onevision"]
    rt.model.save_pretrained(tmp_path)
    rt.tokenizer.save_pretrained(tmp_path)
    rt.processor.image_processor.save_pretrained(tmp_path)
    s = load(str(tmp_path)).processor.video_settings
    assert (s.height, s.width, s.image_mean, s.resample) == (56, 56, (0.5, 0.5, 0.5), 3)
    assert str(tmp_path) in s.source
    video_cfg = {"size": {"height": 56, "width": 56}, "image_mean": [0.25, 0.5, 0.75], "image_std": [0.5, 0.5, 0.5],
                 "video_processor_type": "LlavaOnevisionVideoProcessor"}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video_cfg))
    loaded = load(str(tmp_path))
    assert loaded.processor.video_settings.image_mean == (0.25, 0.5, 0.75)
    out = loaded.processor([QUESTION], videos=[frames(0, 2, 30, 50)])
    ref = processor(runtimes, "llava_onevision", dataclasses.replace(
        rt.processor.video_settings, image_mean=(0.25, 0.5, 0.75)))([QUESTION], videos=[frames(0, 2, 30, 50)])
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["pixel_values_videos"], ref["pixel_values_videos"])
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(dict(video_cfg, size={"height": 384,
                                                                                              "width": 384})))
    with pytest.raises(ValueError, match="not the tower's 56x56"):
        load(str(tmp_path)).processor([QUESTION], videos=[frames(0, 2, 30, 50)])


# -- the harness --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def msvd_data(tmp_path_factory):
    from eval.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("ov_internvl_video_msvd"), ["msvd"])


@pytest.mark.parametrize("model, budget, tok_in", [
    # fixture videos: 32x24 GIFs and a 9-frame folder, 8 frames taken. OneVision: 8 x 2x2 pooled + 1 newline = 33
    # (budget 16 per frame keeps all; 2 per frame: 16 + the newline); InternVL: 8 frames x 16 = 128, 4 per frame: 32
    ("tiny:llava-onevision", "16", 33.0),
    ("tiny:llava-onevision", "2", 17.0),
    ("tiny:internvl", "4", 32.0),
])
def test_msvd_script_runs_on_onevision_and_internvl(msvd_data, tmp_path, model, budget, tok_in):
    env = {**os.environ, "MODEL": model, "NPROC": "1", "DATA_ROOT": str(msvd_data), "OUT": str(tmp_path),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "EXTRA_ARGS": "--max-new-tokens 3 --no-wandb"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(["bash", str(REPO / "scripts/eval/msvd.sh"), "consensusdrop", budget], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rd = tmp_path / "msvd" / f"tiny-{model.split(':')[1]}_consensusdrop_b{budget}"
    res = json.loads((rd / "results.json").read_text())
    assert res["counts"] == {"questions": 5, "answered": 5}
    assert res["tokens"]["tok_in"] == tok_in
    m = res["model"]
    family = "llava_onevision" if "onevision" in model else "internvl"
    assert m["num_frames"] == 8 and m["frame_sampling"].startswith("harness")
    assert m["video_preprocess"]["family"] == family and m["video_preprocess"]["resample"] == 3
    assert "a video: per frame" in m["budget_unit"]
    assert len(list((rd / "overlays").glob("*.png"))) > 0  # the kept tokens over each video's first frame
