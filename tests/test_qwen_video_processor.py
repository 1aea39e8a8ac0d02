"""Qwen2.5-VL / Qwen3-VL / Qwen3.5 video prompts built by our processor (llava/preprocess_qwen_video.py, no
torchvision).

* Equal to transformers' own processors: tests/fixtures/qwen_video/ holds what ``Qwen2_5_VLProcessor`` /
  ``Qwen3VLProcessor`` with ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor`` (torchvision backend, CPU) returned
  for small synthetic videos (2 to 7 frames, odd counts, 12x40 to 60x90, batches of two unequal videos, with and
  without the source's timing, the resize's grow / shrink / per-frame cap branches, the tiny models' settings);
  recorded by ``/tmp/tvenv/bin/python tests/fixtures/qwen_video/generate.py`` (see its docstring). Ours gives the
  same ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` and ``video_grid_thw`` exactly, the same
  ``second_per_grid_ts`` (float32, exactly) and bit-identical ``pixel_values_videos`` (no tolerance: the resize is
  the uint8 bicubic kernel torchvision itself calls on a CPU).
* Through the engine on the tiny models: keep-all == the stock model (logits and greedy tokens); a pruned video
  (per temporal slice, and inside the LLM) decodes as a no-cache recompute; a batch of two videos of unequal frame
  counts and sizes answers as each alone; bad inputs are refused with the reason.
* The harness: ``MODEL=tiny:<qwen> bash scripts/eval/msvd.sh consensusdrop 16`` on the MSVD fixture data (GIFs and a
  frame folder) runs end to end, records the video preprocessing, and prunes where the budget is below the count.
"""

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import greedy_no_cache, rand_image
from PIL import Image

from llava.preprocess_video_files import decode_video
from llava.preprocess_qwen_video import Frames, VideoSettings, slice_times

FIX = Path(__file__).resolve().parent / "fixtures" / "qwen_video"
MANIFEST = json.loads((FIX / "cases.json").read_text())
ARRAYS = np.load(FIX / "cases.npz")
CASES = {c["name"]: c for c in MANIFEST["cases"]}
QUESTION = "what is happening in the video?"
TINY = {"qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl", "qwen3_5": "qwen3.5"}
GEN = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
REPO = Path(__file__).resolve().parents[1]


def processor(runtimes, family, settings=None):
    """A copy of the tiny model's processor (its own settings cache), optionally with other video settings."""
    proc = dataclasses.replace(runtimes[TINY[family]].processor, extra={})
    if settings is not None:
        proc.video_settings = settings
    return proc


def case_settings(case) -> VideoSettings:
    s = case["settings"]
    rule = "qwen2_vl" if case["rule"] == "qwen2_5_vl" else "qwen3_vl"
    return VideoSettings(rule=rule, min_pixels=s["min_pixels"], max_pixels=s["max_pixels"], patch_size=14,
                         image_mean=tuple(s["image_mean"]), image_std=tuple(s["image_std"]),
                         cap_pixels_per_frame=s.get("cap_pixels_per_frame", False),
                         max_video_tokens=s.get("max_video_tokens", 128000 if rule == "qwen2_vl" else 768))


def case_videos(case) -> list:
    out = []
    for v, meta in zip(case["videos"], case["metadata"]):
        frames = [Image.fromarray(f) for f in ARRAYS["frames/" + "_".join(map(str, v))]]
        out.append(Frames(frames, **meta) if meta else frames)
    return out


def frames(seed, n, h, w):
    return [rand_image(100 * seed + k, h, w) for k in range(n)]


# -- equal to transformers' processors ------------------------------------------------------------------------------
def test_fixtures_use_the_tiny_models_settings_and_our_prompt(runtimes):
    assert MANIFEST["transformers"] == "5.23.0" and MANIFEST["torchvision"].startswith("0.29.1")
    for family, case in (("qwen2_5_vl", "q25_tiny_2f_fps"), ("qwen3_vl", "q3_tiny_5f_fps"),
                         ("qwen3_vl", "q3_tiny_small_frames")):
        got = processor(runtimes, family).video_settings
        assert got == dataclasses.replace(case_settings(CASES[case]), source=got.source)
    assert processor(runtimes, "qwen3_5").video_settings == processor(runtimes, "qwen3_vl").video_settings
    assert processor(runtimes, "qwen2_5_vl").prompt_text(QUESTION, 0, video=True) == MANIFEST["prompt"]


@pytest.mark.parametrize("name", list(CASES))
def test_equal_to_transformers_video_processor(runtimes, name):
    case = CASES[name]
    proc = processor(runtimes, case["rule"], case_settings(case))
    videos = case_videos(case)
    out = proc([QUESTION] * len(videos), videos=videos)
    want = {k.split("/", 1)[1]: ARRAYS[k] for k in ARRAYS.files if k.startswith(name + "/")}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw"):
        assert out[key].dtype == torch.int64 and np.array_equal(out[key].numpy(), want[key]), key
    if case["rule"] == "qwen2_5_vl":  # the M-RoPE time axis: temporal patch / sampled fps, float32 as transformers
        assert out["second_per_grid_ts"].dtype == torch.float32
        assert np.array_equal(out["second_per_grid_ts"].numpy(), want["second_per_grid_ts"])
    else:
        assert "second_per_grid_ts" not in out
    codes, lut = want["pixel_codes"], want["pixel_lut"]  # transformers' floats, stored losslessly (generate.py)
    channel = np.arange(codes.shape[1]) // (codes.shape[1] // 3)
    ref = lut[channel[None, :], codes]
    px = out["pixel_values_videos"]
    assert px.dtype == torch.float32 and tuple(px.shape) == ref.shape
    assert np.array_equal(px.numpy().view(np.uint32), ref.view(np.uint32))  # bit-identical
    if case["rule"] == "qwen3_vl":  # the timestamps text transformers wrote, slice by slice
        for v, reps in zip(videos, case["replacements"]):
            idx = v.frames_indices if isinstance(v, Frames) else list(range(len(v)))
            times = slice_times(proc.video_settings, idx, getattr(v, "fps", None))
            assert [r.split("<|vision_start|>")[0] for r in reps[0].split("<|vision_end|>")[:-1]] == \
                [f"<{t:.1f} seconds>" for t in times]


def test_qwen3_refuses_a_video_shorter_than_its_temporal_patch_as_transformers(runtimes):
    assert MANIFEST["qwen3_one_frame"].startswith("ValueError")
    for family in ("qwen3_vl", "qwen3_5"):
        with pytest.raises(ValueError, match="at least 2 frames"):
            processor(runtimes, family)([QUESTION], videos=[frames(0, 1, 40, 60)])
    out = processor(runtimes, "qwen2_5_vl")([QUESTION], videos=[frames(0, 1, 40, 60)])  # 2.5-VL pads it to 2
    assert out["video_grid_thw"][0, 0] == 1


def test_decoded_videos_carry_their_timing_into_the_prompt(runtimes, tmp_path):
    """A GIF of 10 frames at 40 ms: 8 sampled at 0,1,2,3,5,6,7,9 of 25 fps -> slices at 0.02, 0.1, 0.22, 0.32 s
    (Qwen3-VL's text) and 2 / (8 / 10 * 25) = 0.1 s per slice (Qwen2.5-VL's time axis)."""
    path = tmp_path / "v.gif"
    imgs = frames(3, 10, 24, 32)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=40, loop=0)
    v = decode_video(path, 8)
    assert isinstance(v, Frames)
    assert (v.fps, v.total_num_frames, v.frames_indices) == (25.0, 10, [0, 1, 2, 3, 5, 6, 7, 9])
    proc = processor(runtimes, "qwen3_vl")
    ids = proc([QUESTION], videos=[str(path)])["input_ids"][0].tolist()
    tok, cfg = proc.tokenizer, proc.model_config
    for t in ("0.0", "0.1", "0.2", "0.3"):
        stamp = tok(f"<{t} seconds>", add_special_tokens=False).input_ids + [cfg.vision_start_token_id]
        assert any(ids[i:i + len(stamp)] == stamp for i in range(len(ids))), t
    q25 = processor(runtimes, "qwen2_5_vl")([QUESTION], videos=[str(path)])
    assert q25["second_per_grid_ts"].tolist() == [pytest.approx(0.1)]
    bare = processor(runtimes, "qwen2_5_vl")([QUESTION], videos=[list(v)])  # bare frames: transformers' 24 fps
    assert bare["second_per_grid_ts"].tolist() == [pytest.approx(2 / 24)]


def test_video_files_decoded_with_pyav_carry_their_timing(tmp_path):
    pytest.importorskip("av")
    from test_video_files import write_video

    v = decode_video(write_video(tmp_path / "v.mp4", "libx264"), 8)  # 30 frames at 10 fps
    assert (v.fps, v.total_num_frames, v.frames_indices) == (10.0, 30, [0, 4, 8, 12, 16, 20, 24, 29])


def test_a_checkpoint_folder_gives_its_video_processor_config(runtimes, tmp_path):
    """transformers' order: video_preprocessor_config.json, else preprocessor_config.json (the Qwen2.5-VL
    checkpoints have no video config: their video processor reads the image one)."""
    from llava import load

    rt = runtimes["qwen3-vl"]
    rt.model.save_pretrained(tmp_path)
    rt.tokenizer.save_pretrained(tmp_path)
    rt.processor.image_processor.save_pretrained(tmp_path)
    s = load(str(tmp_path)).processor.video_settings
    assert (s.rule, s.min_pixels, s.max_pixels) == ("qwen3_vl", 3136, 12845056)
    assert s.image_mean == tuple(rt.processor.image_processor.image_mean)
    assert str(tmp_path) in s.source
    video_cfg = {"size": {"shortest_edge": 784, "longest_edge": 6272}, "patch_size": 14, "temporal_patch_size": 2,
                 "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                 "video_processor_type": "Qwen3VLVideoProcessor"}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video_cfg))
    loaded = load(str(tmp_path))
    s = loaded.processor.video_settings
    assert (s.min_pixels, s.max_pixels, s.image_mean, s.cap_pixels_per_frame) == (784, 6272, (0.5, 0.5, 0.5), False)
    out = loaded.processor([QUESTION], videos=[frames(0, 4, 60, 90)])  # 4 x 56 x 84 > 6272: shrunk to 28 x 28
    assert out["video_grid_thw"].tolist() == [[2, 2, 2]]
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(dict(video_cfg, patch_size=16)))
    with pytest.raises(ValueError, match="differ from the tower's"):
        load(str(tmp_path)).processor([QUESTION], videos=[frames(0, 4, 60, 90)])


# -- through the engine -------------------------------------------------------------------------------------------
def _run(rt, inputs):
    with torch.no_grad():
        return rt.model(**inputs).logits, rt.model.generate(**inputs, **GEN)


@pytest.mark.parametrize("family", list(TINY))
def test_keep_all_video_prompt_is_the_stock_model_and_its_layout(runtimes, family):
    rt = runtimes[TINY[family]]
    inputs = rt.processor([QUESTION], videos=[frames(1, 5, 48, 64)])  # 5 frames -> 3 temporal slices
    cfg = rt.model.config
    t, h, w = inputs["video_grid_thw"][0].tolist()
    ids = inputs["input_ids"][0]
    n_vid = int((ids == cfg.video_token_id).sum())
    assert t == 3 and n_vid == t * h * w // 4
    assert torch.equal(inputs["mm_token_type_ids"][0], (ids == cfg.video_token_id).long() * 2)
    runs = int((ids == cfg.vision_start_token_id).sum())
    assert runs == (1 if family == "qwen2_5_vl" else 1 + t)  # Qwen3: a vision_start / end run per slice, inside one
    assert ("second_per_grid_ts" in inputs) == (family == "qwen2_5_vl")
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
@pytest.mark.parametrize("method", ["consensusdrop", "fastv"])
def test_pruned_video_decodes_as_a_no_cache_recompute(runtimes, family, method):
    rt = runtimes[TINY[family]]
    inputs = rt.processor([QUESTION], videos=[frames(2, 6, 48, 64)])  # 3 slices of 4 merged tokens
    opts = {"fastv": {"layer": 2, "scale_layers": False}}.get(method, {}) if family == "qwen3_5" else {}
    try:
        eng = rt.prune(method, 2 if method == "consensusdrop" else None, **opts)
        with torch.no_grad():
            gen = rt.model.generate(**inputs, **GEN)
        s = eng.stats.samples[0]
        assert s.visual_candidates == 12 and min(s.visual_per_layer) < 12
        if method == "consensusdrop":
            assert s.visual_entering_llm == 6  # 2 per temporal slice
        eng.replay = True
        assert torch.equal(gen, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))
    finally:
        rt.unprune()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_batch_of_two_videos_of_unequal_frame_counts_answers_as_each_alone(runtimes, family):
    rt = runtimes[TINY[family]]
    qs = [QUESTION, "how many objects are there in the picture?"]
    vids = [frames(4, 5, 48, 64), Frames(frames(5, 8, 60, 40), fps=4.0, total_num_frames=16,
                                         frames_indices=range(0, 16, 2))]
    batch = rt.processor(qs, videos=vids)
    alone = [rt.processor([q], videos=[v]) for q, v in zip(qs, vids)]
    assert batch["video_grid_thw"].tolist() == [a["video_grid_thw"][0].tolist() for a in alone]
    assert torch.equal(batch["pixel_values_videos"], torch.cat([a["pixel_values_videos"] for a in alone]))
    for i, a in enumerate(alone):
        real = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][real].tolist() == a["input_ids"][0].tolist()
        assert batch["mm_token_type_ids"][i][real].tolist() == a["mm_token_type_ids"][0].tolist()
        assert int((batch["mm_token_type_ids"][i] * (1 - batch["attention_mask"][i])).abs().sum()) == 0
    if family == "qwen2_5_vl":
        assert batch["second_per_grid_ts"].tolist() == pytest.approx([2 / 24, 2 / (8 / 16 * 4.0)])
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


def test_bad_video_inputs_are_refused_with_the_reason(runtimes):
    proc = processor(runtimes, "qwen2_5_vl")
    with pytest.raises(ValueError, match="one size"):
        proc([QUESTION], videos=[frames(0, 2, 40, 60) + frames(1, 1, 50, 60)])
    with pytest.raises(ValueError, match="at least one frame"):
        proc([QUESTION], videos=[[]])
    with pytest.raises(ValueError, match="mixing images and a video"):
        proc([QUESTION], images=[rand_image(0)], videos=[frames(0, 2, 40, 60)])
    with pytest.raises(ValueError, match="1 video placeholder"):
        proc([QUESTION], prompts=[MANIFEST["prompt"]])
    with pytest.raises(ValueError, match="frame indices for"):
        Frames(frames(0, 2, 40, 60), fps=10, frames_indices=[0])
    with pytest.raises(ValueError, match="only bicubic"):
        dataclasses.replace(proc.video_settings, resample=2)
    with pytest.raises(ValueError, match="no such file"):
        proc([QUESTION], videos=["/nonexistent/video"])
    for fam, key in (("llava-onevision", "pixel_values_videos"), ("internvl", "pixel_values")):  # built here too now
        assert key in runtimes[fam].processor([QUESTION], videos=[frames(0, 2, 40, 60)])  # (test_ov_internvl_video_...)


# -- the harness --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def msvd_data(tmp_path_factory):
    from eval.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("qwen_video_msvd"), ["msvd"])


@pytest.mark.parametrize("model, method, budget, tok_in", [
    # fixture videos: 32x24 GIFs and a 9-frame folder, 8 frames taken -> 4 temporal slices. Qwen2.5-VL (3136 pixels
    # per frame at least): 56x84 -> 6 merged tokens per slice = 24; Qwen3-VL / 3.5 (4096 pixels per clip): 28x28 -> 1
    ("tiny:qwen2.5-vl", "consensusdrop", "16", 24.0),
    ("tiny:qwen3-vl", "consensusdrop", "16", 4.0),
    ("tiny:qwen2.5-vl", "consensusdrop", "2", 8.0),  # 2 per slice
    ("tiny:qwen3.5", "consensusdrop", "16", 4.0),
])
def test_msvd_script_runs_on_the_qwen_families(msvd_data, tmp_path, model, method, budget, tok_in):
    env = {**os.environ, "MODEL": model, "NPROC": "1", "DATA_ROOT": str(msvd_data), "OUT": str(tmp_path),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "EXTRA_ARGS": "--max-new-tokens 3 --no-wandb"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(["bash", str(REPO / "scripts/eval/msvd.sh"), method, budget], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rd = tmp_path / "msvd" / f"tiny-{model.split(':')[1]}_{method}_b{budget}"
    res = json.loads((rd / "results.json").read_text())
    assert res["counts"] == {"questions": 5, "answered": 5}
    assert res["tokens"]["tok_in"] == tok_in
    m = res["model"]
    rule = "qwen2_vl" if model == "tiny:qwen2.5-vl" else "qwen3_vl"
    assert m["num_frames"] == 8 and m["video_preprocess"]["rule"] == rule and m["frame_sampling"].startswith("harness")
    assert "per temporal slice" in m["budget_unit"]
    assert len(list((rd / "overlays").glob("*.png"))) > 0  # the kept tokens over each video's first slice
