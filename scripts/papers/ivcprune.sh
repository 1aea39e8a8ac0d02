#!/usr/bin/env bash
# ivcprune: its grid (no published column: eval/papers/ivcprune.toml, docs/papers.md).
#   bash scripts/papers/ivcprune.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=ivcprune
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
