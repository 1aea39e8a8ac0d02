"""Per-family model adapters: each file answers, for one model family, what the family-agnostic
engine core (``llava/engine.py``) needs to know (see :mod:`llava.families.base`); :mod:`llava.families.registry`
holds one record per family (its adapter, model class, processors, tiny config and traits)."""

from __future__ import annotations

import torch

from . import registry
from .base import FamilyAdapter, to_device  # noqa: F401
from .internvl import InternVLAdapter  # noqa: F401
from .llava import LlavaAdapter  # noqa: F401
from .llava_next import NEXT_LAYOUTS, LlavaNextAdapter, next_token_layout  # noqa: F401
from .llava_onevision import LlavaOnevisionAdapter  # noqa: F401
from .qwen2_5_vl import Qwen2_5_VLAdapter  # noqa: F401
from .qwen2_vl import Qwen2VLAdapter  # noqa: F401
from .qwen3_5 import Qwen3_5Adapter  # noqa: F401
from .qwen3_vl import Qwen3VLAdapter  # noqa: F401
from .registry import Family, register_family  # noqa: F401
from .video_llava import VideoLlavaAdapter  # noqa: F401


def family_record(model: torch.nn.Module) -> registry.Family:
    """The registry's record of ``model``'s family (by its class name); TypeError naming the supported classes."""
    name = type(model).__name__
    f = registry.by_model_class(name)
    if f is None:
        raise TypeError(f"unsupported model class {name}; supported: "
                        f"{', '.join(f.model_class for f in registry.families())}")
    return f


def adapter_for(model: torch.nn.Module, **options) -> FamilyAdapter:
    """The adapter of ``model``'s family; ``options`` are family options (``next_layout``: LLaVA-NeXT's
    packing, ignored by families with a single packing)."""
    f = family_record(model)
    adapter = f.adapter(model, **options)
    adapter.family = f.id
    return adapter
