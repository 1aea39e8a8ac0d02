#!/usr/bin/env bash
# divprune: its tables beside the published numbers (eval/papers/divprune.toml, docs/papers.md).
#   bash scripts/papers/divprune.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=divprune
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
