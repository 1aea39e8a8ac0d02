#!/usr/bin/env bash
# transprune: its grid (no published column: eval/papers/transprune.toml, docs/papers.md).
#   bash scripts/papers/transprune.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=transprune
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
