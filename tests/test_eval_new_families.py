"""`eval run` end to end on the adapter families, Qwen2.5-VL, LLaVA-OneVision and Qwen3-VL (tiny random models,
GQA fixture data, fp32 CPU), the equivalent of ``MODEL=Qwen/Qwen2.5-VL-7B-Instruct bash scripts/eval/gqa.sh
consensusdrop 64``: a pruning method at a budget that prunes; batch 3 (left padding, images of two sizes
in one batch: Qwen's concatenated patch rows with ``image_grid_thw``, OneVision's crops padded to the batch's
largest count) answers exactly as batch 1; results.json / the run folder name carry family, model, method
and budget; a second run recomputes nothing; the prompt the harness built is the family's ChatML prompt of
the question with its benchmark suffix, token for token the processor's for that sample alone.

Worked-out token counts (fixture images 50x30 for n1 / n3; n2 replaced by a 100x60 image here):
* tiny Qwen2.5-VL (patch 14, merge 2, checkpoint min/max pixels): 50x30 -> smart resize 84x56 ->
  grid (1, 4, 6) -> 6 merged tokens; 100x60 -> 112x56 -> grid (1, 4, 8) -> 8 tokens. ConsensusDrop
  budget 2 = 2 per image. FastV's budget is the layer-averaged count per sample: on the 4-layer LLM
  (K = 1) n_K = round_half_up((4 B - N) / 3): B = 4 -> (16 - 6) / 3 = 3.33 -> 3 and (16 - 8) / 3 -> 3.
* tiny OneVision (56 px SigLIP crops, 16 tokens each, anyres_max_9): 50x30 -> base + 1 crop, packed
  16 + 2 rows x (4 + newline) = 26; 100x60 -> base + 4 crops, 16 + 4 rows x (8 + newline) = 52.
  ConsensusDrop budget 4 per crop, newlines kept: 4 + 4 + 2 = 10 and 4 + 4*4 + 4 = 24; FastV B = 16:
  (64 - 26) / 3 = 12.67 -> 13 and (64 - 52) / 3 = 4.
* tiny InternVL (112-px tiles, 16 tokens each, at most 4 tiles + a thumbnail; its own data, n2 = 200x60 so
  that a batch mixes tile counts): 50x30 (aspect 1.67) -> the closest tile grid 2 x 1 -> 2 tiles + thumbnail =
  48 tokens; 200x60 (aspect 3.33) -> 3 x 1 -> 4 tiles = 64. ConsensusDrop budget 4 per tile: 12 and 16;
  FastV B = 20: (80 - 48) / 3 = 10.67 -> 11 and (80 - 64) / 3 = 5.33 -> 5.
"""

import json
import os
import subprocess
from pathlib import Path
import numpy as np
import pytest
from PIL import Image

from eval.benchmarks import get_benchmark
from eval.fixtures import S, write_fixtures
from eval.io import read_jsonl
from eval.runner import RunConfig, run, run_dir_of

pytestmark = pytest.mark.usefixtures("run_env")

QWEN, OV, QWEN3, INTERNVL, QWEN35 = ("tiny:qwen2.5-vl", "tiny:llava-onevision", "tiny:qwen3-vl", "tiny:internvl",
                                     "tiny:qwen3.5")
#: model -> family key, candidates per question id (201..205), per method: (budget, visual tokens after pruning)
CASES = {
    QWEN: ("qwen2_5_vl", {"201": 6, "202": 6, "203": 8, "204": 6, "205": 6},
           {"consensusdrop": (2, {"201": 2, "202": 2, "203": 2, "204": 2, "205": 2}),
            "fastv": (4, {q: 3 for q in ("201", "202", "203", "204", "205")})}),
    # Qwen3-VL: the tiny tower has Qwen2.5-VL's patch / merge sizes, so the same counts (DeepStack rows follow)
    QWEN3: ("qwen3_vl", {"201": 6, "202": 6, "203": 8, "204": 6, "205": 6},
            {"consensusdrop": (2, {"201": 2, "202": 2, "203": 2, "204": 2, "205": 2}),
             "fastv": (4, {q: 3 for q in ("201", "202", "203", "204", "205")})}),
    OV: ("llava_onevision", {"201": 26, "202": 26, "203": 52, "204": 26, "205": 26},
         {"consensusdrop": (4, {"201": 10, "202": 10, "203": 24, "204": 10, "205": 10}),
          "fastv": (16, {"201": 13, "202": 13, "203": 4, "204": 13, "205": 13})}),
    # Qwen3.5: Qwen3-VL's tower geometry; FastV at its defaults reads a linear-attention layer and is refused there
    QWEN35: ("qwen3_5", {"201": 6, "202": 6, "203": 8, "204": 6, "205": 6},
             {"consensusdrop": (2, {"201": 2, "202": 2, "203": 2, "204": 2, "205": 2})}),
    INTERNVL: ("internvl", {"201": 48, "202": 48, "203": 64, "204": 48, "205": 48},
               {"consensusdrop": (4, {"201": 12, "202": 12, "203": 16, "204": 12, "205": 12}),
                "fastv": (20, {"201": 11, "202": 11, "203": 5, "204": 11, "205": 11})}),
}
PARAMS = [(m, meth) for m in (QWEN, OV, QWEN3, INTERNVL, QWEN35) for meth in CASES[m][2]]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_fixtures(tmp_path_factory.mktemp("new_families_data"), ["gqa"])
    img = Image.fromarray((np.random.RandomState(7).rand(60, 100, 3) * 255).astype("uint8"))
    img.save(root / "gqa/data/images/n2.jpg")  # another size: batches mix grids / crop counts
    return root


@pytest.fixture(scope="module")
def data_tiles(tmp_path_factory):
    """InternVL's data: n2 of aspect 3.33 (4 tiles, the others 3), so that a batch mixes tile counts."""
    root = write_fixtures(tmp_path_factory.mktemp("tiles_data"), ["gqa"])
    img = Image.fromarray((np.random.RandomState(7).rand(60, 200, 3) * 255).astype("uint8"))
    img.save(root / "gqa/data/images/n2.jpg")
    return root


def cfg(data, out, model, method, **kw):
    kw.setdefault("max_new_tokens", 4)
    return RunConfig(benchmark="gqa", model=model, method=method, budget=CASES[model][2][method][0],
                     data_root=str(data), out=str(out), wandb=False, **kw)


def by_qid(rd):
    return {str(r["question_id"]): r for r in read_jsonl(rd / "merge.jsonl")}


def metas(rd):
    (shard,) = sorted((rd / "answers").glob("*_*.jsonl"))
    return {str(r["question_id"]): r["_eval"] for r in read_jsonl(shard)}


@pytest.mark.parametrize("model, method", PARAMS)
def test_run_batched_equals_batch_one_records_family_and_resumes(data, data_tiles, tmp_path, model, method):
    data = data_tiles if model == INTERNVL else data
    family, candidates, methods = CASES[model]
    budget, kept = methods[method]
    one, three = cfg(data, tmp_path / "b1", model, method), cfg(data, tmp_path / "b3", model, method, batch_size=3)
    assert run(one) == 0 and run(three) == 0
    r1, r3 = run_dir_of(one), run_dir_of(three)
    # the run folder says which model family it is: <model>_<method>_b<budget>
    short = model.split(":")[1]
    assert r1.name == f"tiny-{short}_{method}_b{budget}" and r1.parent.name == "gqa"
    a1, a3 = by_qid(r1), by_qid(r3)
    assert list(a1) == ["201", "202", "203", "204", "205"]
    assert {q: r["text"] for q, r in a1.items()} == {q: r["text"] for q, r in a3.items()}  # batch 3 == batch 1
    m1, m3 = metas(r1), metas(r3)
    assert [m["batch"] for m in m3.values()] == [3, 3, 3, 2, 2] and all(m["batch"] == 1 for m in m1.values())
    for m in (m1, m3):  # token accounting: worked-out candidates and kept counts, the same in both runs
        assert {q: x["visual_candidates"] for q, x in m.items()} == candidates
        after = {q: x["visual_per_layer"][-1] for q, x in m.items()}
        assert after == kept and all(after[q] < candidates[q] for q in kept)  # the budget prunes
        if method == "consensusdrop":  # vision stage: what enters the LLM is already pruned
            assert {q: x["visual_entering_llm"] for q, x in m.items()} == kept
        else:  # FastV: everything enters, pruned inside the LLM
            assert {q: x["visual_entering_llm"] for q, x in m.items()} == candidates
    for rd, bs in ((r1, 1), (r3, 3)):
        res = json.loads((rd / "results.json").read_text())
        mod = res["model"]
        qwen = family in ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
        assert (mod["id"], mod["family"]) == (model, family) and mod["template"] == {
            "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen2_vl", "llava_onevision": "llava_onevision_hf",
            "internvl": "internvl_hf", "qwen3_5": "qwen3_5"}[family]
        assert mod["budget_unit"].startswith("merged visual tokens per image" if qwen else
                                             "visual tokens per tile" if family == "internvl" else "visual tokens per crop")
        if qwen:
            assert (mod["preprocess"], mod["min_pixels"], mod["max_pixels"]) == ("qwen smart_resize", 3136, 12845056)
        elif family == "internvl":
            assert (mod["preprocess"], mod["max_tiles"], mod["tokens_per_tile"]) == (
                "dynamic tiling (crop_to_patches, thumbnail)", 4, 16)
        else:
            assert mod["preprocess"] == "anyres (anyres_max_9)" and mod["tokens_per_crop"] == 16
        assert "pad" not in json.dumps(mod.get("preprocess"))
        assert res["method"]["method"] == method and res["method"]["budget"] == budget
        assert res["config"]["model"] == model and res["config"]["batch_size"] == bs
        assert res["counts"] == {"questions": 5, "answered": 5} and "GQA" in res["metrics"]
        assert res["tokens"]["visual_candidates_mean"] == pytest.approx(sum(candidates.values()) / 5)
        assert res["budget"]["unpruned_samples"] == 0
        assert res["protocol"]["deviations"] == ["max_new_tokens=4 (protocol: 128)"] + (
            ["batch_size=3 (protocol: 1)"] if bs == 3 else [])
        assert res["metrics"] == get_benchmark("gqa", data).finalize(list(by_qid(rd).values()), rd / "rescore", "x")["metrics"]
    if method == "consensusdrop":  # vision-stage selections drawn on the image, in the family's own grid
        assert sorted(p.name for p in (r3 / "overlays").iterdir()) == ["201.png", "202.png", "203.png", "204.png"]
        ov = Image.open(r3 / "overlays" / "203.png")
        if family == "internvl":  # the thumbnail (the whole image, 112 px square): 4 x 4 tokens, 4 kept
            assert ov.size == (336, 336)
            cells = np.asarray(ov.convert("L"), dtype=float).reshape(4, 84, 4, 84).mean(axis=(1, 3))
        elif family != "llava_onevision":  # 100x60 -> patch grid 4 x 8 -> 2 x 4 merged tokens: a 2:1 picture, 336 px wide
            assert ov.size == (336, 168)
            cells = np.asarray(ov.convert("L"), dtype=float).reshape(2, 84, 4, 84).mean(axis=(1, 3))
        else:  # OneVision's base crop: 4 x 4 tokens
            assert ov.size == (336, 336)
            cells = np.asarray(ov.convert("L"), dtype=float).reshape(4, 84, 4, 84).mean(axis=(1, 3))
        # the kept cells are bright, the dropped ones dimmed to a quarter: 2 of 8 (Qwen), 4 of the base crop's 16
        assert int((cells > cells.max() * 0.5).sum()) == {"qwen2_5_vl": 2, "qwen3_vl": 2, "llava_onevision": 4,
                                                          "internvl": 4, "qwen3_5": 2}[family]
    # resume: the same command again recomputes nothing (the shard file is untouched, answer ids included)
    shard = next((r3 / "answers").glob("*_*.jsonl"))
    before = shard.read_bytes()
    assert run(cfg(data, tmp_path / "b3", model, method, batch_size=3)) == 0
    assert shard.read_bytes() == before
    assert by_qid(r3) == a3


@pytest.mark.parametrize("model", [QWEN, OV])
def test_harness_prompt_is_the_processors_chatml_prompt_with_the_suffix(data, tmp_path, model, monkeypatch):
    import llava.models as models

    seen = []
    real_load = models.load

    def spy_load(*a, **kw):  # the runtime the harness loads, its generate inputs recorded
        rt = real_load(*a, **kw)
        gen = rt.model.generate

        def generate(**inputs):
            seen.append({k: v.clone() for k, v in inputs.items() if hasattr(v, "clone")})
            return gen(**inputs)

        rt.model.generate = generate
        seen.append(rt)
        return rt

    monkeypatch.setattr(models, "load", spy_load)
    c = cfg(data, tmp_path, model, "consensusdrop", batch_size=3, limit=3)
    assert run(c) == 0
    rt, batch = seen[0], seen[1]
    q = get_benchmark("gqa", data).load()[2]  # 203: the 100x60 image, third row of the first batch
    assert q.text == "Which side is the dog on?" + S  # the benchmark's short-answer suffix is in the question
    expected = {
        QWEN: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<|vision_start|><|image_pad|><|vision_end|>Which side is the dog on?\n"
              "Answer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n",
        OV: "<|im_start|>user\n<image>\nWhich side is the dog on?\nAnswer the question using a single word or phrase."
            "<|im_end|>\n<|im_start|>assistant\n",
    }[model]
    assert rt.processor.prompt_text(q.text) == expected
    # the harness's row 2 (left padding removed) == that prompt's ids with the placeholder expanded
    ids = batch["input_ids"][2][batch["attention_mask"][2].bool()].tolist()
    ph = rt.tokenizer.convert_tokens_to_ids(rt.processor.placeholder)
    n_vis = {QWEN: 8, OV: 52}[model]
    want = []
    for t in rt.tokenizer(expected).input_ids:
        want.extend([rt.model.config.image_token_id] * n_vis if t == ph else [t])
    assert ids == want
    alone = rt.processor([q.text], [Image.open(q.image)])
    assert ids == alone["input_ids"][0].tolist()
    if model == QWEN:  # M-RoPE types padded like the ids; pixel rows: the three images' patches, grid by grid
        types = batch["mm_token_type_ids"][2][batch["attention_mask"][2].bool()]
        assert types.tolist() == alone["mm_token_type_ids"][0].tolist() and int(types.sum()) == 8
        assert int((batch["mm_token_type_ids"] * (1 - batch["attention_mask"])).abs().sum()) == 0
        assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 6], [1, 4, 8]]
        assert batch["pixel_values"].shape[0] == 24 + 24 + 32
        assert batch["pixel_values"][48:].equal(alone["pixel_values"])
    else:  # crops padded to the batch's largest count (2, 2, 5 -> 5), one image per sample
        assert tuple(batch["pixel_values"].shape[:2]) == (3, 5) and batch["batch_num_images"].tolist() == [1, 1, 1]
        assert batch["image_sizes"].tolist() == [[30, 50], [30, 50], [60, 100]]
        assert batch["pixel_values"][2].equal(alone["pixel_values"][0])
    rec = by_qid(run_dir_of(c))["203"]
    assert rec["prompt"] == q.text  # LLaVA's answer record: the question text, suffix included


def test_video_benchmark_and_llava_only_options_are_refused_for_the_new_families(tmp_path, capsys):
    vdata = write_fixtures(tmp_path / "data", ["msvd", "gqa"])
    # the Qwen families, OneVision and InternVL take videos (tests/test_qwen_video_processor.py,
    # tests/test_ov_internvl_video_processor.py); LLaVA-1.5's processor does not
    c = RunConfig(benchmark="msvd", model="tiny:llava", method="none", data_root=str(vdata), out=str(tmp_path / "o"),
                  wandb=False)
    assert run(c) == 2
    assert "videos" in capsys.readouterr().err and not run_dir_of(c).exists()
    for model, kw, msg in ((OV, {"pad_to_square": False}, "--no-pad"), (QWEN, {"next_layout": "spatial"}, "--next-layout"),
                           (OV, {"max_pixels": 50176}, "--max-pixels")):
        c = RunConfig(benchmark="gqa", model=model, method="none", data_root=str(vdata), out=str(tmp_path / "o"),
                      wandb=False, **kw)
        assert run(c) == 2
        assert msg in capsys.readouterr().err and not run_dir_of(c).exists()


def test_qwen_max_pixels_is_recorded_and_names_the_run(data, tmp_path):
    # max_pixels 4704 (min 3136 as the checkpoint): 50x30 -> 56x84 = 4704 (fits) -> 2 x 3 = 6 merged tokens as by
    # default; 100x60 -> 56x112 = 6272 > 4704 -> scaled by sqrt(6000 / 4704): floor(60 / 1.129 / 28) * 28 = 28,
    # floor(100 / 1.129 / 28) * 28 = 84 -> 1 x 3 = 3 tokens (8 by default)
    c = RunConfig(benchmark="gqa", model=QWEN, method="consensusdrop", budget=2, max_pixels=4704, data_root=str(data),
                  out=str(tmp_path), wandb=False, max_new_tokens=2, limit=3)
    assert run(c) == 0
    rd = run_dir_of(c)
    assert rd.name == "tiny-qwen2.5-vl_consensusdrop_b2_maxpx4704"  # --limit is no part of the name (a resume may extend it)
    res = json.loads((rd / "results.json").read_text())
    assert (res["model"]["min_pixels"], res["model"]["max_pixels"], res["config"]["max_pixels"]) == (3136, 4704, 4704)
    assert "image resolution max_pixels=4704 (protocol: the checkpoint's)" in res["protocol"]["deviations"]
    m = metas(rd)
    assert [m[q]["visual_candidates"] for q in ("201", "202", "203")] == [6, 6, 3]
    assert all(x["visual_entering_llm"] == 2 for x in m.values())
    # another max_pixels is another configuration: a resume into the same folder is refused
    assert run(RunConfig(benchmark="gqa", model=QWEN, method="consensusdrop", budget=2, max_pixels=6272, data_root=str(data),
                         out=str(tmp_path), wandb=False, max_new_tokens=2, limit=3, run_name=rd.name)) == 2


@pytest.mark.parametrize("model", [QWEN, QWEN3, INTERNVL, QWEN35])
def test_gqa_script_with_model_from_the_environment(data, data_tiles, tmp_path, model):
    """``MODEL=<qwen> bash scripts/eval/gqa.sh consensusdrop <budget>`` as a user runs it (one process)."""
    repo = Path(__file__).resolve().parents[1]
    family, short = CASES[model][0], model.split(":")[1]
    data = data_tiles if model == INTERNVL else data
    env = {**os.environ, "MODEL": model, "NPROC": "1", "DATA_ROOT": str(data), "OUT": str(tmp_path), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "EXTRA_ARGS": "--max-new-tokens 3 --no-wandb"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    budget = CASES[model][2]["consensusdrop"][0]
    p = subprocess.run(["bash", str(repo / "scripts/eval/gqa.sh"), "consensusdrop", str(budget)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rd = tmp_path / "gqa" / f"tiny-{short}_consensusdrop_b{budget}"
    res = json.loads((rd / "results.json").read_text())
    assert (res["model"]["family"], res["method"]["method"], res["method"]["budget"]) == (family, "consensusdrop", budget)
    kept = CASES[model][2]["consensusdrop"][1]
    assert res["counts"]["answered"] == 5 and res["launcher"] == "python"
    assert res["tokens"]["tok_in"] == pytest.approx(sum(kept.values()) / 5)
    assert f"== gqa | {model} ({family}) | consensusdrop, budget {budget} ==" in p.stdout
