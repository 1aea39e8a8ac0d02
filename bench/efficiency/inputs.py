"""The efficiency benchmark's configuration and inputs: :class:`BenchConfig` (every ``python -m
bench.efficiency`` flag), the synthetic image size per family, the seeded random (question, image) list
that every method and budget sees, and the batch the runtime's own processor builds from it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from llava.families import registry
from llava.families.registry import DEFAULT_MODEL


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL
    dtype: str | None = None
    device: str | None = None
    methods: list = field(default_factory=lambda: ["none"])
    budgets: list = field(default_factory=lambda: [192, 128, 64])
    n: int = 20
    warmup: int = 3
    batch_sizes: list = field(default_factory=lambda: [1])
    decode_tokens: int = 16
    decode_samples: int = 3
    text_words: int = 12
    image_hw: tuple | None = None  # None: the family's default (default_image_hw)
    images: str = "noise"  # "noise": random pixels; "pages": synthetic document pages (llava.check.inputs.page_image)
    next_layout: str = "spatial"
    sweep: list = field(default_factory=list)  # sequence lengths for the cost model; default from inputs
    seed: int = 0
    out: str = "runs/efficiency"  # committed reports name their folder under docs/results/ (scripts/bench/efficiency.sh)
    wandb: bool = False
    threads: int | None = None
    fast: bool = False  # also run every cell with load(fast=True): fast and eager rows side by side
    fast_backend: str = "auto"
    fast_attention: str = "auto"  # the prompt's attention over its bucket (llava.fast.attention)
    fast_max_new_tokens: int | None = None  # static-cache decode slots; None: decode_tokens
    fast_first: bool = False  # each cell's fast row before its eager row
    resume: bool = False  # keep the rows of an earlier run of the same configuration (cells.jsonl)
    device_warmup: float = 0.0  # seconds of unpruned prefills before the first row
    retime_none: bool = False  # the unpruned row timed again after the last method


# Synthetic image size per family (by its record's layout) when --image-hw is not given, and what it gives on the real
# geometry:
#   llava / video_llava: 336x336 -> CLIP-L/336: 24x24 = 576 tokens (Video-LLaVA: 8 frames x 256)
#   llava_next: 672x672 -> 2x2 grid + base crop, 2880 tokens in the spatial layout (the papers' setting)
#   qwen2_5_vl, qwen2_vl: 672x672 -> smart_resize keeps 672 (a multiple of 28, within min/max_pixels) -> 48x48
#       patches of 14 px -> 2x2 merge -> 24x24 = 576 merged tokens: LLaVA-1.5's count, so budgets
#       192/128/64 keep the same fractions (PyramidDrop's table is stated for 576)
#   llava_onevision: 384x384 -> anyres: best pinpoint 384x384 (1x1 grid): base crop 27x27 = 729 +
#       grid 27x27 = 729 (no unpadding, no anyres_max_9 interpolation: 729 <= 9 x 729) + 27 row newlines
#       = 1485 tokens, OneVision's count for a single 384 px image
#   qwen3_vl: 24 merged tokens a side, whatever the patch size: 768x768 on the real patch 16 (48x48 patches
#       -> 576 merged tokens, each with its DeepStack rows), 672x672 on the tiny model's patch 14
#   qwen3_5: as qwen3_vl (the same tower geometry, no DeepStack): 768x768 -> 576 merged tokens
#   internvl: two tiles a side: 896x896 on the real 448-px tiles -> aspect 1: the 2x2 tile grid (its area
#       802,816 > half of 4 tiles' 401,408; 3x3 would need 903,168) + the thumbnail = 5 tiles x 256 = 1280 tokens
#       (NeXT's base + 4 crops, at InternVL's 256 per tile); 224x224 on the tiny model's 112-px tiles (5 x 16 = 80)
#   (the Qwen grid: 24 merged tokens a side, 24 x merge x patch, is 672 on Qwen2-VL's / Qwen2.5-VL's patch 14 too)
LAYOUT_IMAGE_HW = {"single": (336, 336), "anyres": (672, 672), "anyres_max": (384, 384)}


def default_image_hw(rt) -> tuple[int, int]:
    layout = registry.get(rt.family).layout
    if layout == "grid":
        vc = rt.model.config.vision_config
        side = 24 * vc.spatial_merge_size * vc.patch_size
        return (side, side)
    if layout == "tiles":
        side = 2 * rt.model.config.vision_config.image_size[0]
        return (side, side)
    return LAYOUT_IMAGE_HW.get(layout, (336, 336))


def describe_inputs(rt, image_hw: tuple[int, int]) -> dict:
    """What one synthetic input is, from the runtime's own processor (the tokens users would feed)."""
    from PIL import Image

    h, w = image_hw
    item = ("what is this?", [Image.new("RGB", (w, h))] * rt.processor.num_frames
            if registry.get(rt.family).video_model else Image.new("RGB", (w, h)))
    b = build_batch(rt, [item], torch.device("cpu"))
    tok_id = getattr(rt.model.config, "video_token_id" if registry.get(rt.family).video_model else "image_token_id")
    info = {"family": rt.family, "image_hw": [h, w], "visual_tokens": int((b["input_ids"] == tok_id).sum()),
            "batch_keys": {k: list(v.shape) for k, v in b.items() if isinstance(v, torch.Tensor)}}
    if "image_grid_thw" in b:
        info["image_grid_thw"] = b["image_grid_thw"].tolist()
    return info


def make_inputs(rt, n: int, text_words: int, seed: int, image_hw: tuple[int, int], images: str = "noise"):
    """A fixed list of (question, image or video frames): seeded random pictures and questions of
    ``text_words`` words (the same list for every method and budget). The pictures are PIL images fed
    through ``rt.processor`` as users do (Qwen2.5-VL: patch rows (t*h*w, 3*2*14*14) + image_grid_thw +
    mm_token_type_ids; OneVision: anyres crops + image_sizes + batch_num_images)."""
    import numpy as np
    from PIL import Image

    from llava.check.inputs import page_image
    from llava.tiny_tokenizer import BASE_WORDS

    rng = np.random.RandomState(seed)
    words = [w for w in BASE_WORDS if w.isalpha()]
    items = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=text_words)) + "?"
        h, w = image_hw
        if images == "pages":  # flat regions: what a pre-tower stage (PixelPrune) drops
            img = page_image(seed, i, h, w)
        else:
            img = Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))
        if registry.get(rt.family).video_model:
            items.append((q, [img] * rt.processor.num_frames))
        else:
            items.append((q, img))
    return items


def build_batch(rt, items, device):
    qs = [q for q, _ in items]
    if registry.get(rt.family).video_model:
        return rt.processor(qs, videos=[v for _, v in items], device=device)
    return rt.processor(qs, [im for _, im in items], device=device)


def parse_method(spec: str) -> tuple[str, dict]:
    """'name' or 'name:key=value,key=value' (values parsed as JSON when possible)."""
    if ":" not in spec:
        return spec, {}
    name, rest = spec.split(":", 1)
    opts = {}
    for kv in rest.split(","):
        k, v = kv.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return name, opts
