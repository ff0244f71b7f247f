"""kafka-python side of tests/interop/kafka.sh.

Runs under whichever interpreter the script picks (Debian's python3-kafka 2.0.2, or a venv
with kafka-python from PyPI), so it sticks to API both generations share and branches where
they differ. Every subcommand exits 0 only if what it read back matches what it expected,
and prints the mismatch otherwise.

Records are compared in one canonical line form, the same one kcat prints with
-f '%p %o %k=%s [%h]\n':   "<partition> <offset> <key>=<value> [<h1>=<v1>,<h2>=<v2>]"
"""

import argparse
import inspect
import socket
import struct
import sys
import time

import kafka
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

TIMEOUT_S = 20


def canonical(partition, offset, key, value, headers):
    hdrs = ",".join("%s=%s" % (k, v.decode()) for k, v in (headers or []))
    return "%d %d %s=%s [%s]" % (partition, offset, key.decode(), value.decode(), hdrs)


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def compare(what, expected, actual):
    if expected == actual:
        return
    print("FAIL: %s: expected %d lines, got %d" % (what, len(expected), len(actual)))
    for i in range(max(len(expected), len(actual))):
        e = expected[i] if i < len(expected) else "<missing>"
        a = actual[i] if i < len(actual) else "<missing>"
        if e != a:
            print("  first difference at line %d:\n    expected: %s\n    actual:   %s" % (i, e, a))
            break
    sys.exit(1)


def read_partition(bootstrap, topic, partition, count):
    """Reads `count` records from the start of one partition (no consumer group)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        lines = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(lines) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    lines.append(canonical(r.partition, r.offset, r.key, r.value, r.headers))
        # Anything beyond `count` would be a duplicate or stray record: look briefly for it.
        for records in consumer.poll(timeout_ms=300).values():
            for r in records:
                lines.append(canonical(r.partition, r.offset, r.key, r.value, r.headers))
        return lines
    finally:
        consumer.close()


def cmd_produce(args):
    """Produces keyed records with headers, checks their offsets, reads them back."""
    config = dict(bootstrap_servers=args.bootstrap, acks="all", linger_ms=5)
    if args.compression != "none":
        config["compression_type"] = args.compression
    if args.idempotent:
        config["enable_idempotence"] = True
    elif "enable_idempotence" in KafkaProducer.DEFAULT_CONFIG:
        # Newer kafka-python turns idempotence on by default (KIP-679); pin it off so the
        # plain runs stay plain and the idempotent run is the explicit one.
        config["enable_idempotence"] = False
    producer = KafkaProducer(**config)
    if args.idempotent and not producer.config.get("enable_idempotence"):
        # Versions without the option refuse it in KafkaProducer() already; this catches one
        # that silently drops it (kafka-python does when it thinks the broker is too old).
        fail("kafka-python %s dropped enable_idempotence (api_version %s)"
             % (kafka.__version__, producer.config.get("api_version")))
    sent = []
    futures = []
    for i in range(args.count):
        key = ("%s-k%04d" % (args.label, i)).encode()
        # Values long and repetitive enough that compression has something to do.
        value = ("%s value %04d %s" % (args.label, i, "abc" * (i % 7 + 1))).encode()
        headers = [("idx", str(i).encode()), ("client", ("kafka-python-" + kafka.__version__).encode())]
        futures.append(producer.send(args.topic, partition=args.partition, key=key, value=value, headers=headers))
        sent.append((key, value, headers))
        if i == args.count // 2:
            producer.flush()  # two or more batches, so reads cross a batch boundary
    producer.flush()
    metas = [f.get(timeout=TIMEOUT_S) for f in futures]
    if args.idempotent:
        # Private state, but the only way to see that InitProducerId really gave this producer
        # an id (so its batches carried producer id and sequence numbers).
        tm = getattr(producer, "_transaction_manager", None)
        pid = getattr(getattr(tm, "producer_id_and_epoch", None), "producer_id", None)
        if pid is None or pid < 0:
            fail("idempotent producer has no producer id after sending (%r)" % (pid,))
    producer.close()

    first = metas[0].offset
    offsets = [m.offset for m in metas]
    if offsets != list(range(first, first + args.count)):
        fail("RecordMetadata offsets not consecutive: %s" % offsets)
    if first != args.expect_first_offset:
        fail("first offset %d, expected %d" % (first, args.expect_first_offset))
    if any(m.partition != args.partition for m in metas) or any(m.topic != args.topic for m in metas):
        fail("RecordMetadata topic/partition wrong: %s" % metas[0])

    expected = [canonical(args.partition, first + i, k, v, h) for i, (k, v, h) in enumerate(sent)]
    actual = read_partition(args.bootstrap, args.topic, args.partition, first + args.count)
    actual = [line for line in actual if int(line.split(" ", 2)[1]) >= first]
    compare("kafka-python read-back of %s" % args.topic, expected, actual)
    if args.out:
        with open(args.out, "w") as f:
            f.write("".join(line + "\n" for line in expected))
    print("ok: kafka-python %s produced and read back %d records (offsets %d..%d, compression %s%s)"
          % (kafka.__version__, args.count, first, first + args.count - 1, args.compression,
             ", idempotent" if args.idempotent else ""))


def cmd_consume(args):
    """Reads a partition from the start and compares it with a file of canonical lines."""
    with open(args.expect) as f:
        expected = f.read().splitlines()
    actual = read_partition(args.bootstrap, args.topic, args.partition, len(expected))
    compare("kafka-python read of %s" % args.topic, expected, actual)
    print("ok: kafka-python %s read %d records" % (kafka.__version__, len(actual)))


def topic_configs(admin, topic):
    """{name: value} of a topic's configs, for both kafka-python generations."""
    resource = ConfigResource(ConfigResourceType.TOPIC, topic)
    if "config_filter" in inspect.signature(admin.describe_configs).parameters:
        # Returns {resource_type: {name: {config: {value: ...}}}}; the default filter keeps
        # only modified configs, so ask for all.
        result = admin.describe_configs([resource], config_filter="all")
        entries = result["topic"][topic]
        return {name: c["value"] for name, c in entries.items()}
    responses = admin.describe_configs([resource])
    configs = {}
    for response in responses:
        for error_code, error_message, _type, name, entries in response.resources:
            if error_code != 0:
                fail("describe_configs %s: error %d %s" % (name, error_code, error_message))
            for entry in entries:
                configs[entry[0]] = entry[1]
    return configs


def cmd_create(args):
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    admin.create_topics([NewTopic(args.topic, num_partitions=args.partitions, replication_factor=1)])
    admin.close()
    print("ok: created %s with %d partitions" % (args.topic, args.partitions))


def cmd_admin(args):
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    topic = args.topic
    if topic in admin.list_topics():
        fail("%s exists before create" % topic)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    if topic not in admin.list_topics():
        fail("list_topics after create lacks %s" % topic)
    described = admin.describe_topics([topic])
    partitions = sorted(p.get("partition", p.get("partition_index")) for p in described[0]["partitions"])
    if partitions != [0, 1]:
        fail("describe_topics %s: partitions %s, expected [0, 1]" % (topic, partitions))

    try:
        admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
        fail("second create_topics of %s did not raise TopicAlreadyExistsError" % topic)
    except TopicAlreadyExistsError:
        pass

    configs = topic_configs(admin, topic)
    if configs.get("retention.ms") != "604800000":
        fail("describe_configs %s: retention.ms=%r, expected '604800000' (all: %s)"
             % (topic, configs.get("retention.ms"), configs))

    admin.delete_topics([topic])
    deadline = time.monotonic() + TIMEOUT_S
    while topic in admin.list_topics():
        if time.monotonic() > deadline:
            fail("list_topics still shows %s after delete_topics" % topic)
        time.sleep(0.1)
    admin.close()
    print("ok: kafka-python %s admin create/duplicate/describe_configs/delete on %s (configs %s)"
          % (kafka.__version__, topic, sorted(configs)))


CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
SMALL_BATCH = 4


def fetch_raw(host, port, topic, partition, offset):
    """One Fetch v4 on a plain socket; returns (error_code, high_watermark, record set bytes).

    kafka-python does not expose the batches it fetched, so this reads them itself: the
    gateway stores client batches as sent, and their headers show codec and producer id."""
    name = topic.encode()
    client_id = b"tributary-interop"
    body = struct.pack(">hhih", 1, 4, 1, len(client_id)) + client_id
    body += struct.pack(">iiiib", -1, 0, 1, 8 << 20, 0)
    body += struct.pack(">ih", 1, len(name)) + name
    body += struct.pack(">iiqi", 1, partition, offset, 8 << 20)
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">i", data[:4])[0]:
            chunk = sock.recv(1 << 16)
            if not chunk:
                fail("connection closed during Fetch")
            data += chunk
    pos = 4
    correlation_id, _throttle, n_topics = struct.unpack_from(">iii", data, pos)
    pos += 12
    if correlation_id != 1 or n_topics != 1:
        fail("Fetch response: correlation id %d, %d topics" % (correlation_id, n_topics))
    (name_len,) = struct.unpack_from(">h", data, pos)
    pos += 2 + name_len
    n_parts, part, error, high_watermark, _lso, n_aborted = struct.unpack_from(">iihqqi", data, pos)
    pos += 30 + max(n_aborted, 0) * 16
    if n_parts != 1 or part != partition:
        fail("Fetch response: %d partitions, partition %d" % (n_parts, part))
    (size,) = struct.unpack_from(">i", data, pos)
    pos += 4
    return error, high_watermark, data[pos:pos + max(size, 0)]


def cmd_batches(args):
    """Checks the stored batches of a partition: codec, producer id, offsets 0..count-1."""
    host, port = args.bootstrap.rsplit(":", 1)
    offset = 0
    batches = []
    while offset < args.count:
        error, high_watermark, records = fetch_raw(host, int(port), args.topic, args.partition, offset)
        if error != 0:
            fail("Fetch %s/%d at %d: error code %d" % (args.topic, args.partition, offset, error))
        if high_watermark != args.count:
            fail("high watermark %d, expected %d" % (high_watermark, args.count))
        pos = 0
        progressed = False
        while pos + 61 <= len(records):  # 61: v2 batch header
            base, length, _epoch, magic, _crc, attributes, last_delta = struct.unpack_from(
                ">qiibIhi", records, pos)
            (producer_id,) = struct.unpack_from(">q", records, pos + 43)
            if pos + 12 + length > len(records):
                break  # partial batch at the end of the response
            if magic != 2:
                fail("batch at %d has magic %d" % (base, magic))
            batches.append((base, base + last_delta, CODECS.get(attributes & 7, attributes & 7), producer_id))
            pos += 12 + length
            if base + last_delta >= offset:
                offset = base + last_delta + 1
                progressed = True
        if not progressed:
            fail("Fetch at %d returned no whole batch past it (%d bytes)" % (offset, len(records)))
    summary = ", ".join("%d-%d %s pid=%d" % b for b in batches)
    covered = [o for first, last, _c, _p in batches for o in range(first, last + 1)]
    if covered != list(range(args.count)):
        fail("batches do not cover offsets 0..%d exactly once: %s" % (args.count - 1, summary))
    # librdkafka sends a batch uncompressed when compressing does not make it smaller, which
    # happens to a batch of one short record; larger batches must be in the codec asked for.
    wrong = [b for b in batches
             if b[2] != args.codec and not (b[2] == "none" and b[1] - b[0] + 1 < SMALL_BATCH)]
    if wrong or all(b[2] != args.codec for b in batches):
        fail("batches not in codec %s: %s" % (args.codec, summary))
    pids = {b[3] for b in batches}
    if args.idempotent and min(pids) < 0:
        fail("idempotent producer's batches without producer id: %s" % summary)
    if not args.idempotent and pids != {-1}:
        fail("batches carry a producer id, the producer was not idempotent: %s" % summary)
    print("ok: %s/%d stored as %d batches: %s" % (args.topic, args.partition, len(batches), summary))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("produce")
    p.add_argument("--topic", required=True)
    p.add_argument("--partition", type=int, default=0)
    p.add_argument("--compression", default="none")
    p.add_argument("--idempotent", action="store_true")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--label", default="kp")
    p.add_argument("--expect-first-offset", type=int, default=0)
    p.add_argument("--out", help="write the expected canonical lines here")
    p.set_defaults(fn=cmd_produce)

    p = sub.add_parser("consume")
    p.add_argument("--topic", required=True)
    p.add_argument("--partition", type=int, default=0)
    p.add_argument("--expect", required=True)
    p.set_defaults(fn=cmd_consume)

    p = sub.add_parser("create")
    p.add_argument("--topic", required=True)
    p.add_argument("--partitions", type=int, required=True)
    p.set_defaults(fn=cmd_create)

    p = sub.add_parser("admin")
    p.add_argument("--topic", required=True)
    p.set_defaults(fn=cmd_admin)

    p = sub.add_parser("batches")
    p.add_argument("--topic", required=True)
    p.add_argument("--partition", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--codec", required=True, choices=sorted(CODECS.values()))
    p.add_argument("--idempotent", action="store_true")
    p.set_defaults(fn=cmd_batches)

    p = sub.add_parser("version")
    p.set_defaults(fn=lambda args: print(kafka.__version__))

    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
