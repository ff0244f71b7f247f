# Shared by the interop scripts (sourced right after `set -euo pipefail`, `here=` and `bin=`):
#   require NAME TOOL...     exits 2 unless every TOOL is on PATH (or is an executable path)
#   interop_workdir NAME     makes $work and a trap that stops the gateway and removes $work
#   free_port                prints a free loopback TCP port
#   gateway_start KAFKA MQTT LEVEL [TOML]
#                            writes $work/gateway.toml (a temporary data directory, a 512 MiB
#                            store, the listeners on the given addresses, log LEVEL, the extra
#                            TOML appended), starts $bin on it (pid in $gw_pid, log in $log) and
#                            exits 1 with the log unless it is ready within 10 s
#   run_check NAME FUNCTION ARGS...
#                            runs the function in a subshell with errexit, so any failing
#                            command fails the check; one PASS/FAIL line; its output
#                            ($work/check.out) is shown only on failure; counts in $passed and
#                            $failed

require() {
    local what=$1
    shift
    for need in "$@"; do
        if ! command -v "$need" >/dev/null 2>&1; then
            echo "$what: $need not found (see .ci/run for what to install)" >&2
            exit 2
        fi
    done
}

gw_pid=
interop_workdir() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/tributary-$1.XXXXXX")
    trap interop_cleanup EXIT
}
interop_cleanup() {
    if [ -n "$gw_pid" ] && kill -0 "$gw_pid" 2>/dev/null; then
        kill -TERM "$gw_pid" 2>/dev/null || true
        wait "$gw_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}

free_port() {
    /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

gateway_start() {
    log=$work/gateway.log
    cat >"$work/gateway.toml" <<EOF
[storage]
data_dir = "$work/data"
max_bytes = 536870912
disk_free_bytes_min = 0
[kafka]
listen = "$1"
[mqtt]
listen = "$2"
websocket_listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[log]
level = "$3"
${4:-}
EOF
    "$bin" serve --config "$work/gateway.toml" 2>"$log" &
    gw_pid=$!
    for _ in $(seq 100); do
        grep -q "tributary gateway ready" "$log" && return 0
        kill -0 "$gw_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "FAIL gateway did not become ready; its log:"
    cat "$log"
    exit 1
}

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
