#!/usr/bin/env bash
# pixelprune: its tables beside the published numbers (eval/papers/pixelprune.toml, docs/papers.md).
#   bash scripts/papers/pixelprune.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=pixelprune
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
