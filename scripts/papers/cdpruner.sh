#!/usr/bin/env bash
# cdpruner: its tables beside the published numbers (eval/papers/cdpruner.toml, docs/papers.md).
#   bash scripts/papers/cdpruner.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=cdpruner
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
