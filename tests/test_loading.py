"""Real loading code on locally saved checkpoints, and the shipped real-architecture shape configs."""

import pytest
import torch
from conftest import FAMILIES, make_batch

from llava.models import SHAPES, load


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_local_directory_roundtrip_is_bit_identical(rt, tmp_path):
    rt.model.save_pretrained(tmp_path)
    rt.tokenizer.save_pretrained(tmp_path)
    rt.processor.image_processor.save_pretrained(tmp_path)
    loaded = load(str(tmp_path), dtype="float32")
    assert loaded.family == rt.family and type(loaded.model) is type(rt.model)
    inputs = make_batch(rt)
    again = make_batch(loaded)
    for k in inputs:
        assert torch.equal(inputs[k], again[k]), k
    with torch.no_grad():
        assert torch.equal(rt.model(**inputs).logits, loaded.model(**inputs).logits)
    loaded.prune("random", 3)
    with torch.no_grad():
        loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    # sample 0: LLaVA 1 image -> 3; Video-LLaVA 8 frames -> 24; LLaVA-NeXT 40x70 image -> pinpoint 56x112
    # (ties 112x112 on effective pixels, less waste): 3 crops x 3 + the 4 newline tokens of the unpadded
    # 4 x 7 grid (kept by `random`) = 13
    expected = {"llava": 3, "video_llava": 24, "llava_next": 13}[rt.family]
    assert loaded.engine.stats.samples[0].visual_entering_llm == expected


# public parameter counts of the HF checkpoints (model cards / safetensors index), +-0.5%
EXPECTED_PARAMS = {"llava-1.5-7b": 7.06e9, "llava-1.5-13b": 13.35e9, "llava-next-7b": 7.06e9, "video-llava-7b": 7.37e9,
                   # by hand: Llama 2*32064*1024 + 8*(4*1024^2 + 3*1024*2816 + 2*1024) + 1024 = 168,444,928;
                   # CLIP 9,776,384 (patch/pos/class embeddings, 12 layers of 789,760, 2 LNs); projector 1,312,768
                   "llava-1.5-cpu-small": 179_534_080 + 256}


# the LLaVA-1.5 / NeXT / Video-LLaVA configs; Qwen2.5-VL and OneVision: tests/test_loading_new_families.py
@pytest.mark.parametrize("name", sorted(n for n in SHAPES if n in EXPECTED_PARAMS))
def test_shape_configs_build_the_real_architectures(name):
    rt = load(f"shape:{name}", device="meta")
    n = sum(p.numel() for p in rt.model.parameters())
    assert n == pytest.approx(EXPECTED_PARAMS[name], rel=5e-3), n
    vc = rt.model.config.vision_config
    assert (vc.image_size // vc.patch_size) ** 2 == (576 if "video" not in name else 256)
    if name == "llava-next-7b":  # 672x672: base + 2x2 grid; unpad removes nothing, one newline per row
        assert rt.processor.image_tokens((672, 672)) == 576 + 48 * 48 + 48
        rt.processor.next_layout = "spatial"
        assert rt.processor.image_tokens((672, 672)) == 5 * 576 == 2880


@pytest.mark.parametrize("fam", ["llava", "llava-next", "video-llava"])
def test_vision_dtype_keeps_the_tower_in_fp32_under_a_half_precision_llm(fam):
    """load(vision_dtype="float32"): LLaVA's own loader keeps CLIP in fp32 (device_map='auto'); the [CLS]
    scores then equal those of an all-fp32 model exactly, and generation runs through the engine."""
    from conftest import rand_image

    from llava.method import Method
    from llava.selection import Selection

    class Spy(Method):
        name = "dtype_spy"
        vision_stage = True
        needs_vision_attention = True

        def __init__(self):
            super().__init__()
            self.seen = []

        def select_vision(self, sig):
            self.seen.append(sig.cls_attn)
            return Selection(keep=torch.arange(min(4, sig.num_tokens), device=sig.unit.device))

    half = load(f"tiny:{fam}", seed=1, dtype="bfloat16", vision_dtype="float32")
    full = load(f"tiny:{fam}", seed=1)
    full.model.load_state_dict(half.model.state_dict())  # the same (checkpoint-precision) weights, all fp32
    tower = half.model.model.video_tower if fam == "video-llava" else half.model.model.vision_tower
    assert tower.dtype == torch.float32 and half.model.model.language_model.dtype == torch.bfloat16
    assert half.info["vision_dtype"] == "float32"
    qs = ["what is this?"]
    if fam == "video-llava":
        inputs = half.processor(qs, videos=[[rand_image(j, 50, 50) for j in range(8)]])
    else:
        inputs = half.processor(qs, [rand_image(0)])
    # the pixels are rounded to the LLM's dtype (LLaVA's eval scripts: images.to(float16)); the fp32 processor's
    # pixels (the full model's) rounded equal them, and the fp32 tower receives them cast up, not the fp32 ones
    key = "pixel_values_videos" if fam == "video-llava" else "pixel_values"
    assert half.info["pixel_dtype"] == "bfloat16" and inputs[key].dtype == torch.bfloat16
    if fam == "video-llava":
        raw = full.processor(qs, videos=[[rand_image(j, 50, 50) for j in range(8)]])[key]
    else:
        raw = full.processor(qs, [rand_image(0)])[key]
    assert raw.dtype == torch.float32 and full.processor.pixel_dtype is None
    assert torch.equal(raw.to(torch.bfloat16), inputs[key]) and not torch.equal(raw, inputs[key].float())
    seen_px = []
    hook = tower.embeddings.register_forward_pre_hook(lambda m, a: seen_px.append(a[0]))
    try:
        with torch.no_grad():
            half.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    assert seen_px[0].dtype == torch.float32
    px = seen_px[0]  # (crops / frames, C, H, W): the single sample's
    assert torch.equal(px, inputs[key].float().reshape(-1, *px.shape[1:])[:px.shape[0]])
    got = {}
    for name, rt in (("half", half), ("full", full)):
        spy = Spy()
        rt.prune(spy)
        with torch.no_grad():
            out = rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        got[name] = spy.seen[0]
        rt.unprune()
    assert torch.equal(got["half"], got["full"])  # the same fp32 tower, the same scores
    # never pruned (and after unprune): load attached the unpruned engine, the stock forward could not run it
    assert half.engine is not None and half.engine_by_load and half.engine.method.name == "none"
    with torch.no_grad():
        out = half.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2 and half.engine.prefills == 1
    assert full.engine is None  # an all-fp32 model runs the stock forward unpruned
    with pytest.raises(ValueError, match="CLIP-tower families"):
        load("tiny:qwen2.5-vl", dtype="bfloat16", vision_dtype="float32")
