"""A deterministic synthetic picture (coloured shapes on a background) for demos and smoke runs."""

from __future__ import annotations

from PIL import Image, ImageDraw


def demo_image(width: int = 336, height: int = 252) -> Image.Image:
    img = Image.new("RGB", (width, height), (235, 230, 215))
    d = ImageDraw.Draw(img)
    d.rectangle([20, 30, 110, 120], fill=(200, 30, 30))
    d.ellipse([150, 60, 230, 140], fill=(30, 80, 200))
    d.polygon([(260, 200), (320, 200), (290, 150)], fill=(240, 200, 20))
    d.ellipse([60, 180, 80, 200], fill=(20, 150, 60))  # a small, non-salient object
    return img
