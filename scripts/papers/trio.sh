#!/usr/bin/env bash
# trio: its tables beside the published numbers (eval/papers/trio.toml, docs/papers.md).
#   bash scripts/papers/trio.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=trio
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
