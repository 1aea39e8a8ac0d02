# Shared by scripts/lmms_eval_env.sh, vllm_env.sh and official_env.sh (sourced, not run): create or reuse a
# virtual environment, and keep one inside the checkout out of git status (a local exclude, not .gitignore).
#   make_venv VENV PYTHON   (the caller defines say() and sets REPO to the repository root)
make_venv() {
    local venv=$1 py=$2 rel ex
    if [ ! -x "$venv/bin/python" ]; then
        say "creating the environment $venv with $($py --version 2>&1)"
        "$py" -m venv "$venv"
    else
        say "reusing the environment $venv"
    fi
    case "$venv" in
        "$REPO"/*)
            rel="/${venv#"$REPO"/}/"
            ex="$(git rev-parse --git-path info/exclude 2>/dev/null || true)"
            if [ -n "$ex" ] && ! grep -qxF "$rel" "$ex" 2>/dev/null; then
                mkdir -p "$(dirname "$ex")" && echo "$rel" >>"$ex" && say "added $rel to $ex"
            fi ;;
    esac
}
