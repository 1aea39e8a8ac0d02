"""Per-family model adapters: each file answers, for one model family, what the family-agnostic
engine core (``llava/engine.py``) needs to know (see :mod:`llava.families.base`)."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, VisualBlock, to_device  # noqa: F401
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .llava_next import NEXT_LAYOUTS, LlavaNextAdapter, next_token_layout  # noqa: F401
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_5 import Qwen3_5Adapter
from .qwen3_vl import Qwen3VLAdapter
from .video_llava import VideoLlavaAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    cls.model_class: cls for cls in (LlavaAdapter, LlavaNextAdapter, VideoLlavaAdapter, Qwen2_5_VLAdapter,
                                         LlavaOnevisionAdapter, Qwen3VLAdapter, InternVLAdapter,
                                         Qwen3_5Adapter, Qwen2VLAdapter)
}
#: model class name -> family key
FAMILIES = {name: cls.family for name, cls in ADAPTERS.items()}


#: families transformers ships that the engine refuses, and why
REFUSED: dict[str, str] = {}


def model_family(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name in REFUSED:
        raise TypeError(REFUSED[name])
    if name not in ADAPTERS:
        raise TypeError(f"unsupported model class {name}; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[name].family


def adapter_for(model: torch.nn.Module, **options) -> FamilyAdapter:
    """The adapter of ``model``'s family; ``options`` are family options (``next_layout``: LLaVA-NeXT's
    packing, ignored by families with a single packing)."""
    cls = ADAPTERS.get(type(model).__name__)
    if cls is None:
        model_family(model)  # raises: refused (with the reason) or not supported (with the list)
    return cls(model, **options)
