#!/usr/bin/env bash
# flowcut: its tables beside the published numbers (eval/papers/flowcut.toml, docs/papers.md).
#   bash scripts/papers/flowcut.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=flowcut
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
