"""Tiny random-weight checkpoints vLLM can load, for the plugin's tests: a local folder in the hub's layout
(``config.json``, ``model.safetensors``, tokenizer, processor).

Differences from ``llava.models.build_tiny`` (the engine's tiny models), each forced by vLLM:
- the LLM's head size is 32 (hidden 128, 4 heads): vLLM's CPU attention takes 32, 64, 80, ... only;
- the CLIP tower's weights are stored under ``vision_tower.vision_model.`` (real llava-hf checkpoints' keys,
  which vLLM's LLaVA loader expects), whatever the installed transformers writes;
- the tower sees 112 px images (8 x 8 = 64 patches), so that budgets of 8-32 prune.
"""

from __future__ import annotations

from pathlib import Path

import torch


#: sizes: "tiny" (the tests: 112 px, 64 tokens per image, LLM width 128), "cpu-small" (the throughput
#: benchmark: LLaVA-1.5's 336 px geometry, 576 tokens per image, a 8-layer LLM of width 512, head size 64) and "grid"
#: (paper grids on a CPU: 256 tokens per image, 16 LLM layers of width 64; not for vLLM, whose CPU attention wants
#: head sizes of 32 and up)
SIZES = {
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                             image_size=112, patch_size=14, projection_dim=64),
                 text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2)),
    "cpu-small": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=336, patch_size=14, projection_dim=256),
                      text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=8)),
    # the run benchmark on a CPU (bench.run_throughput): LLaVA-1.5's 336 px geometry (the real processor's host work,
    # 576 candidates) with a narrow tower and LLM, so that one short answer at 64 tokens costs a CPU core about what
    # the 7B costs an H100 on the fast path (tens of ms): the device / host ratio of a GPU run
    "run-cpu": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=336, patch_size=14, projection_dim=64),
                    text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=4)),
    # the Slurm tests' paper grids (tests/test_slurm.py): a 224 px tower, 16 x 16 = 256 tokens per image, so the
    # LLaVA-1.5 papers' budgets (64 / 128 / 192) really prune, and 16 LLM layers, so the LLM-stage methods' layers
    # (FastV K = 2, SparseVLM's 2 / 6 / 15) exist; narrow enough to run a grid in seconds on a CPU. Weights drawn
    # with std 0.2 (not 0.02): the answers then differ by image, question and method (at 0.02 every answer is the
    # same token), so two runs that agree have agreed on something
    "grid": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                             image_size=224, patch_size=14, projection_dim=32, initializer_range=0.2),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4,
                           num_key_value_heads=2, initializer_range=0.2)),
}


def llava_config(vocab_size: int, image_token_id: int, pad_token_id: int, size: str = "tiny"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(**SIZES[size]["vision"])
    text = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=2048, pad_token_id=pad_token_id,
                       tie_word_embeddings=False, **SIZES[size]["text"])
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=False)


def _hub_keys(path: Path) -> None:
    """Rewrite the saved tower keys to ``vision_tower.vision_model.*`` where transformers wrote them flat."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    sd = load_file(str(f))
    out = {}
    for k, v in sd.items():
        for pre in ("model.vision_tower.", "vision_tower."):
            if k.startswith(pre) and not k.startswith(pre + "vision_model."):
                k = pre + "vision_model." + k[len(pre):]
                break
        out[k] = v
    if out.keys() != sd.keys():
        save_file(out, str(f), metadata={"format": "pt"})


def save_tiny_llava(path: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """A small LLaVA-1.5 checkpoint at ``path`` (random weights from ``seed``; :data:`SIZES`) that vLLM and
    ``llava.load(path)`` both load; returns the path."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from llava.tiny_tokenizer import build_tiny_tokenizer

    path = Path(path)
    tok = build_tiny_tokenizer()
    cfg = llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, size)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    _hub_keys(path)
    side = cfg.vision_config.image_size
    ip = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    proc.save_pretrained(path)
    return path


#: LLaVA-NeXT's anyres grid at the tiny 112-px tower (the real ones are multiples of 336)
TINY_PINPOINTS = [[112, 224], [224, 112], [224, 224], [112, 336], [336, 112]]


def save_tiny_llava_next(path: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA-NeXT checkpoint (anyres over :data:`TINY_PINPOINTS`) that vLLM and ``llava.load(path)`` load."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, \
        LlavaNextProcessor

    from llava.tiny_tokenizer import build_tiny_tokenizer

    path = Path(path)
    tok = build_tiny_tokenizer()
    base = llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    cfg = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                          image_token_id=base.image_token_id, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          image_grid_pinpoints=TINY_PINPOINTS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    _hub_keys(path)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112},
                                 image_grid_pinpoints=TINY_PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, image_token="<image>")
    proc.save_pretrained(path)
    return path


def save_tiny_llava_onevision(path: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA-OneVision checkpoint (SigLIP 112 px, anyres_max_9 over 112-px multiples, a Qwen2 LLM of head
    size 32, the ChatML tiny tokenizer) that vLLM and ``llava.load(path)`` load."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor)

    from llava.tiny_tokenizer import build_tiny_tokenizer

    path = Path(path)
    tok = build_tiny_tokenizer(chatml=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<video>")}
    vc = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=2, image_size=112, patch_size=14, vision_use_head=False)
    tc = dict(model_type="qwen2", vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
              tie_word_embeddings=False, rope_theta=1e4, **SIZES["tiny"]["text"])
    pinpoints = [[112 * a, 112 * b] for a in range(1, 4) for b in range(1, 4)]
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=ids["<image>"],
                               video_token_id=ids["<video>"], vision_feature_select_strategy="full",
                               vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
                               image_grid_pinpoints=pinpoints, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    _hub_keys(path)
    mean_std = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    ip = LlavaOnevisionImageProcessor(size={"height": 112, "width": 112}, image_grid_pinpoints=pinpoints, **mean_std)
    try:
        from transformers import LlavaOnevisionVideoProcessor

        vp = LlavaOnevisionVideoProcessor(size={"height": 112, "width": 112}, **mean_std)
    except Exception:  # noqa: BLE001 - a video processor needs torchvision; images do not
        vp = None
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=64,
                                   vision_feature_select_strategy="full", image_token="<image>", video_token="<video>")
    proc.save_pretrained(path)
    return path


def save_tiny_qwen2_5_vl(path: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL checkpoint (windowed ViT of width 64, 2x2 merger, an LLM of head size 32 with M-RoPE
    sections [4, 6, 6], the ChatML tiny tokenizer; images 56^2..224^2 px) that vLLM and ``llava.load(path)`` load."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)

    from llava.tiny_tokenizer import build_tiny_tokenizer

    path = Path(path)
    tok = build_tiny_tokenizer(chatml=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                       "<|vision_end|>")}
    vc = dict(depth=4, hidden_size=64, num_heads=2, intermediate_size=128, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3], out_hidden_size=128,
              tokens_per_second=2)
    tc = dict(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=None, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]},
              **SIZES["tiny"]["text"])
    cfg = Qwen2_5_VLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, temporal_patch_size=2,
                               merge_size=2)
    try:
        from transformers import Qwen2VLVideoProcessor

        vp = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, temporal_patch_size=2,
                                   merge_size=2)
    except Exception:  # noqa: BLE001 - a video processor needs torchvision; images do not
        vp = None
    Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp).save_pretrained(path)
    return path


def save_tiny_qwen3_vl(path: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen3-VL checkpoint (patch 16, learned position grid 8 x 8, DeepStack after tower blocks 0, 1, 2, a
    Qwen3 LLM of head size 32 with interleaved M-RoPE) that vLLM and ``llava.load(path)`` load."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    from llava.tiny_tokenizer import build_tiny_tokenizer

    path = Path(path)
    tok = build_tiny_tokenizer(chatml=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                       "<|vision_end|>")}
    vc = dict(depth=4, hidden_size=64, num_heads=2, intermediate_size=128, patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2])
    tc = dict(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=None, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, tie_word_embeddings=False, head_dim=32,
              rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [6, 5, 5],
                               "mrope_interleaved": True},
              **SIZES["tiny"]["text"])
    cfg = Qwen3VLConfig(vision_config=vc, text_config=tc, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    ip = Qwen2VLImageProcessor(min_pixels=64 * 64, max_pixels=256 * 256, patch_size=16, temporal_patch_size=2,
                               merge_size=2)
    try:
        from transformers import Qwen3VLVideoProcessor

        vp = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    except Exception:  # noqa: BLE001 - a video processor needs torchvision; images do not
        vp = None
    Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp).save_pretrained(path)
    return path


def export_for_vllm(src: str | Path, dst: str | Path) -> Path:
    """A copy of a LLaVA-1.5 checkpoint folder written by transformers (e.g. the testbed's ``testbed/weights``) that
    vLLM loads: the tower's keys in the hub layout and a ``processor_config.json`` (LlavaProcessor: the folder's
    tokenizer and image processor). The weights are unchanged (``llava.load(dst)`` gives the same model)."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    src, dst = Path(src), Path(dst)
    cfg = AutoConfig.from_pretrained(src)
    if (cfg.architectures or [""])[0] != "LlavaForConditionalGeneration":
        raise ValueError(f"{src}: export_for_vllm takes LLaVA-1.5 folders, got {cfg.architectures}")
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name != "train_log.json":
            shutil.copy2(p, dst / p.name)
    _hub_keys(dst)
    vc = cfg.vision_config
    proc = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(src), tokenizer=AutoTokenizer.from_pretrained(src),
                          patch_size=vc.patch_size, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          num_additional_image_tokens=1, image_token="<image>")
    proc.save_pretrained(dst)
    return dst
