#!/usr/bin/env bash
# Apache Kafka's own tools and client libraries against a Tributary gateway:
#   - the CLI tools (kafka-topics, kafka-configs, kafka-consumer-groups, kafka-console-producer/
#     -consumer, kafka-producer-perf-test, kafka-consumer-perf-test, kafka-delete-records), run as their classes from
#     the jars of tests/kafka/fetch-jars.sh (fetched when missing; TRIBUTARY_KAFKA_JARS overrides)
#   - the Java client (tests/interop/java/TributaryClients.java, compiled here with javac)
#   - Go: franz-go (kgo, kadm) and sarama (tests/interop/go, built here; GOMODCACHE and GOCACHE
#     default to ~/.cache/tributary-go, outside the clone)
# Starts the gateway (TRIBUTARY_BIN) on a free loopback port with a temporary data directory,
# prints one PASS/FAIL line per check, and exits non-zero if any check failed. README's interop
# table lists what these checks prove and what is unsupported.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${TRIBUTARY_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/tributary-target}/debug/tributary}
# shellcheck source=tests/interop/lib.sh
. "$here/lib.sh"
require "kafka tools interop" java javac go timeout python3 "$bin"
jars=${TRIBUTARY_KAFKA_JARS:-$(bash "$here/../kafka/fetch-jars.sh" | tail -n 1)}
export GOMODCACHE=${GOMODCACHE:-$HOME/.cache/tributary-go/mod}
export GOCACHE=${GOCACHE:-$HOME/.cache/tributary-go/build}
export GOFLAGS=-mod=readonly

interop_workdir kafka-tools

# --- gateway -------------------------------------------------------------------------------
port=$(free_port)
broker=127.0.0.1:$port
gateway_start "$broker" 127.0.0.1:0 info
echo "gateway ready on $broker ($bin); Kafka jars: $jars"

# kjava CLASS ARGS...: a Kafka tool or the Java client program, small heap, fast-starting JIT.
kjava() {
    timeout 180 java -Xmx192m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
        -Dlog4j2.configurationFile="$jars/log4j2.properties" -cp "$jars/*:$work/java" "$@"
}
topics() { kjava org.apache.kafka.tools.TopicCommand --bootstrap-server "$broker" "$@"; }
configs() { kjava kafka.admin.ConfigCommand --bootstrap-server "$broker" "$@"; }
groups() { kjava org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server "$broker" "$@"; }
# expect PATTERN FILE: a line of FILE matches the extended regex (the file is shown if not).
expect() { grep -Eq "$1" "$2" || { echo "no line matches /$1/ in:"; cat "$2"; return 1; }; }
expect_not() { ! grep -Eq "$1" "$2" || { echo "a line matches /$1/ in:"; cat "$2"; return 1; }; }

kafka_version=$(basename "$(ls "$jars"/kafka-clients-*.jar)" .jar)
kafka_version=${kafka_version#kafka-clients-}

# --- 1. kafka-topics -------------------------------------------------------------------------
check_topics() {
    topics --create --topic tools-t --partitions 3 --config retention.ms=3600000 >"$work/o"
    expect '^Created topic tools-t' "$work/o"
    topics --list --exclude-internal >"$work/o"
    expect '^tools-t$' "$work/o"
    topics --describe --topic tools-t >"$work/o"
    expect 'PartitionCount: 3.*retention.ms=3600000' "$work/o"
    [ "$(grep -c 'Leader: 1' "$work/o")" -eq 3 ]
    # A second create of the same name: Kafka's error, exit status non-zero.
    if topics --create --topic tools-t --partitions 1 >"$work/o" 2>&1; then echo "duplicate create succeeded"; return 1; fi
    expect 'TopicExistsException' "$work/o"
    topics --alter --topic tools-t --partitions 4
    topics --describe --topic tools-t >"$work/o"
    expect 'PartitionCount: 4' "$work/o"
    topics --create --topic tools-doomed --partitions 1 >/dev/null
    topics --delete --topic tools-doomed
    topics --list >"$work/o"
    expect_not '^tools-doomed$' "$work/o"
}
run_check "kafka-topics $kafka_version: --create --config, --list, --describe, duplicate refused, --alter --partitions, --delete" check_topics

# --- 2. kafka-configs ------------------------------------------------------------------------
check_configs() {
    configs --describe --entity-type topics --entity-name tools-t >"$work/o"
    expect 'retention.ms=3600000' "$work/o"
    # --all: every config with its synonyms, the topic's own value then the log.* default.
    configs --describe --all --entity-type topics --entity-name tools-t >"$work/o"
    expect 'retention.ms=3600000 sensitive=false synonyms=\{DYNAMIC_TOPIC_CONFIG:retention.ms=3600000, DEFAULT_CONFIG:log.retention.ms=604800000\}' "$work/o"
    expect 'cleanup.policy=delete sensitive=false synonyms=\{DEFAULT_CONFIG:log.cleanup.policy=delete\}' "$work/o"
    configs --describe --all --entity-type brokers --entity-name 1 >"$work/o"
    expect 'group.initial.rebalance.delay.ms=3000 ' "$work/o"
    configs --alter --entity-type topics --entity-name tools-t --add-config retention.ms=7200000 >"$work/o"
    expect 'Completed updating config' "$work/o"
    configs --describe --entity-type topics --entity-name tools-t >"$work/o"
    expect 'retention.ms=7200000' "$work/o"
    configs --alter --entity-type topics --entity-name tools-t --delete-config retention.ms >/dev/null
    configs --describe --entity-type topics --entity-name tools-t >"$work/o"
    expect_not 'retention.ms=' "$work/o"
    # A config set to its default value is the topic's own (listed) until deleted, as in Kafka.
    configs --alter --entity-type topics --entity-name tools-t --add-config cleanup.policy=delete >/dev/null
    configs --describe --entity-type topics --entity-name tools-t >"$work/o"
    expect 'cleanup.policy=delete' "$work/o"
    configs --alter --entity-type topics --entity-name tools-t --delete-config cleanup.policy >/dev/null
    configs --describe --entity-type topics --entity-name tools-t >"$work/o"
    expect_not 'cleanup.policy=' "$work/o"
    configs --describe --entity-type brokers --entity-name 1 >"$work/o"
    expect 'configs for broker 1' "$work/o"
}
run_check "kafka-configs $kafka_version: topic describe (--all: synonyms), --add-config (also of a default value), --delete-config; broker describe" check_configs

# --- 3. console producer and consumer ---------------------------------------------------------
check_console() {
    seq 1 300 | awk '{ printf "key-%d:value %d\n", $1 % 23, $1 }' >"$work/console.in"
    kjava org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$broker" --topic tools-t \
        --property parse.key=true --property key.separator=: \
        --producer-property acks=all --producer-property compression.type=zstd <"$work/console.in"
    kjava org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$broker" --topic tools-t \
        --group tools-console --from-beginning --max-messages 300 --timeout-ms 60000 \
        --property print.key=true --property key.separator=: >"$work/console.out"
    sort "$work/console.in" >"$work/want"
    sort "$work/console.out" >"$work/got"
    cmp -s "$work/want" "$work/got" || { diff "$work/want" "$work/got" | head; return 1; }
}
run_check "kafka-console-producer (keys, zstd, acks=all) -> kafka-console-consumer (group): 300 records" check_console

# --- 4. kafka-consumer-groups ------------------------------------------------------------------
check_groups() {
    groups --list >"$work/o"
    expect '^tools-console$' "$work/o"
    groups --describe --group tools-console >"$work/o"
    # Every partition's committed offset is its end: lag 0 everywhere, 300 in all.
    awk '$1 == "tools-console" && $2 == "tools-t" { n++; cur += $4; if ($4 != $5 || $6 != 0) bad = 1 }
         END { exit !(n == 4 && cur == 300 && !bad) }' "$work/o" || { cat "$work/o"; return 1; }
    groups --describe --group tools-console --state >"$work/o"
    expect 'tools-console +127.0.0.1:[0-9]+ +\(1\) .*Empty +0' "$work/o"
    groups --group tools-console --topic tools-t:0 --reset-offsets --to-offset 1 --dry-run >"$work/o"
    groups --describe --group tools-console >"$work/before"
    expect_not 'tools-t +0 +1 ' "$work/before"
    groups --group tools-console --topic tools-t:0 --reset-offsets --to-offset 1 --execute >/dev/null
    groups --describe --group tools-console >"$work/o"
    expect 'tools-t +0 +1 ' "$work/o"
    groups --group tools-console --all-topics --reset-offsets --to-earliest --execute >/dev/null
    groups --describe --group tools-console >"$work/o"
    awk '$1 == "tools-console" && $4 != 0 { bad = 1 } END { exit bad }' "$work/o" || { cat "$work/o"; return 1; }
    groups --group tools-console --topic tools-t --reset-offsets --shift-by 2 --execute >/dev/null
    groups --describe --group tools-console >"$work/o"
    expect 'tools-t +0 +2 ' "$work/o"
    groups --group tools-console --delete-offsets --topic tools-t >"$work/o"
    expect 'tools-t +0 +Successful' "$work/o"
    groups --group tools-console --delete >"$work/o"
    expect 'was successful' "$work/o"
    groups --list >"$work/o"
    expect_not '^tools-console$' "$work/o"
}
run_check "kafka-consumer-groups $kafka_version: --list, --describe (--state), --reset-offsets (dry run, to-offset, to-earliest, shift-by), --delete-offsets, --delete" check_groups

# --- 5. perf tools ---------------------------------------------------------------------------
check_perf() {
    topics --create --topic tools-perf --partitions 2 >/dev/null
    kjava org.apache.kafka.tools.ProducerPerformance --topic tools-perf --num-records 50000 --record-size 100 \
        --throughput -1 --producer-props bootstrap.servers="$broker" acks=all >"$work/o"
    tail -n 1 "$work/o"
    expect '^50000 records sent' "$work/o"
    kjava org.apache.kafka.tools.ConsumerPerformance --bootstrap-server "$broker" --topic tools-perf \
        --messages 50000 --group tools-perf --timeout 60000 >"$work/o"
    tail -n 1 "$work/o"
    # data.consumed.in.nMsg (5th column) is all of them.
    awk -F', *' 'NR == 2 { exit !($5 == 50000) }' "$work/o" || { cat "$work/o"; return 1; }
}
run_check "kafka-producer-perf-test (50000 x 100 B, acks=all) and kafka-consumer-perf-test read them all" check_perf

# --- 5b. kafka-delete-records ------------------------------------------------------------------
check_delete_records() {
    printf '%s\n' '{"version":1,"partitions":[{"topic":"tools-perf","partition":0,"offset":100},' \
        '{"topic":"tools-perf","partition":1,"offset":-1}]}' >"$work/delete.json"
    kjava org.apache.kafka.tools.DeleteRecordsCommand --bootstrap-server "$broker" \
        --offset-json-file "$work/delete.json" >"$work/o"
    expect 'partition: tools-perf-0.*low_watermark: 100$' "$work/o"
    expect 'partition: tools-perf-1.*low_watermark: [1-9][0-9]*$' "$work/o"
    kjava org.apache.kafka.tools.GetOffsetShell --bootstrap-server "$broker" --topic tools-perf --time -2 >"$work/o"
    expect '^tools-perf:0:100$' "$work/o"
    expect_not '^tools-perf:1:0$' "$work/o"
}
run_check "kafka-delete-records $kafka_version: log start to an offset and to the end (-1); GetOffsetShell --time -2 sees it" \
    check_delete_records

# --- 6. the Java client ------------------------------------------------------------------------
mkdir -p "$work/java"
javac -Werror -Xlint:deprecation -d "$work/java" -cp "$jars/*" "$here/java/TributaryClients.java"
java_client() { kjava TributaryClients "$broker" "$@"; }
for codec in none gzip snappy lz4 zstd; do
    run_check "Java client $kafka_version: idempotent producer, $codec, 500 keyed records with headers: murmur2 partitions, once, in order" \
        java_client produce "$codec"
done
run_check "Java client $kafka_version: consumer group, RangeAssignor, 2 members then a 3rd: every record once" java_client groups range
run_check "Java client $kafka_version: consumer group, CooperativeStickyAssignor, 2 members then a 3rd: every record once" \
    java_client groups cooperative-sticky
run_check "Java client $kafka_version: static membership: restarted static members (follower, then leader) keep partitions and generation; admin removes one" \
    java_client static
run_check "Java client $kafka_version: admin: topics, cluster, partitions, configs, offsets, groups" java_client admin
check_compacted() { # POLICY: compact (the check), delete (to see it fail)
    topics --create --topic "tools-compacted-$1" --partitions 1 --config cleanup.policy="$1" \
        --config min.cleanable.dirty.ratio=0.01 --config min.compaction.lag.ms=0 --config delete.retention.ms=8000 \
        --config segment.bytes=1048576 --config segment.ms=600000 >"$work/o"
    expect "^Created topic tools-compacted-$1" "$work/o"
    configs --describe --entity-type topics --entity-name "tools-compacted-$1" >"$work/o"
    expect 'cleanup.policy=compact( |$)' "$work/o"
    expect 'delete.retention.ms=8000( |$)' "$work/o"
    expect 'min.cleanable.dirty.ratio=0.01( |$)' "$work/o"
    java_client compacted "tools-compacted-$1"
}
run_check "kafka-topics/kafka-configs $kafka_version + Java client: compacted topic: created with --config cleanup.policy=compact, described; keyless record -> InvalidRecordException; versions compact to the latest per key at their offsets; tombstone gone after delete.retention.ms" \
    check_compacted compact
check_new_group_protocol() {
    # KIP-848's consumer protocol (ConsumerGroupHeartbeat) is not served: the client says so and
    # reads nothing (the console consumer exits 0 all the same, so its output is what counts).
    kjava org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$broker" --topic tools-t \
        --group tools-kip848 --consumer-property group.protocol=consumer --max-messages 1 --timeout-ms 20000 \
        >"$work/o" 2>&1 || true
    expect 'does not support the new CONSUMER group protocol' "$work/o"
    expect 'Processed a total of 0 messages' "$work/o"
}
run_check "Java client $kafka_version: group.protocol=consumer (KIP-848) refused with UnsupportedVersionException, as README says" \
    check_new_group_protocol

# --- 7. Go: franz-go and sarama ----------------------------------------------------------------
(cd "$here/go" && go build -o "$work/go-clients" .)
go_versions=$(cd "$here/go" && go list -m -f '{{.Path}} {{.Version}}' github.com/twmb/franz-go github.com/twmb/franz-go/pkg/kadm github.com/IBM/sarama | awk '{ sub(".*/", "", $1); printf "%s %s, ", $1, $2 }')
echo "Go clients: ${go_versions%, }"
go_client() { timeout 180 "$work/go-clients" "$broker" "$@"; }
for codec in none gzip snappy lz4 zstd; do
    run_check "franz-go: idempotent producer, $codec: once, in order, headers" go_client franz-produce "$codec"
done
run_check "franz-go: consumer group (cooperative-sticky), 2 members then a 3rd: every record once" go_client franz-group
run_check "franz-go kadm: topics, configs, partitions, offsets, groups" go_client kadm
for codec in none gzip snappy lz4 zstd; do
    run_check "sarama: idempotent sync producer, $codec: once, in order, headers" go_client sarama-produce "$codec"
done
run_check "sarama: consumer group (range), 2 members: every record once, commits at the ends" go_client sarama-group
run_check "sarama ClusterAdmin: topics, configs, partitions, groups" go_client sarama-admin

# --- shutdown --------------------------------------------------------------------------------
kill -TERM "$gw_pid"
gw_status=0
wait "$gw_pid" || gw_status=$?
gw_pid=
if [ "$gw_status" -ne 0 ]; then
    echo "FAIL gateway exit status $gw_status on SIGTERM"
    failed=$((failed + 1))
fi
if [ "$failed" -ne 0 ]; then
    echo "--- gateway log (last 60 lines) ---"
    tail -n 60 "$log"
fi
echo "kafka-tools-interop: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
