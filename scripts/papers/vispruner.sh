#!/usr/bin/env bash
# vispruner: its tables beside the published numbers (eval/papers/vispruner.toml, docs/papers.md).
#   bash scripts/papers/vispruner.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=vispruner
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
