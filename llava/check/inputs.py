"""The inputs of the guarantees on the tiny models: prompts, pictures, batches of three (left-padded, or of equal
length), one sample cut out of a batch, and the greedy no-cache recompute that cached generation must equal."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..families import registry

QUESTIONS = ["what is this?", "what color is the circle on the left?", "how many objects are there in the picture?"]


def key(family: str) -> str:
    """The runtime's family name of a ``tiny:`` name ('qwen2.5-vl' -> 'qwen2_5_vl'): the key of per-family tables."""
    return registry.key(family)


def rand_image(seed: int, h: int = 40, w: int = 70) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def page_image(seed: int, i: int = 0, h: int = 320, w: int = 448) -> Image.Image:
    """A synthetic document page (what a pre-tower stage such as PixelPrune drops tokens of): flat regions on the
    32-pixel token grid, white margins, black text bars, a coloured header and a panel whose grey steps by 1 level
    every 32 pixels (neighbours similar under a tolerance, never equal)."""
    rng = np.random.default_rng([seed, i, 7])
    page = np.full((h, w, 3), 255, dtype=np.uint8)
    page[:32] = rng.integers(0, 256, 3, dtype=np.uint8)  # header
    for y in range(64, h - 32, 32):  # text lines: bars of random lengths, aligned to tokens or not
        x = 32
        while x < w - 64:
            n = int(rng.integers(2, 6)) * 16
            page[y + 8:y + 20, x:min(x + n, w - 32)] = 0
            x += n + int(rng.integers(1, 3)) * 16
    ph, pw = h // 4, w // 3
    y0, x0 = h - ph - 16, w - pw - 16
    steps = (200 + np.arange(pw) // 32).astype(np.uint8)
    page[y0:y0 + ph, x0:x0 + pw] = steps[None, :, None]
    return Image.fromarray(page)


def make_batch(rt, n=3, sizes=((40, 70), (56, 56), (90, 30))):
    """n samples with different prompts and images (or videos); left-padded."""
    qs = QUESTIONS[:n]
    if registry.get(rt.family).video_model:
        vids = [[rand_image(10 * i + j, 50, 50) for j in range(8)] for i in range(n)]
        return rt.processor(qs, videos=vids)
    imgs = [rand_image(i, *sizes[i % len(sizes)]) for i in range(n)]
    return rt.processor(qs, imgs)


def equal_length_batch(rt):
    """Three samples whose prompts have the same length (one question, same image sizes): generate()
    then drops the all-ones mask, and any padding must come from the pruning itself."""
    qs = [QUESTIONS[1]] * 3
    if registry.get(rt.family).video_model:
        return rt.processor(qs, videos=[[rand_image(10 * i + j, 50, 50) for j in range(8)] for i in range(3)])
    if registry.get(rt.family).layout == "anyres":  # 52 tokens each, but 3 / 5 / 3 crops: per-crop budgets keep unequal counts
        return rt.processor(qs, [rand_image(3 + i, *hw) for i, hw in enumerate([(20, 38), (62, 104), (30, 58)])])
    return rt.processor(qs, [rand_image(i, 40, 70) for i in range(3)])


def unequal_batch(rt):
    """Different questions and images (NeXT: different crop counts); Video-LLaVA: video + 2 images."""
    if registry.get(rt.family).video_model:
        vid = [rand_image(j, 50, 50) for j in range(8)]
        return rt.processor(QUESTIONS, images=[None, rand_image(1, 40, 70), rand_image(2, 90, 30)],
                            videos=[vid, None, None])
    return rt.processor(QUESTIONS, [rand_image(i, *s) for i, s in enumerate([(40, 70), (56, 56), (90, 30)])])


def slice_batch(inputs, i, rt):
    """Sample i of a batch built by make_batch, without its padding."""
    m = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i][m][None], "attention_mask": inputs["attention_mask"][i][m][None]}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][i][m][None]
    if "image_grid_thw" in inputs:  # Qwen: pixel rows are patches of all images, grid by grid (one image per sample)
        rows = inputs["image_grid_thw"].prod(-1)
        a = int(rows[:i].sum())
        out["pixel_values"] = inputs["pixel_values"][a:a + int(rows[i])]
        out["image_grid_thw"] = inputs["image_grid_thw"][i:i + 1]
        return out
    if registry.get(rt.family).layout == "tiles":  # pixel rows are the tiles of all images in prompt order
        per_tile = rt.model.config.image_seq_length
        tiles = [int((inputs["input_ids"][j] == rt.model.config.image_token_id).sum()) // per_tile
                 for j in range(inputs["input_ids"].shape[0])]
        a = sum(tiles[:i])
        out["pixel_values"] = inputs["pixel_values"][a:a + tiles[i]]
        return out
    if "batch_num_images" in inputs:
        out["batch_num_images"] = inputs["batch_num_images"][i:i + 1]
    if "pixel_values_videos" in inputs:
        out["pixel_values_videos"] = inputs["pixel_values_videos"][i:i + 1]
    if "pixel_values" in inputs:
        out["pixel_values"] = inputs["pixel_values"][i:i + 1]
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][i:i + 1]
    return out


def one_sample(inputs, i, rt):
    """Sample i of any batch here (:func:`unequal_batch`'s Video-LLaVA mix of a video and images too)."""
    out = slice_batch(inputs, i, rt)
    if "pixel_values" in inputs and "pixel_values_videos" in inputs:  # mixed batch: pick this sample's
        ids = out["input_ids"][0]
        has_img = bool((ids == rt.model.config.image_token_id).any())
        has_vid = bool((ids == rt.model.config.video_token_id).any())
        img_before = sum(bool((r == rt.model.config.image_token_id).any()) for r in inputs["input_ids"][:i])
        vid_before = sum(bool((r == rt.model.config.video_token_id).any()) for r in inputs["input_ids"][:i])
        out.pop("pixel_values", None)
        out.pop("pixel_values_videos", None)
        if has_img:
            out["pixel_values"] = inputs["pixel_values"][img_before:img_before + 1]
        if has_vid:
            out["pixel_values_videos"] = inputs["pixel_values_videos"][vid_before:vid_before + 1]
    return out


def sized_batch(rt, size):
    """The three questions, each with an image of ``size`` (h, w): the host-sync inputs."""
    return rt.processor(QUESTIONS, [rand_image(i, *size) for i in range(3)])


def greedy_no_cache(model, inputs, steps):
    """Greedy decoding by full recompute every step (use_cache=False), positions as generate builds
    them, end-of-sequence suppressed as ``min_new_tokens=steps`` does: the reference that cached
    generation must equal (with ``engine.replay`` for query-aware methods)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    mrope = "mm_token_type_ids" in extra  # Qwen: 3-D positions from the model's get_rope_index (pass none)
    for _ in range(steps):
        pos = None if mrope else (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **extra).logits
        last = logits[:, -1]
        eos = model.generation_config.eos_token_id
        if eos is not None:  # as generate(min_new_tokens=steps) does: no end of sequence before the last step
            last = last.clone()
            last[:, torch.as_tensor(eos).reshape(-1)] = float("-inf")
        nxt = last.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        if mrope:  # generated tokens are text (type 0)
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    return ids


def llm_visual_rows(rt, inputs, outputs: int | None = None):
    """Per sample, the visual rows of the sequence entering the language model (captured at its input). With
    ``outputs=n``: the ``n`` rows before the text after the image entering decoder layer 0 (a method whose staged
    decoder runs the layers itself, on left-padded rows [pad, text before, visual, text after])."""
    cap = {}
    lm = rt.model.model.language_model
    if outputs is None:
        hook = lm.register_forward_pre_hook(lambda m, a, kw: cap.update(kw), with_kwargs=True)
    else:
        def grab(m, a, kw):  # the first call's rows (returns None: the layer's inputs unchanged)
            cap.setdefault("h", a[0] if a else kw["hidden_states"])

        hook = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            rt.model(**inputs)
    finally:
        hook.remove()
    vis_ids = torch.tensor([rt.model.config.image_token_id, getattr(rt.model.config, "video_token_id", -1)])
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        pos = torch.nonzero(torch.isin(ids, vis_ids)).flatten()
        before, after = int(pos[0]), ids.numel() - int(pos[-1]) - 1
        if outputs is None:
            new = cap["inputs_embeds"][b][cap["attention_mask"][b].bool()]
            rows.append(new[before:new.shape[0] - after])
        else:
            h = cap["h"][b]
            rows.append(h[h.shape[0] - after - outputs:h.shape[0] - after])
    return rows
