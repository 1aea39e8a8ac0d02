"""VisionDrop (arXiv 2506.22283, AAAI 2026). See visiondrop/visiondrop.py."""

from .visiondrop import VisionDrop, image_schedule, llm_stage_select, stage0_unit, video_schedule  # noqa: F401
