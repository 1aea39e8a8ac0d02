#!/usr/bin/env bash
# clse: its tables beside the published numbers (eval/papers/clse.toml, docs/papers.md).
#   bash scripts/papers/clse.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=clse
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
