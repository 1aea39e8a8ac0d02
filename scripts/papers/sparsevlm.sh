#!/usr/bin/env bash
# sparsevlm: its tables beside the published numbers (eval/papers/sparsevlm.toml, docs/papers.md).
#   bash scripts/papers/sparsevlm.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=sparsevlm
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
