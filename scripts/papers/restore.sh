#!/usr/bin/env bash
# restore: its tables beside the published numbers (eval/papers/restore.toml, docs/papers.md).
#   bash scripts/papers/restore.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=restore
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
