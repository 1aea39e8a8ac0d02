#!/usr/bin/env bash
# fastv: its tables beside the published numbers (eval/papers/fastv.toml, docs/papers.md).
#   bash scripts/papers/fastv.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=fastv
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
