"""ConsensusDrop (arXiv 2602.00946), our reconstruction. See consensusdrop/consensusdrop.py."""

from .consensusdrop import (  # noqa: F401
    ConsensusDrop, adaptive_dominant, consensus_scores, diverse_pick, fused_relevance, order_desc, select_dominant,
    split_budget, unit_budgets, unit_relevance)
