"""Efficiency benchmark on the new families (Qwen2.5-VL, LLaVA-OneVision): the synthetic inputs are what
the runtime's processor makes of a PIL image (worked-out token counts), the visual tokens / KV entries the
benchmark reports equal the engine's own stats on a re-run, and the FLOPs model uses the LLM's GQA shape."""

import pytest
import torch

from bench.efficiency import (BenchConfig, build_batch, cache_bytes, default_image_hw, describe_inputs, hybrid_spec,
                             layer_macs, llm_dims, make_inputs, prefill_macs, run)
from llava.models import load


def _check_against_engine(report, model, image_hw, expected_visual):
    """Re-run every method x budget of ``report`` on the same inputs and compare with the engine's stats."""
    rt = load(model)
    cfg = report["config"]
    items = make_inputs(rt, cfg["n"], cfg["text_words"], cfg["seed"], tuple(image_hw))
    d, m, L, d_kv = llm_dims(rt.model.config)
    spec = hybrid_spec(rt.model.config)
    tc = rt.model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    for res in report["results"]:
        eng = rt.prune(res["method"], res["budget"], **res["options"])
        for it, rec in zip(items, res["records"]):
            batch = build_batch(rt, [it], torch.device("cpu"))
            n_img = int((batch["input_ids"] == rt.model.config.image_token_id).sum())
            assert n_img == expected_visual
            with torch.inference_mode():
                out = rt.model(**batch, use_cache=True, logits_to_keep=1)
            s = eng.stats.samples[0]
            kv, lens = cache_bytes(out.past_key_values)
            text = int(batch["attention_mask"].sum()) - expected_visual
            assert s.visual_candidates == rec["visual_candidates"] == expected_visual, res["method"]
            assert s.visual_entering_llm == rec["visual_entering_llm"], res["method"]
            assert s.visual_layer_avg == pytest.approx(rec["visual_layer_avg"])
            # KV entries per attention layer = text tokens + the visual tokens the engine says that layer holds
            # (a hybrid model's linear layers: no KV; the benchmark takes the length they ran on from the stats)
            want = [text + v for v in s.visual_per_layer]
            attn = [i for i, n in enumerate(lens) if n is not None]
            assert len(attn) == (2 if spec is not None else L)
            assert [lens[i] for i in attn] == [want[i] for i in attn] and rec["layer_lengths"] == want, res["method"]
            # bytes: 2 (k, v) x KV heads x head_dim x 4 (fp32) per entry, every attention layer
            assert kv == rec["kv_bytes"] == sum(lens[i] for i in attn) * 2 * tc.num_key_value_heads * head_dim * 4
            assert rec["macs_B"] == pytest.approx(prefill_macs(want, d, m, "B", d_kv, spec))
        rt.unprune()
    return rt


def test_qwen25vl_default_input_is_576_merged_tokens():
    # 672x672: a multiple of 28 inside [min_pixels, max_pixels], so smart_resize keeps it; 672 / 14 = 48
    # patches a side -> pixel rows t*h*w = 1*48*48 = 2304 of 3*2*14*14 = 1176; the 2x2 merge -> 24*24 = 576
    for name in ("tiny:qwen2.5-vl", "shape:qwen2.5-vl-cpu-small", "shape:qwen2.5-vl-7b"):
        rt = load(name, device="meta" if name.startswith("shape:") else None)
        assert default_image_hw(rt) == (672, 672)
        info = describe_inputs(rt, (672, 672))
        assert info["visual_tokens"] == 576 and info["image_grid_thw"] == [[1, 48, 48]], name
        assert info["batch_keys"]["pixel_values"] == [2304, 1176]
        assert {"mm_token_type_ids", "image_grid_thw"} <= set(info["batch_keys"])


def test_qwen3vl_default_input_is_576_merged_tokens():
    # 24 merged tokens a side: 768x768 on patch 16 (real: 48x48 patches of 3*2*16*16 = 1536), 672x672 on the
    # tiny model's patch 14 (48x48 patches of 1176); the 2x2 merge -> 576
    for name, side, row in (("tiny:qwen3-vl", 672, 1176), ("shape:qwen3-vl-cpu-small", 768, 1536),
                            ("shape:qwen3-vl-8b", 768, 1536)):
        rt = load(name, device="meta" if name.startswith("shape:") else None)
        assert default_image_hw(rt) == (side, side)
        info = describe_inputs(rt, (side, side))
        assert info["visual_tokens"] == 576 and info["image_grid_thw"] == [[1, 48, 48]], name
        assert info["batch_keys"]["pixel_values"] == [2304, row]


def test_qwen3_5_default_input_is_576_merged_tokens():
    for name, side in (("tiny:qwen3.5", 672), ("shape:qwen3.5-cpu-small", 768), ("shape:qwen3.5-9b", 768)):
        rt = load(name, device="meta" if name.startswith("shape:") else None)
        assert default_image_hw(rt) == (side, side)
        info = describe_inputs(rt, (side, side))
        assert info["visual_tokens"] == 576 and info["image_grid_thw"] == [[1, 48, 48]], name


def test_benchmark_on_tiny_qwen3_5_matches_engine_stats(tmp_path):
    # hybrid LLM: the KV bytes count only its full-attention layers (1 and 3); 168x112 -> 24 merged tokens
    hw = (168, 112)
    cfg = BenchConfig(model="tiny:qwen3.5", methods=["none", "visionzip", "fastv:layer=2,scale_layers=false"],
                      budgets=[8], n=2, warmup=0, decode_tokens=1, image_hw=hw, out=str(tmp_path), sweep=[8, 16])
    report = run(cfg)
    assert report["inputs"]["visual_tokens"] == 24
    assert report["flops_model"]["hybrid"]["layers"] == ["linear", "full", "linear", "full"]
    md = (tmp_path / "efficiency.md").read_text()
    assert "| visionzip | 8 | 8 / 8.0 |" in md and "| none | - | 24 / 24.0 |" in md and "2 Gated DeltaNet layers" in md
    for r in report["results"]:
        assert r["kv_match"], r["method"]
    _check_against_engine(report, "tiny:qwen3.5", hw, 24)


def test_hybrid_flops_by_hand():
    """Qwen3.5-9B at n = 1000: a gated attention layer and a Gated DeltaNet layer counted by hand (B convention)."""
    spec = hybrid_spec(load("shape:qwen3.5-9b", device="meta").model.config)
    assert spec.kinds[:4] == ("linear", "linear", "linear", "full") and (spec.key_dim, spec.value_dim) == (2048, 4096)
    n, d, m, dkv = 1000, 4096, 12288, 1024
    full = 2 * n * d * d + 2 * n * d * dkv + 2 * n * n * d + 3 * n * d * m + n * d * d  # + the output gate
    lin = n * (d * 8192 + d * 4096 + 2 * d * 32 + 4096 * d + 8192 * 4 + 3 * 32 * 128 * 128 + 3 * d * m)
    assert prefill_macs([n] * 4, d, m, "B", dkv, spec) == 3 * lin + full
    assert prefill_macs([n, n], d, m, "B", dkv, spec) == 2 * lin  # no n^2 term in a linear layer


def test_internvl_default_input_is_five_tiles():
    # two tiles a side: the 2x2 tile grid + the thumbnail = 5 tiles (896 px real: 5 x 256 = 1280; tiny 224 px on
    # 112-px tiles: 5 x 16 = 80); pixel_values: one row per tile
    for name, side, per_tile in (("tiny:internvl", 224, 16), ("shape:internvl-cpu-small", 896, 256),
                                 ("shape:internvl3.5-8b", 896, 256)):
        rt = load(name, device="meta" if name.startswith("shape:") else None)
        assert default_image_hw(rt) == (side, side)
        info = describe_inputs(rt, (side, side))
        tile = side // 2
        assert info["visual_tokens"] == 5 * per_tile and info["batch_keys"]["pixel_values"] == [5, 3, tile, tile], name


def test_onevision_default_input_counts():
    # real geometry (7B and cpu-small): SigLIP 384 / 14 = 27 -> 729 per crop; a 384x384 image picks the 384x384
    # pinpoint (1x1 grid): base 729 + grid 27x27 = 729 (no unpadding; 729 <= 9 x 729: no anyres_max_9
    # interpolation) + 27 row newlines = 1485; pixel_values: base + 1 grid crop
    for name in ("shape:llava-onevision-cpu-small", "shape:llava-onevision-7b"):
        rt = load(name, device="meta")
        assert default_image_hw(rt) == (384, 384)
        info = describe_inputs(rt, (384, 384))
        assert info["visual_tokens"] == 1485, name
        assert info["batch_keys"]["pixel_values"] == [1, 2, 3, 384, 384]
    # tiny (SigLIP 56 / 14 = 4 -> 16 per crop, pinpoints 56a x 56b, a, b <= 4): 384x384 -> 224x224 (4x4 crops)
    # -> a 16x16 grid, no unpadding; sqrt(16*16 / (16*9)) = 4/3 > 1.1 -> interpolated to int(16 / (4/3)) = 12:
    # 12*12 + 12 newlines = 156, + base 16 = 172; pixel_values: base + 16 crops
    info = describe_inputs(load("tiny:llava-onevision"), (384, 384))
    assert info["visual_tokens"] == 172 and info["batch_keys"]["pixel_values"] == [1, 17, 3, 56, 56]


def test_flops_model_uses_gqa_shape():
    rt = load("shape:qwen2.5-vl-7b", device="meta")
    d, m, L, d_kv = llm_dims(rt.model.config)
    assert (d, m, L, d_kv) == (3584, 18944, 28, 512)  # 28 heads of 128, 4 KV heads
    n = 600
    by_hand = 2 * n * d * d + 2 * n * d * 512 + 2 * n * n * d + 3 * n * d * m  # q, o + k, v + QK^T, AV + SwiGLU
    assert layer_macs(n, d, m, "B", d_kv) == by_hand
    assert layer_macs(n, d, m, "B", d_kv) < layer_macs(n, d, m, "B")  # MHA formula over-counts k/v
    assert llm_dims(load("shape:llava-onevision-7b", device="meta").model.config) == (3584, 18944, 28, 512)
    assert llm_dims(load("shape:llava-1.5-7b", device="meta").model.config) == (4096, 11008, 32, 4096)
    assert llm_dims(load("shape:qwen3-vl-8b", device="meta").model.config) == (4096, 12288, 36, 1024)  # 8 KV heads
    assert llm_dims(load("shape:internvl3.5-8b", device="meta").model.config) == (4096, 12288, 36, 1024)  # Qwen3-8B


def test_benchmark_on_tiny_qwen25vl_matches_engine_stats(tmp_path):
    # 168x112 (h x w): multiples of 28 -> 12x8 patches -> 6x4 = 24 merged tokens (fast)
    hw = (168, 112)
    cfg = BenchConfig(model="tiny:qwen2.5-vl", methods=["none", "fastv", "visionzip", "divprune"], budgets=[8], n=2,
                      warmup=0, decode_tokens=1, image_hw=hw, out=str(tmp_path), sweep=[8, 16, 32, 48])
    report = run(cfg)
    assert report["inputs"]["visual_tokens"] == 24 and report["inputs"]["image_grid_thw"] == [[1, 12, 8]]
    assert report["flops_model"]["d_kv"] == 32 and report["flops_model"]["d"] == 64
    md = (tmp_path / "efficiency.md").read_text()
    assert "24 visual tokens" in md and "d_kv = 32" in md
    assert "| visionzip | 8 | 8 / 8.0 |" in md and "| none | - | 24 / 24.0 |" in md
    for r in report["results"]:
        assert r["kv_match"], r["method"]
    _check_against_engine(report, "tiny:qwen2.5-vl", hw, 24)


def test_benchmark_on_tiny_qwen3vl_matches_engine_stats(tmp_path):
    # the tiny tower's patch 14 as Qwen2.5-VL's: 168x112 -> 12x8 patches -> 24 merged tokens (with DeepStack rows)
    hw = (168, 112)
    cfg = BenchConfig(model="tiny:qwen3-vl", methods=["none", "fastv", "visionzip"], budgets=[8], n=2,
                      warmup=0, decode_tokens=1, image_hw=hw, out=str(tmp_path), sweep=[8, 16])
    report = run(cfg)
    assert report["inputs"]["visual_tokens"] == 24 and report["inputs"]["image_grid_thw"] == [[1, 12, 8]]
    assert report["flops_model"]["d_kv"] == 32 and report["flops_model"]["d"] == 64
    md = (tmp_path / "efficiency.md").read_text()
    assert "| visionzip | 8 | 8 / 8.0 |" in md and "| none | - | 24 / 24.0 |" in md
    for r in report["results"]:
        assert r["kv_match"], r["method"]
    _check_against_engine(report, "tiny:qwen3-vl", hw, 24)


def test_benchmark_on_tiny_internvl_matches_engine_stats(tmp_path):
    # the default 224x224 on 112-px tiles: 2x2 tiles + thumbnail = 80 tokens; visionzip 8 per tile -> 40
    cfg = BenchConfig(model="tiny:internvl", methods=["none", "fastv", "visionzip"], budgets=[8], n=2,
                      warmup=0, decode_tokens=1, out=str(tmp_path), sweep=[8, 16])
    report = run(cfg)
    assert report["config"]["image_hw"] == [224, 224] and report["inputs"]["visual_tokens"] == 80
    assert report["flops_model"]["d_kv"] == 32 and report["flops_model"]["d"] == 64
    md = (tmp_path / "efficiency.md").read_text()
    assert "| visionzip | 8 | 40 / 40.0 |" in md and "| none | - | 80 / 80.0 |" in md
    for r in report["results"]:
        assert r["kv_match"], r["method"]
    _check_against_engine(report, "tiny:internvl", (224, 224), 80)


def test_benchmark_on_tiny_onevision_matches_engine_stats(tmp_path):
    cfg = BenchConfig(model="tiny:llava-onevision", methods=["none", "fastv", "visionzip", "pdrop"], budgets=[192],
                      n=2, warmup=0, decode_tokens=1, out=str(tmp_path), sweep=[8, 16, 32, 48])
    report = run(cfg)
    assert report["config"]["image_hw"] == [384, 384] and report["inputs"]["visual_tokens"] == 172
    md = (tmp_path / "efficiency.md").read_text()
    assert "| none | - | 172 / 172.0 |" in md
    for r in report["results"]:
        assert r["kv_match"], r["method"]
    pd = next(r for r in report["results"] if r["method"] == "pdrop")
    assert pd["visual_layer_avg"] < 172  # something is pruned (budget relative to 576: ~192/576 of 172)
    _check_against_engine(report, "tiny:llava-onevision", (384, 384), 172)


def test_decode_step_time_excludes_the_prefill():
    """TPOT is timed inside one generate call, from the first token's logits to the last one's: a prefill made
    0.3 s slower leaves it unchanged (the old difference of two generate timings carried the prefill's noise)."""
    import functools
    import time as _time

    from bench.efficiency import decode_step_time

    rt = load("tiny:qwen3-vl", seed=1)
    from conftest import rand_image

    batch = rt.processor(["what is this?"], [rand_image(0, 60, 90)])
    rt.prune("none")
    slow = {"on": False}
    inner = rt.model.forward

    @functools.wraps(inner)  # generate checks its kwargs against forward's signature
    def forward(*a, **k):  # the visual prefill (pixel_values present) sleeps 0.3 s when asked
        if slow["on"] and k.get("pixel_values") is not None:
            _time.sleep(0.3)
        return inner(*a, **k)

    rt.model.forward = forward
    try:
        base = decode_step_time(rt, batch, torch.device("cpu"), 4)
        slow["on"] = True
        slowed = decode_step_time(rt, batch, torch.device("cpu"), 4)
    finally:
        del rt.model.forward
    # the 0.3 s prefill delay is not in it (spread over 4 tokens it would add 75 ms, over 3 steps 100 ms)
    assert 0 < base < 0.05 and 0 < slowed < 0.05 and abs(slowed - base) < 0.03
    with pytest.raises(ValueError, match="2 new tokens"):
        decode_step_time(rt, batch, torch.device("cpu"), 1)


def test_pixelprune_on_pages_one_row_without_a_budget(tmp_path):
    """A budgetless method (PixelPrune: its count is the image's) gets one row, whatever --budgets says; on document
    pages (``images="pages"``: flat margins, text bars) it drops tokens before the tower, and the row's tokens are the
    engine's own count for the same input."""
    hw = (224, 224)  # 8 x 8 merged tokens of 28 px
    cfg = BenchConfig(model="tiny:qwen2-vl", methods=["none", "pixelprune"], budgets=[8, 4], n=2, warmup=0,
                      decode_tokens=1, image_hw=hw, images="pages", out=str(tmp_path), sweep=[8, 16])
    report = run(cfg)
    rows = [r for r in report["results"] if r["method"] == "pixelprune"]
    assert len(rows) == 1 and rows[0]["budget"] is None
    rt = load("tiny:qwen2-vl")
    eng = rt.prune("pixelprune")
    kept = []
    for item in make_inputs(rt, 2, cfg.text_words, cfg.seed, hw, "pages"):  # each page alone
        with torch.no_grad():
            rt.model(**build_batch(rt, [item], "cpu"))
        kept.append(eng.stats.plan.segments[0].visual[0])
    mean = sum(kept) / 2
    assert max(kept) < 64 and rows[0]["visual_entering_llm"] == mean
    assert f"| pixelprune | - | {round(mean)} / {mean:.1f} |" in (tmp_path / "efficiency.md").read_text()
    assert "synthetic document page" in (tmp_path / "efficiency.md").read_text()
