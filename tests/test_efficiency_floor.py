"""The fast table's physical floor (bench.efficiency.floor, .hardware): the device's measured limits on a CPU, the
floor's arithmetic against worked-out values (a fake device of 1e12 B/s and 1e15 FLOP/s), the weights' bytes of the
real LLaVA-1.5-7B shape, the tower's counted FLOPs against the ViT formula, and the columns in a CPU run's report."""

import json

import pytest

from bench.efficiency.cost import decode_step_macs
from bench.efficiency.floor import row_floor, vision_flops, weight_bytes
from bench.efficiency.hardware import copy_bandwidth, describe, matmul_peak, measure, si

HW = {"bytes_per_s": 1e12, "flops_per_s": 1e15}
WEIGHTS = {"vision": 1e9, "llm": 12e9, "head": 0.5e9, "embedding": 0.5e9}


@pytest.fixture(scope="module")
def llava7b():
    from llava.models import load

    return load("shape:llava-1.5-7b", device="meta", dtype="float16").model


def test_the_device_limits_are_measured_on_a_cpu_with_small_sizes():
    c = copy_bandwidth("cpu", nbytes=1 << 20, repeats=2)
    assert c["bytes_per_s"] == pytest.approx(2 * (1 << 20) / c["best_s"])  # read + written
    m = matmul_peak("cpu", "float32", n=64, repeats=2)
    assert m["flops_per_s"] == pytest.approx(2 * 64 ** 3 / m["best_s"]) and m["dtype"] == "float32"
    hw = measure("cpu", "bfloat16", copy_bytes=1 << 20, gemm_n=64, repeats=2)
    assert hw["bytes_per_s"] > 0 and hw["flops_per_s"] > 0 and hw["dtype"] == "bfloat16" and hw["date"]
    line = describe(hw)
    assert "copy bandwidth" in line and "read + written" in line and "bfloat16 64^3 GEMM" in line and hw["date"] in line
    assert si(2.91e12, "B/s") == "2.91 TB/s" and si(7.12e14, "FLOP/s") == "712 TFLOP/s" and si(13.2e9, "B") == "13.2 GB"


def test_the_7b_weights_read_per_forward(llava7b):
    w = weight_bytes(llava7b)
    d, m, L, V = 4096, 11008, 32, 32064  # the HF checkpoint's padded vocabulary
    assert w["llm"] == 2 * (L * (4 * d * d + 3 * d * m + 2 * d) + d)  # layers (2 RMSNorms each) + the final norm
    assert w["head"] == w["embedding"] == 2 * V * d  # untied; the embedding is a gather: left out of the floor
    assert 0.6e9 < w["vision"] < 0.7e9  # CLIP-L/336 (303 M) + the projector (21 M), fp16
    assert sum(w.values()) == sum(p.numel() * 2 for p in llava7b.parameters())


def test_the_floor_of_a_row_against_worked_values(llava7b):
    cfg = llava7b.config
    f = row_floor([100] * 32, cfg, WEIGHTS, 4e11, HW, 2, decode_tokens=32)
    kv = 100 * 32 * 2 * 4096 * 2  # tokens x layers x (k, v) x width x fp16 bytes = 52,428,800 B
    macs = 32 * (4 * 100 * 4096 ** 2 + 2 * 100 ** 2 * 4096 + 3 * 100 * 4096 * 11008) + 4096 * 32064
    assert f["vision"]["s"] == pytest.approx(1e-3) and f["vision"]["bound"] == "bytes"  # 1 GB at 1e12 > 0.4 ms
    assert f["llm"]["bytes"] == 12.5e9 + kv and f["llm"]["flops"] == 2 * macs  # 1.30 TFLOP: 1.30 ms < 12.55 ms
    assert f["ttft_s"] == pytest.approx(1e-3 + 12.5524288e-3, rel=1e-12) and f["llm"]["bound"] == "bytes"
    # decode: the 31 timed steps of a 32-token answer attend to 100 + 16 tokens on average
    assert f["decode"]["bytes"] == 12.5e9 + 116 * 32 * 2 * 4096 * 2
    assert f["tpot_s"] == pytest.approx(12.560817408e-3, rel=1e-12) and f["decode"]["bound"] == "bytes"
    assert f["single_s"] == pytest.approx((13.5e9 + kv) / 1e12)  # the looser one-phase bound
    # a device 10x slower at math: both prefill phases compute-bound, the decode step still reads
    slow = row_floor([100] * 32, cfg, WEIGHTS, 4e11, {"bytes_per_s": 1e12, "flops_per_s": 1e14}, 2, 32)
    assert slow["vision"]["bound"] == slow["llm"]["bound"] == "flops"
    assert slow["ttft_s"] == pytest.approx(4e-3 + 2 * macs / 1e14, rel=1e-12)  # 4 ms + 13.007 ms
    assert slow["tpot_s"] == pytest.approx(f["tpot_s"])
    # batch 2: the weights once, the KV and the FLOPs twice
    b2 = row_floor([100] * 32, cfg, WEIGHTS, 4e11, HW, 2, 32, batch=2)
    assert b2["ttft_s"] == pytest.approx(1e-3 + (12.5e9 + 2 * kv) / 1e12, rel=1e-12)


def test_decode_step_macs_by_hand():
    # 2 layers, d 8, d_kv 4, m 16, contexts 10 and 20: per layer 2*64 + 2*32 + 3*128 + 2*ctx*8
    assert decode_step_macs([10, 20], 8, 16, 4) == (128 + 64 + 384 + 160) + (128 + 64 + 384 + 320)


def test_the_tower_s_counted_flops_are_the_vit_formula():
    """tiny LLaVA's CLIP at 56 px: 16 patches + [CLS] = 17 tokens, width 32, MLP 64, 3 layers, patch 14; the projector
    (32 -> 64 -> 64) on the 16 patch tokens. Per layer 4nh^2 + 2n^2h + 2nhm MACs (x2 FLOPs)."""
    from bench.efficiency.inputs import build_batch, make_inputs
    from llava.models import load

    rt = load("tiny:llava")
    batch = build_batch(rt, make_inputs(rt, 1, 12, 0, (56, 56)), rt.model.device)
    got = vision_flops(rt.model, batch)
    n, h, m = 17, 32, 64
    layer = 4 * n * h * h + 2 * n * n * h + 2 * n * h * m
    expected = 2 * (16 * 3 * 14 * 14 * h + 3 * layer + 16 * (h * 64 + 64 * 64))
    assert got["vision"] == expected and got["total"] == got["vision"] + got["llm"] + got["head"]


def test_a_cpu_run_s_fast_table_has_the_floor_columns(tmp_path, monkeypatch, capsys):
    """A fake device (1e12 B/s, 1e15 FLOP/s) in a real tiny run: every fast-table row's floor is row_floor of its
    eager row's lengths, the ratios are the medians over it, the columns and the header line are in the report.
    --fast-first: each cell's fast row first; the first fast-path token is placed from the process start."""
    import bench.efficiency as be

    fake = {**HW, "device": "cpu", "device_name": "fake", "dtype": "float32", "date": "2026-11-28", "utc": "",
            "copy": {"bytes": 1 << 30, "repeats": 5}, "matmul": {"n": 8192, "dtype": "float32", "repeats": 5},
            "seconds": 0.0}
    monkeypatch.setattr(be, "measure_hardware", lambda device, dtype: fake)
    monkeypatch.delenv("VTPRUNE_FAST_PRECOMPILE", raising=False)
    assert be.main(["--model", "tiny:llava", "--methods", "none", "random", "--budgets", "4", "--n", "2", "--warmup", "1",
                    "--decode-tokens", "3", "--decode-samples", "1", "--image-hw", "56", "56", "--sweep", "8", "16",
                    "--out", str(tmp_path), "--fast", "--fast-backend", "none", "--fast-first"]) == 0
    rep = json.loads((tmp_path / "efficiency.json").read_text())
    cells = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    assert [(c["method"], c["path"]) for c in cells] == [("none", "fast"), ("none", "eager"), ("random", "fast"),
                                                       ("random", "eager")]
    assert rep["hardware"] == fake and rep["fast"]["floor"]["hardware"] == fake
    assert rep["fast"]["precompile_requested"] is True  # on by default, with no variable set
    model = rep["fast"]["floor"]["model"]
    from llava.models import load

    cfg = load("tiny:llava").model.config
    for c, e in zip(rep["fast"]["comparison"], rep["results"]):
        fl = [row_floor(r["layer_lengths"], cfg, model["weights"], model["vision_flops"], fake, 4, 3)
              for r in e["records"]]
        assert c["floor_ttft_s"] == pytest.approx(sum(x["ttft_s"] for x in fl) / 2)
        assert c["floor_tpot_s"] == pytest.approx(sum(x["tpot_s"] for x in fl) / 2)
        assert c["fast_ttft_over_floor"] == pytest.approx(c["fast_ttft_median"] / c["floor_ttft_s"])
        assert c["eager_tpot_over_floor"] == pytest.approx(c["eager_tpot_median"] / c["floor_tpot_s"])
    assert model["vision_flops"] > 0 and model["weights"]["llm"] > 0
    md = (tmp_path / "efficiency.md").read_text()
    assert "device limits measured on fake (cpu) on 2026-11-28: copy bandwidth 1 TB/s" in md.splitlines()[2]
    assert "| floor TTFT (ms) | TTFT / floor | floor TPOT (ms) | TPOT / floor |" in md
    section = md[md.index("## Fast path vs eager engine"):]
    assert "Floor: device limits measured on fake" in section and "matmul peak 1,000 TFLOP/s" in section
    table = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert len(table) == 6 and len({ln.count("|") for ln in table}) == 1  # header, separator, 2 x (eager, fast)
    c = rep["fast"]["comparison"][1]
    assert table[5].endswith(f"| {c['floor_ttft_s'] * 1e3:.2f} | {c['fast_ttft_over_floor']:.2f}x | "
                             f"{c['floor_tpot_s'] * 1e3:.2f} | {c['fast_tpot_over_floor']:.2f}x |")
    first = rep["fast"]["results"][0]
    assert 0 < first["first_token_process_s"] and first["first_prefill_s"] > 0
    assert rep["process"]["loaded_s"] < first["first_token_process_s"]
    assert "Process: model loaded" in section and "first fast-path token" in section
    assert "Precompiled functions" not in section  # on by default, but backend none has none: nothing to say


def test_the_precompile_lines_say_whether_the_functions_loaded():
    from bench.efficiency.report import _process_lines

    row = lambda m, pre: {"method": m, "budget": None, "options": {}, "fast": {"precompile": pre}}  # noqa: E731
    off = _process_lines({"backend": "inductor", "precompile_requested": True, "results": [row("none", None)]})
    assert any("**not used**" in line for line in off)
    used = _process_lines({"backend": "inductor", "precompile_requested": True,
                           "results": [row("none", {"loaded": 3, "compiled": 0, "refused": []})]})
    assert any("none: loaded 3, compiled and saved 0" in line for line in used)
    assert _process_lines({"backend": "inductor", "precompile_requested": False,
                           "results": [row("none", None)]}) == []
    # a backend without precompiled functions compiles the regular way: nothing to report unless some row loaded
    assert _process_lines({"backend": "cudagraphs", "precompile_requested": True, "results": [row("none", None)]}) == []
