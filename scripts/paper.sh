#!/usr/bin/env bash
# A table of your own, or a paper's, by its spec: a .toml file anywhere (format: eval/papers/FORMAT.md; published
# numbers optional) or a paper's name (then the same as scripts/papers/<paper>.sh). docs/your-method.md.
#   bash scripts/paper.sh SPEC [TABLE] [--dry-run | --status]      (variables: scripts/papers/_paper.sh)
#   e.g. VTPRUNE_METHODS=./my_method.py MODEL=tiny:llava bash scripts/paper.sh ./my_table.toml
# The report: OUT/papers/<spec's name>.md / .tex and the accuracy-vs-budget figure beside them.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    [[ "${1:-}" == -h || "${1:-}" == --help ]] && { sed -n '2,/^[^#]/{/^#/p}' "${BASH_SOURCE[0]}"; exit 0; }
    echo "usage: bash scripts/paper.sh SPEC [TABLE] [--dry-run | --status]   (SPEC: ./my_table.toml or a paper's name)" >&2
    exit 2
fi
PAPER="$1"; shift
source "$(dirname "${BASH_SOURCE[0]}")/papers/_paper.sh" "$@"
