#!/usr/bin/env bash
# mmtok: its tables beside the published numbers (eval/papers/mmtok.toml, docs/papers.md).
#   bash scripts/papers/mmtok.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=mmtok
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
