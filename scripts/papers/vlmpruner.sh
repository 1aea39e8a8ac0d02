#!/usr/bin/env bash
# vlmpruner: its grid (no published column: eval/papers/vlmpruner.toml, docs/papers.md).
#   bash scripts/papers/vlmpruner.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=vlmpruner
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
