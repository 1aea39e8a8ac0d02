#!/usr/bin/env bash
# vscan: its tables beside the published numbers (eval/papers/vscan.toml, docs/papers.md).
#   bash scripts/papers/vscan.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=vscan
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
