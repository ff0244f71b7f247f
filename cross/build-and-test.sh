#!/usr/bin/env bash
# ARM builds and tests under qemu-user: for aarch64 and armv7 (or the targets given as
# arguments), builds the release gateway binary, runs the broker's unit tests under qemu, and an
# end-to-end smoke test of the cross-built gateway under qemu: MQTT publish (mosquitto_pub), Kafka
# consume (kcat), SIGTERM, restart, consume again (data still there), publish and consume more.
# Prints the stripped binary sizes and the time of each step. Needs root for apt (cross/env.sh).
#
#   cross/build-and-test.sh [aarch64-unknown-linux-gnu] [armv7-unknown-linux-gnueabihf]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tributary-target}"
export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

need_apt=()
command -v kcat >/dev/null 2>&1 || need_apt+=(kcat)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
if [ "${#need_apt[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

summary=()
work=$(mktemp -d)
gateway_pid=""
cleanup() {
    [ -n "$gateway_pid" ] && kill -KILL "$gateway_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "cross: FAIL: $*" >&2
    [ -f "$work/gateway.log" ] && tail -30 "$work/gateway.log" >&2
    exit 1
}

# Waits (bounded) until the gateway's log has a line matching $1; prints that line.
wait_log() {
    local line
    line=$(timeout 120 grep -m1 -E "$1" <(tail -n +1 -F --pid="$gateway_pid" "$work/gateway.log" 2>/dev/null)) \
        || fail "gateway did not log /$1/ within 120 s"
    echo "$line"
}

# Starts the cross-built gateway under qemu on free ports (port 0, read back from its log).
start_gateway() {
    : > "$work/gateway.log"
    # shellcheck disable=SC2086 # CROSS_QEMU is a command with arguments
    (cd "$work" && exec $CROSS_QEMU "$bin" serve --config "$work/gateway.toml") 2>> "$work/gateway.log" &
    gateway_pid=$!
    wait_log "tributary gateway ready" >/dev/null
    kafka=$(wait_log "kafka listener bound" | sed -E 's/.*listen=([0-9.]+:[0-9]+).*/\1/')
    mqtt=$(wait_log "mqtt listener bound" | sed -E 's/.*listen=([0-9.]+:[0-9]+).*/\1/')
    [[ "$kafka" =~ ^[0-9.]+:[0-9]+$ && "$mqtt" =~ ^[0-9.]+:[0-9]+$ ]] || fail "listener addresses not in the log"
}

stop_gateway() {
    kill -TERM "$gateway_pid"
    wait "$gateway_pid" || fail "gateway exit status $? after SIGTERM"
    gateway_pid=""
    grep -q "shutdown complete" "$work/gateway.log" || fail "no clean shutdown"
}

publish() { # first last
    for i in $(seq "$1" "$2"); do
        mosquitto_pub -h "${mqtt%:*}" -p "${mqtt##*:}" -q 1 -i "smoke-pub" -t "smoke/dev1/reading" -m "reading-$i" \
            || fail "mosquitto_pub reading-$i"
    done
}

consume() {
    timeout 60 kcat -b "$kafka" -C -t smoke-readings -o beginning -e -q -f '%k %s\n' || fail "kcat consume"
}

expected() { # last
    for i in $(seq 1 "$1"); do echo "dev1 reading-$i"; done
}

smoke_test() {
    rm -rf "$work/data"
    cat > "$work/gateway.toml" <<'TOML'
[storage]
data_dir = "data"
disk_free_bytes_min = 0
[kafka]
listen = "127.0.0.1:0"
[mqtt]
listen = "127.0.0.1:0"
websocket_listen = "127.0.0.1:0"
[[mqtt.routes]]
filter = "smoke/+/reading"
topic = "smoke-readings"
key = "{1}"
TOML
    start_gateway
    publish 1 20
    [ "$(consume)" = "$(expected 20)" ] || fail "consumed before restart: $(consume | head -3)"
    stop_gateway
    start_gateway
    grep -q "repaired=false" "$work/gateway.log" || fail "the store needed a repair after a clean stop"
    [ "$(consume)" = "$(expected 20)" ] || fail "after restart the data is not all there: $(consume | wc -l) records"
    publish 21 30
    [ "$(consume)" = "$(expected 30)" ] || fail "consumed after restart and more publishes"
    stop_gateway
}

for target in "${targets[@]}"; do
    echo "=== $target"
    # (No subshell with `|| fail` around these: bash ignores `set -e` inside such a compound.)
    # shellcheck source=cross/env.sh
    source cross/env.sh "$target"
    t0=$(date +%s)
    cargo build --release --locked -p tributary-gateway --bin tributary --target "$target" \
        || fail "$target: release build"
    t1=$(date +%s)
    cargo test --locked -p tributary-log -p tributary-broker --target "$target" || fail "$target: store and broker tests under qemu"
    t2=$(date +%s)
    bin="$CARGO_TARGET_DIR/$target/release/tributary"
    if ! file -b "$bin" | grep -q "stripped" || file -b "$bin" | grep -q "not stripped"; then
        fail "$bin is not stripped"
    fi
    smoke_test
    t3=$(date +%s)
    size=$(stat -c %s "$bin")
    summary+=("$target: release build $((t1 - t0)) s, broker tests under qemu (build + run) $((t2 - t1)) s, smoke test under qemu $((t3 - t2)) s; stripped binary $size bytes ($(file -b "$bin" | cut -d, -f1-2))")
    echo "$target: smoke test passed (MQTT publish, Kafka consume, restart, data still there)"
done

echo "=== summary"
printf '%s\n' "${summary[@]}"
