#!/usr/bin/env bash
# consensusdrop: its tables beside the published numbers (eval/papers/consensusdrop.toml, docs/papers.md).
#   bash scripts/papers/consensusdrop.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=consensusdrop
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
