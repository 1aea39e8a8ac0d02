#!/usr/bin/env bash
# otprune: its tables beside the published numbers (eval/papers/otprune.toml, docs/papers.md).
#   bash scripts/papers/otprune.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=otprune
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
