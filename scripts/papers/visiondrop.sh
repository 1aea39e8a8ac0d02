#!/usr/bin/env bash
# visiondrop: its tables beside the published numbers (eval/papers/visiondrop.toml, docs/papers.md).
#   bash scripts/papers/visiondrop.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=visiondrop
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
