# scripts/check_steps.sh: what gpu_check.sh and metal_check.sh share (sourced, not run).
# Set OUT (the results folder) first. step NAME CMD... runs CMD, tees its output to $OUT/NAME.txt
# with a header and the exit status, and counts a failure in $failed (later steps still run).
# installed_package prints the installed logquant_gguf's folder: the checks run that, not the
# checkout's copy (which has no GPU build), and its build info goes to $OUT/build-info.json.
failed=0
step() {
    local name=$1; shift
    echo "== $name: $*" | tee "$OUT/$name.txt"
    local t0=$(date +%s)
    "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/$name.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    return 0
}
installed_package() {
    (cd /tmp && python3 -c 'import logquant_gguf._capi as c, json; print(json.dumps(c.build_info(), indent=1))') \
        > "$OUT/build-info.json" 2>&1
    cat "$OUT/build-info.json" >&2
    (cd /tmp && python3 -c 'import logquant_gguf, os; print(os.path.dirname(logquant_gguf.__file__))')
}
