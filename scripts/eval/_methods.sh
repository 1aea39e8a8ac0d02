# Sourced by the entry scripts before they change folder (scripts/eval/_launch.sh, scripts/papers/_paper.sh,
# scripts/slurm/submit_paper.sh): the .py files a user's VTPRUNE_METHODS names (docs/your-method.md) made absolute
# against the caller's folder, so a run started from the repository, or a Slurm job started anywhere, imports the
# same files; module names and absolute or ~ paths stay as they are.
if [[ -n "${VTPRUNE_METHODS:-}" ]]; then
    _VM=()
    IFS=',' read -ra _VM_ITEMS <<< "$VTPRUNE_METHODS"
    for _vm in ${_VM_ITEMS[@]+"${_VM_ITEMS[@]}"}; do
        _vm="${_vm#"${_vm%%[![:space:]]*}"}"; _vm="${_vm%"${_vm##*[![:space:]]}"}"   # trimmed
        [[ -z "$_vm" ]] && continue
        if [[ ( "$_vm" == *.py || "$_vm" == */* ) && "$_vm" != /* && "$_vm" != "~"* ]]; then _vm="$PWD/${_vm#./}"; fi
        _VM+=("$_vm")
    done
    VTPRUNE_METHODS="$(IFS=,; echo "${_VM[*]}")"
    export VTPRUNE_METHODS
    unset _VM _VM_ITEMS _vm
fi
