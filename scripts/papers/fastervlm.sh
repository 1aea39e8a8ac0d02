#!/usr/bin/env bash
# fastervlm: its tables beside the published numbers (eval/papers/fastervlm.toml, docs/papers.md).
#   bash scripts/papers/fastervlm.sh [TABLE] [--dry-run]      (variables: scripts/papers/_paper.sh)
PAPER=fastervlm
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"
