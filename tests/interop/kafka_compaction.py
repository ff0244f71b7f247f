"""Compacted topics with kafka-python (tests/interop/kafka.sh runs it under Debian's 2.0.2 and
PyPI's newest): an admin creates a topic with cleanup.policy=compact and the settings that make the
gateway compact at once (as tests/it/compaction.rs does with librdkafka); a keyless record is
refused; several versions of every key and a tombstone are produced; a consumer from the beginning
polls (with a deadline) until it sees Kafka's compacted view: the latest record per key at its
original offset, offsets with gaps, the tombstone kept; then the tombstone goes after
delete.retention.ms. --policy delete runs the same against a topic that is not compacted: every
check that depends on compaction must then fail (how the checks were seen to fail).

    python3 kafka_compaction.py --bootstrap HOST:PORT --topic T [--policy compact|delete]
"""

import argparse
import sys
import time

import kafka
import kafka.errors as Errors
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

sys.dont_write_bytecode = True  # importing kafka_client must leave no __pycache__ in the clone
from kafka_client import fail, topic_configs  # noqa: E402

KEYS = 10
VERSIONS = 5
DELETE_RETENTION_MS = 8000
DEADLINE_S = 60


def producer(bootstrap):
    config = dict(bootstrap_servers=bootstrap, acks="all", linger_ms=5, retries=0)
    if "enable_idempotence" in KafkaProducer.DEFAULT_CONFIG:
        config["enable_idempotence"] = False  # newer kafka-python's default; the keyless refusal must not be retried
    return KafkaProducer(**config)


def view(bootstrap, topic, end):
    """[(offset, key, value)] of partition 0 from the beginning up to offset end-1 (the last
    record produced: the active tail, which compaction leaves alone)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=20)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got = []
        deadline = time.monotonic() + 20
        while not got or got[-1][0] < end - 1:
            if time.monotonic() > deadline:
                fail("read of %s did not reach offset %d: %s" % (topic, end - 1, got))
            for records in consumer.poll(timeout_ms=200).values():
                got.extend((r.offset, r.key.decode() if r.key is not None else None,
                            r.value.decode() if r.value is not None else None) for r in records)
        return got
    finally:
        consumer.close()


def cmd(args):
    topic = args.topic
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1, topic_configs={
        "cleanup.policy": args.policy,
        "min.cleanable.dirty.ratio": "0.01",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": str(DELETE_RETENTION_MS),
        "segment.bytes": "1048576",
        "segment.ms": "600000",
    })])
    configs = topic_configs(admin, topic)
    admin.close()
    want = {"cleanup.policy": "compact", "delete.retention.ms": str(DELETE_RETENTION_MS),
            "min.cleanable.dirty.ratio": "0.01"}
    shown = {k: configs.get(k) for k in want}
    if shown != want:
        fail("describe_configs %s: %s, expected %s" % (topic, shown, want))

    p = producer(args.bootstrap)
    # Kafka refuses a keyless record on a compacted topic (LogValidator): INVALID_RECORD (87),
    # "Compacted topic cannot accept message without key". kafka-python 2.0.2 predates code 87
    # and maps it to UnknownError; 3.x has InvalidRecordError.
    refused = getattr(Errors, "InvalidRecordError", Errors.UnknownError)
    try:
        md = p.send(topic, value=b"no key", partition=0).get(timeout=30)
        fail("keyless record accepted on %s at offset %d" % (topic, md.offset))
    except refused as e:
        print("keyless record refused: %s: %s" % (type(e).__name__, e))

    latest = {}
    for v in range(VERSIONS):
        futures = [(("meter-%02d" % k), ("reading-%d" % v),
                    p.send(topic, key=("meter-%02d" % k).encode(), value=("reading-%d" % v).encode(), partition=0))
                   for k in range(KEYS)]
        p.flush()  # one batch per round: versions of a key in different batches
        for key, value, f in futures:
            latest[key] = (f.get(timeout=30).offset, value)
    latest["meter-00"] = (p.send(topic, key=b"meter-00", value=None, partition=0).get(timeout=30).offset, None)
    # A last record on its own: the newest batch, which compaction leaves alone.
    end = p.send(topic, key=b"end", value=b"tail", partition=0).get(timeout=30).offset
    latest["end"] = (end, "tail")
    produced = KEYS * VERSIONS + 2
    if end != produced - 1:
        fail("the keyless record took an offset: the last of %d records is at %d" % (produced, end))
    p.flush()

    with_tombstone = sorted((o, k, v) for k, (o, v) in latest.items())
    without = [r for r in with_tombstone if r[1] != "meter-00"]
    # Poll until the view is Kafka's compacted one. The tombstone's view must come first: it is
    # kept for delete.retention.ms after compaction first saw it.
    start = time.monotonic()
    seen = []
    while True:
        got = view(args.bootstrap, topic, produced)
        if got == with_tombstone:
            break
        if got == without:
            fail("the tombstone went before it was seen (delete.retention.ms %d ms)" % DELETE_RETENTION_MS)
        if time.monotonic() - start > DEADLINE_S:
            fail("no compacted view of %s within %d s: %d records read (%d expected): %s"
                 % (topic, DEADLINE_S, len(got), len(with_tombstone), got[:12]))
        seen = got
        time.sleep(0.1)  # the poll's interval, not a synchronisation
    compacted_s = time.monotonic() - start
    if len(with_tombstone) >= with_tombstone[-1][0] + 1:
        fail("no offset gaps in %s" % with_tombstone)
    while True:
        got = view(args.bootstrap, topic, produced)
        if got == without:
            break
        if got != with_tombstone:
            fail("view neither with nor without the tombstone: %s" % got)
        if time.monotonic() - start > DEADLINE_S + DELETE_RETENTION_MS / 1000:
            fail("the tombstone of meter-00 is still there %.1f s after the produce" % (time.monotonic() - start))
        time.sleep(0.1)
    gone_s = time.monotonic() - start

    # Offsets are never reused: the next record goes after the last one produced.
    again = p.send(topic, key=b"meter-01", value=b"again", partition=0).get(timeout=30).offset
    p.close()
    if again != produced:
        fail("a record after compaction got offset %d, expected %d" % (again, produced))
    print("ok: kafka-python %s: %d records (%d keys x %d versions, a tombstone, a tail) compacted to %d "
          "at their offsets %s in %.1f s (%d records read before); the tombstone gone after %.1f s"
          % (kafka.__version__, produced, KEYS, VERSIONS, len(with_tombstone),
             [o for o, _k, _v in with_tombstone], compacted_s, len(seen), gone_s))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--policy", default="compact", choices=["compact", "delete"])
    cmd(parser.parse_args())


if __name__ == "__main__":
    main()
