#!/usr/bin/env bash
# visionzip: its tables beside the published numbers (eval/papers/visionzip.toml, docs/papers.md).
#   bash scripts/papers/visionzip.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=visionzip
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
