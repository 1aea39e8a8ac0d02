#!/usr/bin/env bash
# adav: its tables beside the published numbers (eval/papers/adav.toml, docs/papers.md).
#   bash scripts/papers/adav.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=adav
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
