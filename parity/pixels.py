"""``python -m parity pixels``: a pre-tower stage's keep rule, the official code beside ours (PixelPrune,
parity/adapters/pixelprune.py). Per seed: the build's smooth images and document-like pages (flat margins, text bars,
a header, a gradient panel), through our processor at Qwen3-VL's and Qwen3.5's real patch geometry
(``shape:qwen3-vl-cpu-small``, ``shape:qwen3.5-cpu-small``: patch 16, merge 2, the checkpoints' mean / std 0.5); the
official selector on the processor's pixels, ours through the engine's prefill; per option set
(:data:`parity.adapters.pixelprune.CONFIGS`) and precision (fp16: the model and its pixels in fp16) every image's kept
merged tokens compared."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .report import Check

FAMILIES = ("qwen3-vl-cpu-small", "qwen3.5-cpu-small")
QUESTION = "What does this page say?"


def images(seed: int) -> list:
    """The seed's inputs: two smooth images (the build's) and two pages."""
    from PIL import Image

    from llava.check.inputs import page_image

    from .build import image_array

    smooth = [Image.fromarray(image_array(seed, i, w, h)) for i, (w, h) in enumerate(((224, 160), (192, 256)))]
    pages = [page_image(seed, i, h, w) for i, (w, h) in enumerate(((448, 320), (320, 448)))]
    return smooth + pages


def _official_path(path: str | None) -> Path:
    from .adapters import pixelprune as adapter

    repo = Path(__file__).resolve().parents[1]
    clone = Path(path) if path else repo / ".official" / "pixelprune"
    if not (clone / "pixelprune" / "__init__.py").is_file():
        raise ValueError(f"no PixelPrune clone at {clone}: run `bash scripts/official_clones.sh pixelprune` (commit "
                         f"{adapter.COMMIT[:7]}) or pass --official-path")
    return clone


def run(seeds: list[int], dtypes: list[str], official_path: str | None = None) -> list[Check]:
    """Every check of the part: per family, precision, seed and option set, one row."""
    from llava import load

    from .adapters import pixelprune as adapter

    clone = _official_path(official_path)
    sys.path.insert(0, str(clone))
    checks = []
    for fam in FAMILIES:
        for dtype in dtypes:
            rt = load(f"shape:{fam}", seed=0, dtype="float16" if dtype == "fp16" else "float32")
            ip = rt.processor.image_processor
            ip.image_mean, ip.image_std = [0.5] * 3, [0.5] * 3  # the Qwen3-VL / Qwen3.5 checkpoints' processor
            for seed in seeds:
                imgs = images(seed)
                for name, official, ours in adapter.CONFIGS:
                    same, tokens, kept_o, kept_u, first = True, 0, 0, 0, ""
                    eng = rt.prune("pixelprune", **ours)
                    for j, img in enumerate(imgs):  # one image per prompt: the official reference is batch 1
                        inputs = rt.processor([QUESTION], [img])
                        if dtype == "fp16":
                            inputs["pixel_values"] = inputs["pixel_values"].half()
                        ref = adapter.official_keep(inputs["pixel_values"], inputs["image_grid_thw"], official)[0]
                        with torch.no_grad():
                            rt.model(**inputs)
                        sel = eng.selections[("pixels", 0, 0)]
                        got = sel.keep[:int(sel.count)].tolist()
                        tokens += int(inputs["image_grid_thw"][0].prod()) // 4
                        kept_o, kept_u = kept_o + len(ref), kept_u + len(got)
                        if got != ref and same:
                            same = False
                            diff = sorted(set(got) ^ set(ref))
                            first = f"; image {j}: {len(diff)} tokens differ, first {diff[:5]}"
                    checks.append(Check("pixelprune", f"{fam} {dtype} seed {seed} {name}", same,
                                        f"{len(imgs)} images, {tokens} tokens: kept official {kept_o}, ours "
                                        f"{kept_u}{first}"))
                    print(f"[parity pixels] {checks[-1].case}: {'identical' if same else 'DIFFERS'} "
                          f"({checks[-1].detail})", flush=True)
    return checks
