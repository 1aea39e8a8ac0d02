#!/usr/bin/env bash
# apet: its tables beside the published numbers (eval/papers/apet.toml, docs/papers.md).
#   bash scripts/papers/apet.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=apet
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
