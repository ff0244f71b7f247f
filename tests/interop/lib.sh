# Shared by the interop scripts (sourced): one PASS/FAIL line per check.
#   run_check NAME FUNCTION ARGS...  runs the function in a subshell with errexit, so any failing
#   command fails the check; its output ($work/check.out) is shown only on failure. Counts in
#   $passed and $failed; needs $work.
passed=0
failed=0
run_check() {
    local name=$1
    shift
    local out=$work/check.out start
    start=$(date +%s%N)
    set +e
    (set -e; "$@") >"$out" 2>&1
    local rc=$?
    set -e
    local ms=$((($(date +%s%N) - start) / 1000000))
    if [ "$rc" -eq 0 ]; then
        echo "PASS $name (${ms} ms)"
        passed=$((passed + 1))
    else
        echo "FAIL $name (exit $rc, ${ms} ms)"
        tail -n 40 "$out" | sed 's/^/    /'
        failed=$((failed + 1))
    fi
}
