"""kafka-python consumer groups, for the consumer-group section of tests/interop/kafka.sh.

Runs under Debian's kafka-python 2.0.2 or the PyPI one (the venv), like kafka_client.py, and
compares records in the same canonical line form kcat prints with -f '%p %o %k=%s [%h]\n'.

  group-consume  --topic T --group G --members N --expect FILE
      N KafkaConsumers (one thread each) subscribe to T in group G; together they must read the
      records of FILE exactly once. Then each commits and sees its commits with committed(), and
      a consumer outside the group reads the group's offsets: the end of every partition.
  committed      --topic T --group G --expect-end | --expect-none
      The group's committed offsets of every partition of T: the partitions' ends, or none.
"""

import argparse
import logging
import os
import sys
import threading
import time

import kafka
from kafka import KafkaConsumer, TopicPartition

from kafka_client import TIMEOUT_S, canonical, fail

GROUP_TIMEOUT_S = 60


def member(bootstrap, group, client_id):
    # Auto commit: kafka-python then commits what was consumed before it rejoins a rebalance
    # (and on close), so a group reads every record once though members join one by one.
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        client_id=client_id,
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        auto_commit_interval_ms=200,
        session_timeout_ms=10000,
        heartbeat_interval_ms=300,
        fetch_max_wait_ms=20,
    )


def partitions_of(consumer, topic):
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() > deadline:
            fail("no partitions of %s in the metadata" % topic)
        time.sleep(0.1)


def committed_offsets(bootstrap, group, topic):
    """{partition: committed offset or None} and {partition: end offset}, read from outside."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = partitions_of(c, topic)
        ends = c.end_offsets(tps)
        return {tp.partition: c.committed(tp) for tp in tps}, {tp.partition: ends[tp] for tp in tps}
    finally:
        c.close(autocommit=False)


class Member(threading.Thread):
    def __init__(self, args, index):
        super().__init__(daemon=True)
        self.args = args
        self.name = "%s-%d" % (args.group, index)
        self.lines = []
        self.assignment = set()
        self.caught_up = False
        self.commits = None
        self.error = None
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        try:
            c = member(self.args.bootstrap, self.args.group, self.name)
            # kafka-python 3.0.12 has a client-side race: a leader that joined before it knew
            # the topic's partitions assigned nothing and rejoins at once; if poll()'s timeout
            # expires while that rejoin waits for the other members, the join completes in the
            # background but the member never applies its assignment nor heartbeats again
            # (need_rejoin() is already false when the next poll looks), and the broker expires
            # it a session later. A poll timeout longer than a rejoin takes avoids it.
            c.subscribe([self.args.topic])
            while not self.stop.is_set():
                got = []
                for records in c.poll(timeout_ms=1000).values():
                    got.extend(canonical(r.partition, r.offset, r.key, r.value, r.headers) for r in records)
                assignment = c.assignment()
                ends = c.end_offsets(list(assignment)) if assignment else {}
                caught_up = bool(assignment) and all(c.position(tp) >= ends[tp] for tp in assignment)
                with self.lock:
                    self.lines.extend(got)
                    self.assignment = {tp.partition for tp in assignment}
                    self.caught_up = caught_up
            # The member commits what it consumed and reads its commits back.
            c.commit()
            self.commits = {tp.partition: (c.committed(tp), c.position(tp)) for tp in c.assignment()}
            c.close()
        except Exception as e:  # reported by the main thread
            self.error = "%s: %r" % (self.name, e)

    def state(self):
        with self.lock:
            return list(self.lines), set(self.assignment), self.caught_up


def cmd_group_consume(args):
    with open(args.expect) as f:
        expected = sorted(f.read().splitlines())
    if not expected:
        fail("empty expectation %s" % args.expect)
    members = [Member(args, i) for i in range(args.members)]
    for m in members:
        m.start()
    # Done when every record was read and the group settled: each member has partitions, the
    # members' assignments (as of their last poll) cover the topic once, and each member has
    # read its partitions to the end.
    parts = sorted({int(line.split(" ", 1)[0]) for line in expected})
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while True:
        states = [m.state() for m in members]
        read = {line for lines, _, _ in states for line in lines}
        settled = (all(a for _, a, _ in states) and all(c for _, _, c in states)
                   and sorted(p for _, a, _ in states for p in a) == parts)
        errors = [m.error for m in members if m.error]
        if errors:
            fail("member errors: %s" % errors)
        if settled and read.issuperset(expected):
            # The assignments as the group settled: once the members stop, the first to close
            # leaves the group, and a member still inside its last poll() may rejoin and take
            # every partition before it sees the stop (a rebalance the test itself causes).
            settled_assignments = [sorted(a) for _, a, _ in states]
            break
        if time.monotonic() > deadline:
            fail("group %s: read %d of %d records; assignments %s, caught up %s"
                 % (args.group, len(read & set(expected)), len(expected),
                    [sorted(a) for _, a, _ in states], [c for _, _, c in states]))
        time.sleep(0.05)
    for m in members:
        m.stop.set()
    for m in members:
        m.join(TIMEOUT_S)
        if m.is_alive():
            fail("%s did not stop" % m.name)
    errors = [m.error for m in members if m.error]
    if errors:
        fail("member errors: %s" % errors)

    all_lines = sorted(line for m in members for line in m.lines)
    if all_lines != expected:
        seen = set()
        twice = sorted({line for line in all_lines if line in seen or seen.add(line)})
        stray = sorted(set(all_lines) - set(expected))
        fail("group %s read %d records for %d expected; twice: %s; unexpected: %s"
             % (args.group, len(all_lines), len(expected), twice[:5], stray[:5]))
    for m in members:
        for p, (committed, position) in sorted(m.commits.items()):
            if committed != position:
                fail("%s: committed(%d) = %r after commit(), position %d" % (m.name, p, committed, position))

    committed, ends = committed_offsets(args.bootstrap, args.group, args.topic)
    if committed != ends:
        fail("group %s's committed offsets %s, partition ends %s" % (args.group, committed, ends))
    print("ok: kafka-python %s, group %s of %d members (partitions %s) read %d records once; committed %s"
          % (kafka.__version__, args.group, args.members, settled_assignments,
             len(all_lines), committed))


def cmd_committed(args):
    committed, ends = committed_offsets(args.bootstrap, args.group, args.topic)
    want = ends if args.expect_end else {p: None for p in ends}
    if committed != want:
        fail("group %s: committed offsets %s, expected %s" % (args.group, committed, want))
    print("ok: group %s committed %s" % (args.group, committed))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("group-consume")
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--members", type=int, default=1)
    p.add_argument("--expect", required=True)
    p.set_defaults(fn=cmd_group_consume)

    p = sub.add_parser("committed")
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--expect-end", action="store_true")
    which.add_argument("--expect-none", action="store_true")
    p.set_defaults(fn=cmd_committed)

    args = parser.parse_args()
    if os.environ.get("KAFKA_GROUPS_DEBUG"):
        # kafka-python's own log (group coordination, fetches) on stderr.
        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)6d %(threadName)s %(name)s %(message)s")
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
