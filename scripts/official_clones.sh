#!/usr/bin/env bash
# Clone the official repositories that `python -m parity` runs beside ours (docs/parity.md), each at the commit its
# adapter was written and run against (parity/adapters/<name>.py: REPOSITORY, COMMIT), into .official/<name>/.
# `python -m parity llava15 --method <name>` then finds the clone there without --official-path.
#
#   bash scripts/official_clones.sh                 # every adapter that needs a clone
#   bash scripts/official_clones.sh pdrop visionzip # some
#
# Environment variables:
#   VTPRUNE_CLONES      where the clones go (default: .official in the repository; kept out of git status)
#   VTPRUNE_CLONE_URL   the address of a repository, {owner} and {name} filled in
#                       (default: https://github.com/{owner}/{name}.git; a local mirror works too)
# Idempotent: an existing clone is moved to its commit (fetched first when the commit is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEST=${VTPRUNE_CLONES:-$REPO/.official}
DEFAULT_URL='https://github.com/{owner}/{name}.git'
URL=${VTPRUNE_CLONE_URL:-$DEFAULT_URL}
PY=${PYTHON:-python3}
say() { printf '[official_clones] %s\n' "$*"; }

# name repository commit, one line per adapter that needs a clone (INSTALLED = False), or the ones asked for
listing=$("$PY" - "$@" <<'PYEOF'
import ast, sys
from pathlib import Path

folder = Path("parity/adapters")
names = sys.argv[1:] or sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
for name in names:
    path = folder / f"{name}.py"
    if not path.is_file():
        sys.exit(f"[official_clones] no adapter {name!r} in parity/adapters/")
    consts = {t.id: ast.literal_eval(node.value) for node in ast.parse(path.read_text()).body
              if isinstance(node, ast.Assign) for t in node.targets
              if isinstance(t, ast.Name) and t.id in ("REPOSITORY", "COMMIT", "INSTALLED")}
    if consts.get("INSTALLED") and len(sys.argv) == 1:
        continue  # its code is in .venv-official already (scripts/official_env.sh)
    print(name, consts["REPOSITORY"], consts["COMMIT"])
PYEOF
)
rows=()
[ -n "$listing" ] && mapfile -t rows <<<"$listing"
mkdir -p "$DEST"
case "$DEST" in
    "$REPO"/*)
        rel="/${DEST#"$REPO"/}/"
        ex="$(git rev-parse --git-path info/exclude 2>/dev/null || true)"
        if [ -n "$ex" ] && ! grep -qxF "$rel" "$ex" 2>/dev/null; then
            mkdir -p "$(dirname "$ex")" && echo "$rel" >>"$ex"
        fi ;;
esac
for row in "${rows[@]}"; do
    read -r name repo commit <<<"$row"
    owner=${repo%%/*}; rname=${repo#*/}
    url=${URL//'{owner}'/$owner}; url=${url//'{name}'/$rname}
    dir="$DEST/$name"
    if [ ! -d "$dir/.git" ]; then
        say "$name: cloning $url"
        git clone -q --no-checkout "$url" "$dir"
    fi
    if ! git -C "$dir" cat-file -e "$commit^{commit}" 2>/dev/null; then
        git -C "$dir" fetch -q origin
    fi
    if ! git -C "$dir" -c advice.detachedHead=false checkout -q --detach "$commit" 2>/dev/null; then
        # a mirror or a partial clone may lack some large blobs (figures): HEAD and the index on the commit, then
        # every file whose content is there; the adapter's own folders must all be present
        git -C "$dir" -c advice.detachedHead=false reset -q "$commit"
        git -C "$dir" ls-tree -r "$commit" | awk '$2 == "blob" {print $3 "\t" $4}' >"$dir/.git/vtprune-files"
        : >"$dir/.git/vtprune-present"; missing=0
        while IFS=$'\t' read -r sha path; do
            if git -C "$dir" cat-file -e "$sha" 2>/dev/null; then echo "$path" >>"$dir/.git/vtprune-present"
            else missing=$((missing + 1)); say "$name: warning: $path is not in the source (left out)"; fi
        done <"$dir/.git/vtprune-files"
        git -C "$dir" checkout -q --pathspec-from-file="$dir/.git/vtprune-present" -- 2>/dev/null || \
            git -C "$dir" checkout -q --pathspec-from-file="$dir/.git/vtprune-present"
        say "$name: $missing file(s) absent from the source, the rest checked out"
    fi
    say "$name: $repo at ${commit:0:12} in $dir"
done
say "done: python -m parity llava15 --method <name> (docs/parity.md)"
