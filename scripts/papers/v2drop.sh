#!/usr/bin/env bash
# v2drop: its tables beside the published numbers (eval/papers/v2drop.toml, docs/papers.md).
#   bash scripts/papers/v2drop.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=v2drop
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
# V2Drop ("Variation-aware Vision Token Dropping for Faster Large Vision-Language Models", CVPR 2026, arXiv 2509.01552).
# The abstract's 94.0% (image) / 98.6% (video) come with no model, budget or benchmark set and the paper's tables were not
# readable: the one table is reference-only, every cell missing with the reason; it runs the official schedule (202.8
# equivalent tokens), the per-budget ratios quoted second-hand (schedule="reported") and our budget fit at 192 / 128 / 64.
