#!/usr/bin/env bash
# dart: its tables beside the published numbers (eval/papers/dart.toml, docs/papers.md).
#   bash scripts/papers/dart.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=dart
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
