"""AttnMix = AdaFV / AdaV (arXiv 2501.09532, ACL 2025 Findings). See attnmix/attnmix.py."""

from llava.ops import text_to_image_score  # noqa: F401  (AdaV's s_j, shared with ConsensusDrop)

from .attnmix import AttnMix, adav_budget, adav_select  # noqa: F401
