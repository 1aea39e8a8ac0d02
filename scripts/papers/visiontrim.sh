#!/usr/bin/env bash
# visiontrim: its tables beside the published numbers (eval/papers/visiontrim.toml, docs/papers.md).
#   bash scripts/papers/visiontrim.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=visiontrim
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
