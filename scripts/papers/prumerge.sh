#!/usr/bin/env bash
# prumerge: its tables beside the published numbers (eval/papers/prumerge.toml, docs/papers.md).
#   bash scripts/papers/prumerge.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=prumerge
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
