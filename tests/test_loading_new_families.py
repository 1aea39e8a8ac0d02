"""Qwen2.5-VL and LLaVA-OneVision: tiny models, ChatML prompts and token layouts, visual-token counts, stock
forward / generate on left-padded batches, PromptSpec, real-size shape configs (meta device) and local round trip."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava.models import load
from llava.tiny_tokenizer import build_tiny_tokenizer

Q = "what is this?"


def img(seed, h, w):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def qwen():
    return load("tiny:qwen2.5-vl", seed=1, max_pixels=28 * 28 * 16)  # <= 16 merged tokens per image


@pytest.fixture(scope="module")
def ov():
    return load("tiny:llava-onevision", seed=1)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_chatml_tokens_are_appended_without_moving_existing_ids():
    old, new = build_tiny_tokenizer(), build_tiny_tokenizer(chatml=True)
    assert len(old) == 135  # the default tokenizer (testbed, LLaVA tiny models) is unchanged
    ov_, nv = old.get_vocab(), new.get_vocab()
    assert all(nv[t] == i for t, i in ov_.items())
    added = ["system", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
             "<|video_pad|>", "<|endoftext|>"]
    assert [nv[t] for t in added] == list(range(135, 143))
    assert new.bos_token_id is None and new.eos_token_id == nv["<|im_end|>"]
    assert new("<|im_start|>user\n<|image_pad|>what").input_ids == [136, 23, 6, 140, 40]  # no BOS, specials kept


def test_qwen_token_counts_follow_smart_resize():
    rt = load("tiny:qwen2.5-vl")  # checkpoint defaults: 3136 .. 12845056 pixels
    assert rt.processor.image_processor.size["longest_edge"] == 12845056
    # 300x500 -> rounded to multiples of 28: 308x504 (11x18 merged cells, within the pixel range)
    # -> grid 22x36 patches -> 22*36/4 = 198 tokens
    assert rt.processor.image_tokens((300, 500)) == 198
    b = rt.processor([Q], [img(0, 300, 500)])
    assert b["image_grid_thw"].tolist() == [[1, 22, 36]]
    assert b["pixel_values"].shape == (22 * 36, 3 * 2 * 14 * 14)
    assert int((b["input_ids"] == rt.model.config.image_token_id).sum()) == 198
    small = load("tiny:qwen2.5-vl", min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    # 200x210: 196x224 = 43904 > 12544 pixels -> beta = sqrt(42000/12544) = 1.83 -> floor(200/1.83/28)*28 = 84,
    # floor(210/1.83/28)*28 = 112 -> 6x8 patches -> 12 tokens; 50x100 -> 56x112 -> 4x8 patches -> 8 tokens;
    # 20x20 -> 28x28 (min_pixels 784) -> 2x2 patches -> 1 token
    assert [small.processor.image_tokens(s) for s in ((200, 210), (50, 100), (20, 20))] == [12, 8, 1]


def test_qwen_prompt_layout(qwen):
    tok, cfg = qwen.tokenizer, qwen.model.config
    text = qwen.processor.prompt_text(Q)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>what is this?<|im_end|>\n<|im_start|>assistant\n")
    b = qwen.processor([Q, "what color is the circle on the left?"], [img(0, 200, 210), img(1, 50, 100)])
    assert set(b) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    assert b["image_grid_thw"].tolist() == [[1, 6, 8], [1, 4, 8]]
    head = ids_of(tok, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    tail = ids_of(tok, "<|im_end|>\n<|im_start|>assistant\n")
    row0 = head + [cfg.vision_start_token_id] + [cfg.image_token_id] * 12 + [cfg.vision_end_token_id] + ids_of(tok, Q) + tail
    row1 = (head + [cfg.vision_start_token_id] + [cfg.image_token_id] * 8 + [cfg.vision_end_token_id]
            + ids_of(tok, "what color is the circle on the left?") + tail)
    width = max(len(row0), len(row1))
    assert b["input_ids"].shape == (2, width)
    for i, row in enumerate((row0, row1)):  # left padding
        pad = width - len(row)
        assert b["input_ids"][i, pad:].tolist() == row
        assert b["input_ids"][i, :pad].eq(tok.pad_token_id).all()
        assert b["attention_mask"][i].tolist() == [0] * pad + [1] * len(row)
    # mm_token_type_ids: 1 exactly at <|image_pad|>, 0 elsewhere (vision start/end and padding included)
    assert b["mm_token_type_ids"].shape == b["input_ids"].shape
    assert torch.equal(b["mm_token_type_ids"], (b["input_ids"] == cfg.image_token_id).long())
    assert b["pixel_values"].shape == (48 + 32, 1176)


def test_onevision_prompt_layout_and_counts(ov):
    tok, cfg = ov.tokenizer, ov.model.config
    assert ov.processor.prompt_text(Q) == "<|im_start|>user\n<image>\nwhat is this?<|im_end|>\n<|im_start|>assistant\n"
    assert ov.processor.prompt_text(Q, 2) == "<|im_start|>user\n<image>\n<image>\nwhat is this?<|im_end|>\n<|im_start|>assistant\n"
    # 200x210 -> pinpoint 224x224 (4x4 crops of 4x4 patches = a 16x16 map; unpad removes int(16 - 200*16/210)//2 = 0
    # rows) -> ratio sqrt(256 / (9*16)) = 1.33 > 1.1 -> interpolated to 12x12 = 144 + 12 newlines + 16 base = 172;
    # 50x100 -> pinpoint 56x112 (1x2 crops, a 4x8 map, same aspect: nothing unpadded, ratio < 1.1): 32 + 4 newlines
    # + 16 base = 52. Both are also checked against transformers' own count (image_tokens calls it) and the model below.
    assert [ov.processor.image_tokens(s) for s in ((200, 210), (50, 100))] == [172, 52]
    assert ov.processor.image_tokens((200, 210), multi_image=True) == 17
    b = ov.processor([Q, Q], [img(0, 200, 210), img(1, 50, 100)])
    assert set(b) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"}
    assert b["pixel_values"].shape == (2, 17, 3, 56, 56)  # padded to the larger crop count (16 + base)
    assert b["image_sizes"].tolist() == [[200, 210], [50, 100]] and b["batch_num_images"].tolist() == [1, 1]
    head, tail = ids_of(tok, "<|im_start|>user\n"), ids_of(tok, "\nwhat is this?<|im_end|>\n<|im_start|>assistant\n")
    assert b["input_ids"][0].tolist() == head + [cfg.image_token_id] * 172 + tail
    assert b["input_ids"][1, -(len(head) + 52 + len(tail)):].tolist() == head + [cfg.image_token_id] * 52 + tail
    assert b["attention_mask"][1].sum() == len(head) + 52 + len(tail)
    # the counts are what the stock model's packing produces
    with torch.no_grad():
        feats = ov.model.model.get_image_features(pixel_values=b["pixel_values"], image_sizes=b["image_sizes"],
                                                  batch_num_images=b["batch_num_images"])
    feats = getattr(feats, "pooler_output", feats)
    assert [f.shape[0] for f in feats] == [172, 52]
    # several images in one sample: base crop only, 16 + 1 newline each
    m = ov.processor([Q, Q], [[img(2, 200, 210), img(3, 60, 60)], img(4, 50, 100)])
    assert m["batch_num_images"].tolist() == [2, 1]
    assert [int((m["input_ids"][i] == cfg.image_token_id).sum()) for i in range(2)] == [34, 52]
    with torch.no_grad():
        feats = ov.model.model.get_image_features(pixel_values=m["pixel_values"], image_sizes=m["image_sizes"],
                                                  batch_num_images=m["batch_num_images"])
    assert [f.shape[0] for f in getattr(feats, "pooler_output", feats)] == [17, 17, 52]
    with torch.no_grad():
        ov.model(**m)


def _alone(b, i):
    keep = b["attention_mask"][i].bool()
    return {k: v[i:i + 1][:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in b.items()}


@pytest.mark.parametrize("family", ["qwen", "ov"])
def test_stock_generate_batch_equals_each_sample_alone(family, qwen, ov):
    rt = qwen if family == "qwen" else ov
    qs = ["what is this?", "what color is the circle on the left?"]
    ims = [img(5, 200, 210), img(6, 50, 100)]
    b = rt.processor(qs, ims)
    assert b["attention_mask"][:, 0].tolist().count(0) == 1  # a genuinely left-padded batch
    with torch.no_grad():
        logits = rt.model(**b).logits
        assert logits.shape[:2] == b["input_ids"].shape and torch.isfinite(logits).all()
        out = rt.model.generate(**b, max_new_tokens=3, do_sample=False, min_new_tokens=3)
        new = out[:, b["input_ids"].shape[1]:]
        assert new.shape == (2, 3)
        for i in range(2):
            one = rt.processor([qs[i]], [ims[i]])
            if family == "qwen":
                one_px = {k: one[k] for k in ("pixel_values", "image_grid_thw")}
                assert torch.equal(one_px["image_grid_thw"], b["image_grid_thw"][i:i + 1])
            for k in ("input_ids", "attention_mask"):
                assert torch.equal(one[k], _alone(b, i)[k])
            o1 = rt.model.generate(**one, max_new_tokens=3, do_sample=False, min_new_tokens=3)
            assert o1[0, one["input_ids"].shape[1]:].tolist() == new[i].tolist()


def _question_after_last_visual(ids, spec, image_token_id):
    """What the engine keeps as the question: tokens after the last visual one, sep / tail stripped."""
    last = max(j for j, t in enumerate(ids) if t == image_token_id)
    toks = ids[last + 1:]
    i = 0
    while i < len(toks) and toks[i] in spec.sep_ids:
        i += 1
    j = len(toks) - len(spec.tail_ids) if toks[-len(spec.tail_ids):] == list(spec.tail_ids) else len(toks)
    return toks[i:j]


def test_prompt_spec_for_chatml(qwen, ov):
    for rt in (qwen, ov):
        tok = rt.tokenizer
        spec = rt.prompt_spec()
        assert spec.tail_ids == tuple(ids_of(tok, "<|im_end|>\n<|im_start|>assistant\n"))
        assert list(spec.tail_ids) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("\n"),
                                       tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("assistant"),
                                       tok.convert_tokens_to_ids("\n")]
        b = rt.processor([Q], [img(0, 50, 100)])
        assert _question_after_last_visual(b["input_ids"][0].tolist(), spec, rt.model.config.image_token_id) == ids_of(tok, Q)
    assert qwen.prompt_spec().sep_ids == (qwen.model.config.vision_end_token_id,)
    assert ov.prompt_spec().sep_ids == (ov.tokenizer.convert_tokens_to_ids("\n"),)


# Qwen2.5-VL-7B-Instruct: 8,292,166,656 parameters (the checkpoint's safetensors total); llava-onevision-qwen2-7b-ov:
# 8.03e9 (model card)
@pytest.mark.parametrize("name,params,family", [("qwen2.5-vl-7b", 8.292e9, "qwen2_5_vl"),
                                                ("llava-onevision-7b", 8.03e9, "llava_onevision")])
def test_shape_configs_build_the_real_architectures(name, params, family):
    rt = load(f"shape:{name}", device="meta")
    assert rt.family == family and rt.info["random_weights"]
    n = sum(p.numel() for p in rt.model.parameters())
    assert n == pytest.approx(params, rel=2e-3), n
    tc, vc = rt.model.config.text_config, rt.model.config.vision_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (3584, 28, 28, 4)
    if family == "qwen2_5_vl":
        assert tc.vocab_size == 152064 and tc.rope_parameters["mrope_section"] == [16, 24, 24]
        assert (vc.depth, vc.hidden_size, vc.fullatt_block_indexes, vc.window_size) == (32, 1280, [7, 15, 23, 31], 112)
        assert rt.processor.image_tokens((300, 500)) == 198
    else:
        assert tc.vocab_size == 152128 and len(rt.model.config.image_grid_pinpoints) == 36
        assert (vc.image_size // vc.patch_size) ** 2 == 729 and vc.num_hidden_layers == 26
        assert rt.processor.image_tokens((384, 384)) == 729 + 27 * 27 + 27  # base + 1x1 grid + newlines
    # the tiny tokenizer's ids stand in for the checkpoint's placeholders
    assert rt.model.config.image_token_id == rt.tokenizer.convert_tokens_to_ids(rt.processor.placeholder)


def test_qwen3_vl_shape_configs():
    """shape:qwen3-vl-8b: the LLM counted by hand (Qwen3: q/k RMS norms per head, untied embeddings), the total
    within 0.5% of the Hub's 8.77B; shape:qwen3-vl-cpu-small keeps the real token geometry (768 px -> 576)."""
    rt = load("shape:qwen3-vl-8b", device="meta")
    assert rt.family == "qwen3_vl" and rt.info["random_weights"]
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 2 * 128 + 3 * 4096 * 12288 + 2 * 4096  # attn, q/k norms, MLP, 2 norms
    llm = 2 * 151936 * 4096 + 36 * layer + 4096
    lm = rt.model.model.language_model
    assert sum(p.numel() for p in lm.parameters()) + rt.model.lm_head.weight.numel() == llm == 8_190_735_360
    n = sum(p.numel() for p in rt.model.parameters())
    assert n == pytest.approx(8.77e9, rel=5e-3), n
    vc = rt.model.config.vision_config
    assert (vc.depth, vc.hidden_size, list(vc.deepstack_visual_indexes), vc.patch_size) == (27, 1152, [8, 16, 24], 16)
    assert rt.processor.image_tokens((768, 768)) == 576
    small = load("shape:qwen3-vl-cpu-small", device="meta")
    assert small.processor.image_tokens((768, 768)) == 576 and len(small.model.model.language_model.layers) == 8
    assert rt.model.config.image_token_id == rt.tokenizer.convert_tokens_to_ids(rt.processor.placeholder)


def test_qwen3_5_shape_configs():
    """shape:qwen3.5-9b: the hybrid LLM counted by hand (8 gated full-attention layers, 24 Gated DeltaNet layers),
    8.95B = the model card's 9B language model; 9.41B with the tower. cpu-small: the real token geometry and pattern."""
    rt = load("shape:qwen3.5-9b", device="meta")
    assert rt.family == "qwen3_5" and rt.info["random_weights"]
    d, m = 4096, 12288
    attn = d * (16 * 256 * 2) + 2 * d * (4 * 256) + 16 * 256 * d + 2 * 256  # q + gate, k, v, o, q/k norms
    key, val = 16 * 128, 32 * 128
    delta = d * (2 * key + val) + d * val + 2 * d * 32 + (2 * key + val) * 4 + 2 * 32 + 128 + val * d  # qkv, z, b, a,
    mlp_norms = 3 * d * m + 2 * d  # conv1d, dt_bias + A_log, gated norm, out_proj; SwiGLU and the two norms
    llm = 2 * 248320 * d + 8 * (attn + mlp_norms) + 24 * (delta + mlp_norms) + d
    lm = rt.model.model.language_model
    assert sum(p.numel() for p in lm.parameters()) + rt.model.lm_head.weight.numel() == llm == 8_953_803_264
    assert lm.config.layer_types.count("full_attention") == 8 and lm.config.layer_types[3::4] == ["full_attention"] * 8
    assert sum(p.numel() for p in rt.model.parameters()) == pytest.approx(9.41e9, rel=1e-3)
    assert rt.processor.image_tokens((768, 768)) == 576
    small = load("shape:qwen3.5-cpu-small", device="meta")
    assert small.processor.image_tokens((768, 768)) == 576
    assert small.model.model.language_model.config.layer_types[3::4] == ["full_attention"] * 2
    assert rt.model.config.image_token_id == rt.tokenizer.convert_tokens_to_ids(rt.processor.placeholder)


def test_internvl_shape_configs():
    """shape:internvl3.5-8b: InternViT-300M (304.0M), the projector on 4 x 1024 channels counted by hand, Qwen3-8B as
    Qwen3-VL-8B's LLM; 8.53B in all (the model card: 8.5B); 448-px tiles of 256 tokens, a 640x480 image (GQA's
    typical size, aspect 4:3) tiled 4 x 3 + thumbnail = 13 tiles = 3328 tokens. cpu-small: the same geometry."""
    rt = load("shape:internvl3.5-8b", device="meta")
    assert rt.family == "internvl" and rt.info["random_weights"]
    m = rt.model
    proj = 2 * 4096 + (4096 * 4096 + 4096) + (4096 * 4096 + 4096)  # LayerNorm(4C), linear_1, linear_2
    assert sum(p.numel() for p in m.model.multi_modal_projector.parameters()) == proj
    llm = sum(p.numel() for p in m.model.language_model.parameters()) + m.lm_head.weight.numel()
    assert llm == 8_190_735_360  # Qwen3-8B (tests/test_loading_new_families.py: counted by hand for Qwen3-VL-8B)
    assert sum(p.numel() for p in m.model.vision_tower.parameters()) == pytest.approx(304e6, rel=1e-3)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(8.5e9, rel=5e-3)
    assert rt.processor.image_tokens((448, 448)) == 256 and rt.processor.image_tokens((480, 640)) == 13 * 256
    small = load("shape:internvl-cpu-small", device="meta")
    assert small.processor.image_tokens((480, 640)) == 13 * 256 and len(small.model.model.language_model.layers) == 8
    assert rt.model.config.image_token_id == rt.tokenizer.convert_tokens_to_ids(rt.processor.placeholder)


@pytest.mark.parametrize("family", ["qwen", "ov", "internvl"])
def test_local_directory_roundtrip(family, qwen, ov, tmp_path):
    rt = {"qwen": qwen, "ov": ov}.get(family) or load("tiny:internvl", seed=2)  # InternVL: tiles, <img> runs
    rt.model.save_pretrained(tmp_path)
    rt.tokenizer.save_pretrained(tmp_path)
    rt.processor.image_processor.save_pretrained(tmp_path)
    loaded = load(str(tmp_path), dtype="float32")
    assert loaded.family == rt.family and type(loaded.model) is type(rt.model) and loaded.info["local"]
    assert type(loaded.processor) is type(rt.processor) and loaded.template.name == rt.template.name
    assert loaded.prompt_spec() == rt.prompt_spec()
    ims = [img(7, 200, 210), img(8, 50, 100)]
    a, b = rt.processor([Q, Q], ims), loaded.processor([Q, Q], ims)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(rt.model(**a).logits, loaded.model(**b).logits)
    if family == "qwen":  # min/max pixels travel with the saved image processor, and load() can override them
        assert loaded.processor.image_processor.size["longest_edge"] == 28 * 28 * 16
        big = load(str(tmp_path), max_pixels=28 * 28 * 64)
        assert big.processor.image_tokens((200, 210)) > loaded.processor.image_tokens((200, 210))
