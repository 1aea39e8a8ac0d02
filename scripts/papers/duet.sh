#!/usr/bin/env bash
# duet: its tables beside the published numbers (eval/papers/duet.toml, docs/papers.md).
#   bash scripts/papers/duet.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=duet
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
