#!/usr/bin/env bash
# hiprune: its tables beside the published numbers (eval/papers/hiprune.toml, docs/papers.md).
#   bash scripts/papers/hiprune.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=hiprune
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
