#!/usr/bin/env bash
# MQTT interop test: third-party MQTT clients against a real tributary gateway.
#   - mosquitto_pub / mosquitto_sub (Debian's mosquitto-clients), MQTT 3.1.1 and 5
#   - paho-mqtt (PyPI) in the venv KAFKA_PYTHON_VENV (.ci/run makes it)
#   - kcat, to read what MQTT clients published and to produce records MQTT clients receive
#   - kafkajs and kafkajs-lz4 (npm) under node, in KAFKAJS_DIR (.ci/run installs them there):
#     the Node.js Kafka client reading what MQTT clients published, from a gzip route's topic,
#     failing on an lz4 topic, and reading it with the kafkajs-lz4 codec registered
# Starts the gateway (TRIBUTARY_BIN) on free loopback ports with routes, prints one PASS/FAIL
# line per check and exits non-zero if any failed (after printing the gateway log's tail).
# The gateway runs with logins off and [auth.anonymous] rules (everything but two topics), so
# every check runs under anonymous rules and one checks their deny entries.
set -euo pipefail

bin=${TRIBUTARY_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/tributary-target}/debug/tributary}
venv=${KAFKA_PYTHON_VENV:-$HOME/.cache/tributary-kafka-python}
py=/usr/bin/python3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kafkajs_dir=${KAFKAJS_DIR:-$HOME/.cache/tributary-node}

# shellcheck source=tests/interop/lib.sh
. "$here/lib.sh"
require "mqtt interop" mosquitto_pub mosquitto_sub kcat timeout node "$bin" "$venv/bin/python"

interop_workdir mqtt-interop

mport=$(free_port)
kport=$(free_port)
kafka=127.0.0.1:$kport
gateway_start "$kafka" "127.0.0.1:$mport" info "$(cat <<'EOF'
[[mqtt.routes]]
filter = "meters/+/reading"
topic = "meter-readings"
key = "{1}"
[[mqtt.routes]]
filter = "js/#"
topic = "js-readings"
compression = "gzip"
[[mqtt.routes]]
filter = "lz4/#"
topic = "lz4-readings"
# Logins off, so every client is under these rules: everything except two topics.
[auth.anonymous]
mqtt.publish = ["#"]
mqtt.subscribe = ["#"]
mqtt.publish_deny = ["test/nopublish"]
mqtt.subscribe_deny = ["test/nosubscribe"]
EOF
)"
echo "gateway ready: mqtt 127.0.0.1:$mport, kafka $kafka"


# Waits until a background mosquitto_sub printed its SUBACK (-d debug output), so publishes
# that follow are not missed.
sub_ready() {
    for _ in $(seq 100); do
        grep -q "received SUBACK" "$1" && return 0
        sleep 0.05
    done
    echo "subscriber never got its SUBACK"; cat "$1"; return 1
}

qos_round_trip() {
    local v=$1 out=$work/sub-$1.out err=$work/sub-$1.err
    timeout 20 stdbuf -oL mosquitto_sub -p "$mport" -V "$v" -i "sub-$v" -t "meters/#" -q 2 -C 3 -F '%t %p %q' -d >"$out.d" 2>"$err" &
    local sub=$!
    sub_ready "$out.d"
    for q in 0 1 2; do
        mosquitto_pub -p "$mport" -V "$v" -i "pub-$v" -t "meters/$v-$q/reading" -m "value-$q" -q "$q"
    done
    wait "$sub"
    grep -v -E "^Client|received|sending|^Subscribed" "$out.d" >"$out"
    printf 'meters/%s-0/reading value-0 0\nmeters/%s-1/reading value-1 1\nmeters/%s-2/reading value-2 2\n' "$v" "$v" "$v" >"$work/want"
    diff "$work/want" "$out"
    # The log holds them with the meter id from the '+' level as key.
    kcat -b "$kafka" -C -t meter-readings -e -q -f '%k %s %h\n' | grep "^$v-2 value-2 mqtt.topic=meters/$v-2/reading,mqtt.qos=2"
}
run_check "mosquitto 3.1.1: QoS 0/1/2 publish, subscribe (QoS 2 both ways), routed key and headers" qos_round_trip mqttv311
run_check "mosquitto 5: QoS 0/1/2 publish, subscribe, routed key and headers" qos_round_trip mqttv5

user_properties() {
    timeout 20 stdbuf -oL mosquitto_sub -p "$mport" -V mqttv5 -t "props/#" -q 1 -C 1 -F '%t %p %P' -d >"$work/p.d" 2>&1 &
    local sub=$!
    sub_ready "$work/p.d"
    mosquitto_pub -p "$mport" -V mqttv5 -t props/a -m hello -q 1 -D publish user-property unit kWh -D publish content-type text/plain
    wait "$sub"
    grep -q "^props/a hello unit:kWh" "$work/p.d"
    kcat -b "$kafka" -C -t mqtt -e -q -f '%s %h\n' | grep -q "^hello .*content-type=text/plain.*unit=kWh"
}
run_check "mosquitto 5: user properties and content type kept as headers and delivered back" user_properties

retained() {
    mosquitto_pub -p "$mport" -t status/boiler -m on -q 1 -r
    timeout 10 mosquitto_sub -p "$mport" -t 'status/#' -C 1 -F '%t %p %r' >"$work/r.out"
    [ "$(cat "$work/r.out")" = "status/boiler on 1" ]
    mosquitto_pub -p "$mport" -t status/boiler -n -q 1 -r
    # The subscriber must connect and be subscribed (its SUBACK) and then get nothing within 1 s:
    # -W ends it with a non-zero status, which is expected; no CONNACK/SUBACK is a failure.
    set +e
    timeout 10 mosquitto_sub -p "$mport" -t 'status/#' -C 1 -W 1 -d >"$work/r2.out" 2>&1
    set -e
    grep -q "received CONNACK (0)" "$work/r2.out" || { echo "subscriber not connected:"; cat "$work/r2.out"; return 1; }
    grep -q "received SUBACK" "$work/r2.out" || { echo "subscriber not subscribed:"; cat "$work/r2.out"; return 1; }
    if grep -q "received PUBLISH" "$work/r2.out"; then
        echo "retained message not cleared:"; cat "$work/r2.out"; return 1
    fi
}
run_check "mosquitto: retained message delivered on subscribe (retain flag), cleared by an empty payload" retained

kafka_to_mqtt() {
    timeout 20 stdbuf -oL mosquitto_sub -p "$mport" -t 'cmd/#' -q 1 -C 1 -F '%t %p' -d >"$work/k.d" 2>&1 &
    local sub=$!
    sub_ready "$work/k.d"
    echo "reboot" | kcat -b "$kafka" -P -t mqtt -H mqtt.topic=cmd/meter-7
    wait "$sub"
    grep -q "^cmd/meter-7 reboot" "$work/k.d"
}
run_check "kcat produce with an mqtt.topic header reaches a mosquitto subscriber" kafka_to_mqtt

paho() {
    "$venv/bin/python" - "$mport" <<'PY'
import sys, threading
import paho.mqtt.client as mqtt
port = int(sys.argv[1])
got, done, subscribed = [], threading.Event(), threading.Event()
def on_message(c, u, m):
    got.append((m.topic, m.payload.decode(), m.qos))
    if len(got) == 5:
        done.set()
def on_subscribe(*a, **k):
    subscribed.set()
sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-sub", protocol=mqtt.MQTTv5)
sub.on_message, sub.on_subscribe = on_message, on_subscribe
sub.connect("127.0.0.1", port)
sub.loop_start()
sub.subscribe("paho/#", qos=1)
assert subscribed.wait(10), "no SUBACK"
pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-pub", protocol=mqtt.MQTTv311)
pub.connect("127.0.0.1", port)
pub.loop_start()
for i in range(5):
    pub.publish(f"paho/{i}", f"m{i}", qos=1).wait_for_publish(10)
assert done.wait(10), f"only {got}"
assert got == [(f"paho/{i}", f"m{i}", 1) for i in range(5)], got
print("paho ok", got)
PY
}
run_check "paho-mqtt: 3.1.1 publisher (QoS 1, acknowledged) to a 5 subscriber, in order" paho

# --- [auth.anonymous] deny entries (the paho test suite's test/nosubscribe) ----------------
anonymous_deny() {
    local v code
    for v in mqttv311 mqttv5; do
        # Refused within the deny entry: SUBACK 128 (3.1.1) / 135 not authorized (5).
        code=128
        [ "$v" = mqttv5 ] && code=135
        set +e
        timeout 10 mosquitto_sub -p "$mport" -V "$v" -t test/nosubscribe -C 1 -W 2 -d >"$work/deny-$v.out" 2>&1
        set -e
        grep -q "Subscribed (mid: [0-9]*): $code" "$work/deny-$v.out" || { cat "$work/deny-$v.out"; return 1; }
    done
    # A subscription that only overlaps it is granted, and gets the next allowed message, not
    # the denied one published before it.
    timeout 20 stdbuf -oL mosquitto_sub -p "$mport" -V mqttv5 -t 'test/+' -q 1 -C 1 -F '%t %p' -d >"$work/deny.d" 2>&1 &
    local sub=$!
    sub_ready "$work/deny.d"
    mosquitto_pub -p "$mport" -V mqttv5 -t test/nosubscribe -m denied -q 1
    mosquitto_pub -p "$mport" -V mqttv5 -t test/ok -m allowed -q 1
    wait "$sub"
    grep -q "^test/ok allowed" "$work/deny.d" || { cat "$work/deny.d"; return 1; }
    if grep -q "nosubscribe" "$work/deny.d"; then cat "$work/deny.d"; return 1; fi
    # publish_deny: PUBACK 135 on an accepted connection.
    set +e
    mosquitto_pub -p "$mport" -V mqttv5 -t test/nopublish -m no -q 1 -d >"$work/deny-pub.out" 2>&1
    set -e
    grep -q "received PUBACK (Mid: [0-9]*, RC:135)" "$work/deny-pub.out" || { cat "$work/deny-pub.out"; return 1; }
}
run_check "mosquitto 3.1.1/5, [auth.anonymous] with deny entries: test/nosubscribe refused (SUBACK 128/135), test/+ never gets it, test/nopublish PUBACK 135" \
    anonymous_deny

# --- kafkajs: reads only uncompressed and gzip batches without a codec plugin -----------------
kafkajs() { NODE_PATH="$kafkajs_dir/node_modules" timeout 60 node "$here/kafkajs_client.js" "$@"; }
kafkajs_version=$(kafkajs version 2>/dev/null || echo missing)
kafkajs_gzip_route() {
    [ "$kafkajs_version" != missing ] || { echo "no kafkajs in $kafkajs_dir (KAFKAJS_DIR; see .ci/run)"; return 1; }
    : >"$work/js.want"
    for m in 1 2; do
        seq 1 10 | sed "s/^/reading $m-/" | mosquitto_pub -p "$mport" -V mqttv5 -i js-pub -t "js/meter-$m" -q 1 -l
        seq 1 10 | awk -v m="$m" '{ printf "0 %d js-pub=reading %d-%d [js/meter-%d]\n", (m - 1) * 10 + NR - 1, m, $1, m }' >>"$work/js.want"
    done
    kafkajs consume "$kafka" js-readings 20 >"$work/js.got"
    diff "$work/js.want" "$work/js.got"
}
run_check "kafkajs $kafkajs_version: reads MQTT publishes (mosquitto 5, QoS 1) from a route with compression = \"gzip\": keys, values, mqtt.topic" \
    kafkajs_gzip_route
kafkajs_lz4_default() {
    [ "$kafkajs_version" != missing ] || { echo "no kafkajs in $kafkajs_dir"; return 1; }
    mosquitto_pub -p "$mport" -V mqttv5 -i lz4-pub -t lz4/x -m lz4-batch -q 1
    kafkajs fails "$kafka" lz4-readings >"$work/lz4.out" || { cat "$work/lz4.out"; return 1; }
    cat "$work/lz4.out"
    # The error README's Kafka section tells kafkajs users about, word for word.
    local message
    message=$(sed 's/^[A-Za-z]*: //' "$work/lz4.out")
    [ "$message" = "LZ4 compression not implemented" ]
    grep -qF "$message" "$here/../../README.md" || { echo "README.md does not quote: $message"; return 1; }
}
run_check "kafkajs $kafkajs_version: an lz4 topic (the default codec) stops the consumer with the error README quotes" \
    kafkajs_lz4_default
kafkajs_lz4_codec() {
    echo "0 0 lz4-pub=lz4-batch [lz4/x]" >"$work/lz4.want"
    KAFKAJS_LZ4=1 kafkajs consume "$kafka" lz4-readings 1 >"$work/lz4.got"
    diff "$work/lz4.want" "$work/lz4.got"
}
run_check "kafkajs $kafkajs_version with kafkajs-lz4 registered (README's fix): reads the lz4 topic" kafkajs_lz4_codec

# --- security: a second gateway with [auth] on and an MQTT TLS listener -----------------------
# User "meter" may publish under meters/<its client id>/ and subscribe to commands/<its name>/.
"$bin" cert ca --dir "$work/pki/ca" --name "interop CA" >/dev/null
"$bin" cert cloud --ca-dir "$work/pki/ca" --name localhost --out "$work/pki/server" >/dev/null
sport=$(free_port)
stls=$(free_port)
cat >"$work/secure.toml" <<EOF
[storage]
data_dir = "$work/secure-data"
max_bytes = 268435456
disk_free_bytes_min = 0
[kafka]
enabled = false
[metrics]
listen = "127.0.0.1:0"
[mqtt]
listen = "127.0.0.1:$sport"
websocket_listen = "127.0.0.1:0"
[mqtt.tls]
enabled = true
listen = "127.0.0.1:$stls"
cert_file = "$work/pki/server/cloud.pem"
key_file = "$work/pki/server/cloud.key"
[auth]
enabled = true
failure_delay_ms = 200
$(echo meter-secret | "$bin" passwd meter)
mqtt.client_ids = ["m7"]
mqtt.publish = ["meters/%c/#"]
mqtt.subscribe = ["commands/%u/#"]
EOF
"$bin" serve --config "$work/secure.toml" 2>"$work/secure.log" &
secure_pid=$!
for _ in $(seq 100); do
    grep -q "tributary gateway ready" "$work/secure.log" && break
    sleep 0.1
done
grep -q "tributary gateway ready" "$work/secure.log" || { echo "FAIL secured gateway did not start"; cat "$work/secure.log"; exit 1; }

secure_pub() { # VERSION PORT extra-args...: the right password, the wrong one, none
    local v=$1 p=$2
    shift 2
    mosquitto_pub -p "$p" -V "$v" -i m7 -u meter -P meter-secret -t meters/m7/reading -m ok -q 1 "$@"
    if mosquitto_pub -p "$p" -V "$v" -i m7 -u meter -P wrong -t meters/m7/reading -m no -q 1 "$@" 2>"$work/bad.err"; then
        echo "published with a wrong password"; return 1
    fi
    grep -qi "not authori[sz]ed\|bad user name or password" "$work/bad.err" || { cat "$work/bad.err"; return 1; }
    if mosquitto_pub -p "$p" -V "$v" -i m7 -t meters/m7/reading -m no -q 1 "$@" 2>"$work/none.err"; then
        echo "published without credentials"; return 1
    fi
}
run_check "mosquitto 3.1.1 -u/-P: right password publishes, wrong or none refused" secure_pub mqttv311 "$sport"
run_check "mosquitto 5 -u/-P: right password publishes, wrong or none refused" secure_pub mqttv5 "$sport"
run_check "mosquitto 5 over TLS (--cafile): right password publishes, wrong or none refused" \
    secure_pub mqttv5 "$stls" --cafile "$work/pki/server/ca.pem"
secure_acl() {
    # MQTT 5: a publish outside the user's filters gets PUBACK "not authorized" (reason 135) on a
    # connection that was accepted (CONNACK 0), not a refused CONNACK.
    set +e
    mosquitto_pub -p "$sport" -V mqttv5 -i m7 -u meter -P meter-secret -t meters/other/reading -m no -q 1 -d \
        >"$work/acl.out" 2>&1
    set -e
    grep -q "received CONNACK (0)" "$work/acl.out" || { cat "$work/acl.out"; return 1; }
    grep -q "received PUBACK (Mid: [0-9]*, RC:135)" "$work/acl.out" || { cat "$work/acl.out"; return 1; }
    # A subscription outside them gets a SUBACK failure (128) on an accepted connection.
    set +e
    timeout 10 mosquitto_sub -p "$sport" -V mqttv311 -i m7 -u meter -P meter-secret -t 'commands/#' -C 1 -W 3 -d \
        >"$work/acl-sub.out" 2>&1
    set -e
    grep -q "received CONNACK (0)" "$work/acl-sub.out" || { cat "$work/acl-sub.out"; return 1; }
    grep -q "received SUBACK" "$work/acl-sub.out" || { cat "$work/acl-sub.out"; return 1; }
    grep -q "Subscribed (mid: [0-9]*): 128" "$work/acl-sub.out" || { cat "$work/acl-sub.out"; return 1; }
}
run_check "ACL: publish outside meters/%c/# gets PUBACK 0x87, subscribe outside commands/%u/# gets SUBACK 0x80" secure_acl
client_id_owner() {
    # The user owns client id m7 only (mqtt.client_ids): any other id is refused at CONNECT.
    for v in mqttv311 mqttv5; do
        if mosquitto_pub -p "$sport" -V "$v" -i someone-else -u meter -P meter-secret -t meters/someone-else/x \
            -m no -q 1 2>"$work/cid.err"; then
            echo "$v: published with a client id the user does not own"; return 1
        fi
        grep -qi "identifier rejected\|client identifier not valid" "$work/cid.err" || { cat "$work/cid.err"; return 1; }
    done
}
run_check "client ids belong to users: another client id is refused (CONNACK 2 / 0x85)" client_id_owner
kill -TERM "$secure_pid" 2>/dev/null || true
wait "$secure_pid" 2>/dev/null || true


echo "mqtt-interop: $passed passed, $failed failed"
if [ "$failed" -gt 0 ]; then
    echo "--- gateway log (tail) ---"
    tail -40 "$log"
    exit 1
fi
