#!/usr/bin/env bash
# pdrop: its tables beside the published numbers (eval/papers/pdrop.toml, docs/papers.md).
#   bash scripts/papers/pdrop.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=pdrop
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
