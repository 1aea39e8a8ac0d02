#!/usr/bin/env bash
# priortr: its tables beside the published numbers (eval/papers/priortr.toml, docs/papers.md).
#   bash scripts/papers/priortr.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=priortr
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
