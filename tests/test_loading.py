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
