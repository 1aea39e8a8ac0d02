"""The video processor config of a loaded checkpoint, shared by the per-family video prompt builders
(:mod:`llava.preprocess_qwen_video`, :mod:`llava.preprocess_ov_internvl_video`)."""

from __future__ import annotations


def checkpoint_video_config(model_config) -> tuple[str, dict] | None:
    """``(name, config dict)`` of the checkpoint's video processor config (hub id or local folder, at the commit the
    model was loaded from), or None for a model built here (no ``_name_or_path``). An unreadable config is a
    ValueError naming the checkpoint."""
    name = str(getattr(model_config, "_name_or_path", "") or "")
    if not name:
        return None
    from transformers.video_processing_utils import VideoProcessorMixin

    revision = getattr(model_config, "_commit_hash", None)
    try:
        config, _ = VideoProcessorMixin.get_video_processor_dict(name, **({"revision": revision} if revision else {}))
    except OSError as e:
        raise ValueError(f"{name}: cannot read its video processor config for video inputs ({e})") from e
    return name, config
