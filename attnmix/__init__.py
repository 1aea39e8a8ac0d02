"""AttnMix = AdaFV / AdaV (arXiv 2501.09532, ACL 2025 Findings). See attnmix/attnmix.py."""

from .attnmix import AttnMix, adav_budget, adav_select, text_to_image_score  # noqa: F401
