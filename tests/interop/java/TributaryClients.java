// The Apache Kafka Java client against a Tributary gateway (tests/interop/kafka_tools.sh compiles
// this with javac against the jars tests/kafka/fetch-jars.sh fetched and runs one check per
// invocation). Each check throws (exit 1) on the first difference from what Kafka would answer.
//
//   java -cp 'JARS/*:CLASSES' TributaryClients BOOTSTRAP CHECK [ARG]
//   CHECK: produce CODEC | groups range|cooperative-sticky | static | admin | compacted TOPIC

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.*;
import java.util.concurrent.*;

import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.*;
import org.apache.kafka.common.config.ConfigResource;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.*;
import org.apache.kafka.common.utils.Utils;

public class TributaryClients {
    static String bootstrap;

    public static void main(String[] args) throws Exception {
        bootstrap = args[0];
        switch (args[1]) {
            case "produce" -> produce(args[2]);
            case "groups" -> groups(args[2]);
            case "static" -> staticMembership();
            case "admin" -> admin();
            case "compacted" -> compacted(args[2]);
            default -> throw new IllegalArgumentException("unknown check " + args[1]);
        }
        System.out.println("ok " + String.join(" ", Arrays.copyOfRange(args, 1, args.length)));
    }

    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
    }

    static Admin admin(Properties extra) {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.putAll(extra);
        return Admin.create(p);
    }

    static void createTopic(String topic, int partitions) throws Exception {
        try (Admin a = admin(new Properties())) {
            a.createTopics(List.of(new NewTopic(topic, partitions, (short) 1))).all().get(30, TimeUnit.SECONDS);
        }
    }

    static KafkaProducer<String, String> producer(Map<String, Object> extra) {
        Map<String, Object> p = new HashMap<>();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.LINGER_MS_CONFIG, 20);
        p.putAll(extra);
        return new KafkaProducer<>(p, new StringSerializer(), new StringSerializer());
    }

    static KafkaConsumer<String, String> consumer(Map<String, Object> extra) {
        Map<String, Object> p = new HashMap<>();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
        p.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, 50);
        p.putAll(extra);
        return new KafkaConsumer<>(p, new StringDeserializer(), new StringDeserializer());
    }

    /** Keyed records with headers, spread by the default (murmur2) partitioner; records per partition in order. */
    static Map<Integer, List<String>> sendAll(KafkaProducer<String, String> producer, String topic, int n, int partitions)
            throws Exception {
        Map<Integer, List<String>> sent = new TreeMap<>();
        List<Future<RecordMetadata>> futures = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            String key = "key-" + (i % 37);
            String value = "value " + i + " " + "compressible ".repeat(i % 9);
            ProducerRecord<String, String> r = new ProducerRecord<>(topic, key, value);
            r.headers().add("seq", Integer.toString(i).getBytes(StandardCharsets.UTF_8));
            futures.add(producer.send(r));
            int expected = Utils.toPositive(Utils.murmur2(key.getBytes(StandardCharsets.UTF_8))) % partitions;
            sent.computeIfAbsent(expected, k -> new ArrayList<>()).add(key + "=" + value + "|seq=" + i);
        }
        producer.flush();
        for (int i = 0; i < futures.size(); i++) {
            RecordMetadata md = futures.get(i).get(30, TimeUnit.SECONDS);
            String key = "key-" + (i % 37);
            int expected = Utils.toPositive(Utils.murmur2(key.getBytes(StandardCharsets.UTF_8))) % partitions;
            check(md.partition() == expected, "record " + i + " went to partition " + md.partition() + ", not " + expected);
        }
        return sent;
    }

    static String show(ConsumerRecord<String, String> r) {
        StringBuilder h = new StringBuilder();
        for (Header x : r.headers()) h.append("|").append(x.key()).append("=").append(new String(x.value(), StandardCharsets.UTF_8));
        return r.key() + "=" + r.value() + h;
    }

    /** Every record of `topic` read with assign() from the beginning, per partition, in order. */
    static Map<Integer, List<String>> readAll(String topic, int partitions, int n) {
        Map<Integer, List<String>> got = new TreeMap<>();
        try (KafkaConsumer<String, String> c = consumer(Map.of())) {
            List<TopicPartition> tps = new ArrayList<>();
            for (int p = 0; p < partitions; p++) tps.add(new TopicPartition(topic, p));
            c.assign(tps);
            c.seekToBeginning(tps);
            int count = 0;
            long deadline = System.currentTimeMillis() + 60_000;
            while (count < n) {
                check(System.currentTimeMillis() < deadline, "read " + count + " of " + n + " records of " + topic);
                for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(200))) {
                    got.computeIfAbsent(r.partition(), k -> new ArrayList<>()).add(show(r));
                    count++;
                }
            }
        }
        return got;
    }

    /** An idempotent producer in one codec: every record in its key's partition, once, in order, headers kept. */
    static void produce(String codec) throws Exception {
        String topic = "java-idempotent-" + codec;
        createTopic(topic, 3);
        Map<Integer, List<String>> sent;
        try (KafkaProducer<String, String> p = producer(Map.of(
                ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true,
                ProducerConfig.COMPRESSION_TYPE_CONFIG, codec,
                ProducerConfig.MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION, 5))) {
            sent = sendAll(p, topic, 500, 3);
        }
        Map<Integer, List<String>> got = readAll(topic, 3, 500);
        check(got.equals(sent), "read back differs: sent " + sent + "\ngot " + got);
    }

    /** Two members with the given assignor split a 6-partition topic, a third joins; every record consumed once. */
    static void groups(String assignor) throws Exception {
        String topic = "java-group-" + assignor, group = "java-" + assignor;
        createTopic(topic, 6);
        try (KafkaProducer<String, String> p = producer(Map.of())) {
            sendAll(p, topic, 600, 6);
        }
        String strategy = assignor.equals("range") ? RangeAssignor.class.getName()
                : CooperativeStickyAssignor.class.getName();
        ConcurrentHashMap<String, Integer> seen = new ConcurrentHashMap<>();
        CountDownLatch third = new CountDownLatch(1);
        ConcurrentHashMap<Integer, Set<TopicPartition>> assigned = new ConcurrentHashMap<>();
        ExecutorService pool = Executors.newFixedThreadPool(3);
        List<Future<?>> members = new ArrayList<>();
        long deadline = System.currentTimeMillis() + 90_000;
        for (int m = 0; m < 3; m++) {
            final int member = m;
            members.add(pool.submit(() -> {
                if (member == 2) third.await();
                try (KafkaConsumer<String, String> c = consumer(Map.of(
                        ConsumerConfig.GROUP_ID_CONFIG, group,
                        ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG, strategy,
                        ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, 10_000,
                        ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG, 500))) {
                    c.subscribe(List.of(topic));
                    while (System.currentTimeMillis() < deadline) {
                        ConsumerRecords<String, String> rs = c.poll(Duration.ofMillis(100));
                        for (ConsumerRecord<String, String> r : rs) {
                            Integer before = seen.put(r.partition() + "@" + r.offset(), member);
                            check(before == null, "record " + r.partition() + "@" + r.offset() + " consumed twice");
                        }
                        if (!rs.isEmpty()) c.commitSync();
                        assigned.put(member, new HashSet<>(c.assignment()));
                        if (seen.size() >= 300) third.countDown();
                        boolean done = seen.size() == 600 && assigned.size() == 3
                                && assigned.values().stream().mapToInt(Set::size).sum() == 6
                                && assigned.values().stream().allMatch(s -> s.size() == 2);
                        if (done) break;
                    }
                }
                return null;
            }));
        }
        for (Future<?> f : members) f.get(120, TimeUnit.SECONDS);
        pool.shutdown();
        check(seen.size() == 600, "consumed " + seen.size() + " of 600 records");
        Set<TopicPartition> union = new HashSet<>();
        assigned.values().forEach(union::addAll);
        check(union.size() == 6, "the three members hold " + assigned);
    }

    static KafkaConsumer<String, String> staticMember(String group, String instance) {
        return consumer(Map.of(
                ConsumerConfig.GROUP_ID_CONFIG, group,
                ConsumerConfig.GROUP_INSTANCE_ID_CONFIG, instance,
                ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, 30_000));
    }

    /** Polls every consumer until each has an assignment and all are in the same generation. */
    static void settle(List<KafkaConsumer<String, String>> cs, String what) {
        long deadline = System.currentTimeMillis() + 60_000;
        while (true) {
            check(System.currentTimeMillis() < deadline, "group not settled: " + what);
            for (KafkaConsumer<String, String> c : cs) c.poll(Duration.ofMillis(50));
            int g = cs.get(0).groupMetadata().generationId();
            if (cs.stream().allMatch(c -> !c.assignment().isEmpty() && c.groupMetadata().generationId() == g)) return;
        }
    }

    /**
     * Static membership (group.instance.id, KIP-345): a static member that restarts within its
     * session gets its partitions back in the same generation (no rebalance), the follower and
     * then the leader (the first to join), and the admin client sees and removes members by
     * instance id.
     */
    static void staticMembership() throws Exception {
        String topic = "java-static", group = "java-static";
        createTopic(topic, 2);
        KafkaConsumer<String, String> a = staticMember(group, "reader-a");
        KafkaConsumer<String, String> b = null;
        try {
            a.subscribe(List.of(topic));
            settle(List.of(a), "reader-a alone");
            b = staticMember(group, "reader-b");
            b.subscribe(List.of(topic));
            settle(List.of(a, b), "reader-a and reader-b");
            int generation = b.groupMetadata().generationId();
            Set<TopicPartition> heldA = new HashSet<>(a.assignment()), heldB = new HashSet<>(b.assignment());
            // A static member's close does not leave the group (no LeaveGroup): restart b, then a.
            b.close();
            b = staticMember(group, "reader-b");
            b.subscribe(List.of(topic));
            settle(List.of(a, b), "reader-b restarted");
            check(b.assignment().equals(heldB), "reader-b's assignment changed: " + heldB + " -> " + b.assignment());
            check(b.groupMetadata().generationId() == generation && a.groupMetadata().generationId() == generation,
                    "generation " + generation + " -> " + b.groupMetadata().generationId() + ": reader-b's restart rebalanced");
            a.close();
            a = staticMember(group, "reader-a");
            a.subscribe(List.of(topic));
            settle(List.of(a, b), "reader-a (the leader) restarted");
            check(a.assignment().equals(heldA), "reader-a's assignment changed: " + heldA + " -> " + a.assignment());
            check(a.groupMetadata().generationId() == generation && b.groupMetadata().generationId() == generation,
                    "generation " + generation + " -> " + a.groupMetadata().generationId() + ": the leader's restart rebalanced");
            try (Admin adm = admin(new Properties())) {
                ConsumerGroupDescription d =
                        adm.describeConsumerGroups(List.of(group)).describedGroups().get(group).get(30, TimeUnit.SECONDS);
                Set<Optional<String>> ids = new HashSet<>();
                d.members().forEach(m -> ids.add(m.groupInstanceId()));
                check(ids.equals(Set.of(Optional.of("reader-a"), Optional.of("reader-b"))), "members: " + d.members());
                // What an operator does after decommissioning a static member.
                b.close();
                b = null;
                adm.removeMembersFromConsumerGroup(group, new RemoveMembersFromConsumerGroupOptions(
                        List.of(new MemberToRemove("reader-b")))).all().get(30, TimeUnit.SECONDS);
                d = adm.describeConsumerGroups(List.of(group)).describedGroups().get(group).get(30, TimeUnit.SECONDS);
                check(d.members().stream().noneMatch(m -> m.groupInstanceId().equals(Optional.of("reader-b"))),
                        "reader-b still a member: " + d.members());
            }
        } finally {
            a.close();
            if (b != null) b.close();
        }
    }

    /** The admin client's everyday calls. */
    static void admin() throws Exception {
        try (Admin a = admin(new Properties())) {
            String topic = "java-admin";
            a.createTopics(List.of(new NewTopic(topic, 2, (short) 1).configs(Map.of("retention.ms", "3600000"))))
                    .all().get(30, TimeUnit.SECONDS);
            try {
                a.createTopics(List.of(new NewTopic(topic, 2, (short) 1))).all().get(30, TimeUnit.SECONDS);
                check(false, "a duplicate topic was created");
            } catch (ExecutionException e) {
                check(e.getCause() instanceof org.apache.kafka.common.errors.TopicExistsException, "duplicate: " + e.getCause());
            }
            check(a.listTopics().names().get(30, TimeUnit.SECONDS).contains(topic), "listTopics");
            DescribeClusterResult cluster = a.describeCluster();
            check(cluster.nodes().get(30, TimeUnit.SECONDS).size() == 1, "one node");
            check(cluster.clusterId().get(30, TimeUnit.SECONDS) != null, "cluster id");
            TopicDescription td = a.describeTopics(List.of(topic)).allTopicNames().get(30, TimeUnit.SECONDS).get(topic);
            check(td.partitions().size() == 2, "2 partitions: " + td);
            a.createPartitions(Map.of(topic, NewPartitions.increaseTo(3))).all().get(30, TimeUnit.SECONDS);
            td = a.describeTopics(List.of(topic)).allTopicNames().get(30, TimeUnit.SECONDS).get(topic);
            check(td.partitions().size() == 3, "3 partitions after createPartitions: " + td);
            ConfigResource res = new ConfigResource(ConfigResource.Type.TOPIC, topic);
            Config cfg = a.describeConfigs(List.of(res)).all().get(30, TimeUnit.SECONDS).get(res);
            check("3600000".equals(cfg.get("retention.ms").value()), "retention.ms: " + cfg);
            a.incrementalAlterConfigs(Map.of(res, List.of(new AlterConfigOp(new ConfigEntry("retention.ms", "7200000"),
                    AlterConfigOp.OpType.SET)))).all().get(30, TimeUnit.SECONDS);
            cfg = a.describeConfigs(List.of(res)).all().get(30, TimeUnit.SECONDS).get(res);
            check("7200000".equals(cfg.get("retention.ms").value()), "retention.ms after the alter: " + cfg);
            // Offsets: 10 records in partition 0, then list earliest/latest.
            try (KafkaProducer<String, String> p = producer(Map.of())) {
                for (int i = 0; i < 10; i++) p.send(new ProducerRecord<>(topic, 0, "k", "v" + i)).get(30, TimeUnit.SECONDS);
            }
            TopicPartition tp0 = new TopicPartition(topic, 0);
            long latest = a.listOffsets(Map.of(tp0, OffsetSpec.latest())).all().get(30, TimeUnit.SECONDS).get(tp0).offset();
            long earliest = a.listOffsets(Map.of(tp0, OffsetSpec.earliest())).all().get(30, TimeUnit.SECONDS).get(tp0).offset();
            check(latest == 10 && earliest == 0, "offsets " + earliest + ".." + latest);
            // A group's committed offsets: commit through a consumer, read and delete through admin.
            try (KafkaConsumer<String, String> c = consumer(Map.of(ConsumerConfig.GROUP_ID_CONFIG, "java-admin-group"))) {
                c.assign(List.of(tp0));
                c.commitSync(Map.of(tp0, new OffsetAndMetadata(7)));
            }
            Map<TopicPartition, OffsetAndMetadata> committed =
                    a.listConsumerGroupOffsets("java-admin-group").partitionsToOffsetAndMetadata().get(30, TimeUnit.SECONDS);
            check(committed.get(tp0).offset() == 7, "committed " + committed);
            check(a.listGroups().all().get(30, TimeUnit.SECONDS).stream().anyMatch(g -> g.groupId().equals("java-admin-group")),
                    "listConsumerGroups");
            a.deleteConsumerGroups(List.of("java-admin-group")).all().get(30, TimeUnit.SECONDS);
            check(a.listConsumerGroupOffsets("java-admin-group").partitionsToOffsetAndMetadata().get(30, TimeUnit.SECONDS).isEmpty(),
                    "offsets after the group's deletion");
            a.deleteTopics(List.of(topic)).all().get(30, TimeUnit.SECONDS);
            check(!a.listTopics().names().get(30, TimeUnit.SECONDS).contains(topic), "deleted topic still listed");
        }
    }

    /** (offset, key, value) lines of partition 0 of `topic` from the beginning to offset end-1. */
    static List<String> view(String topic, long end) {
        List<String> got = new ArrayList<>();
        try (KafkaConsumer<String, String> c = consumer(Map.of())) {
            TopicPartition tp = new TopicPartition(topic, 0);
            c.assign(List.of(tp));
            c.seekToBeginning(List.of(tp));
            long last = -1;
            long deadline = System.currentTimeMillis() + 20_000;
            while (last < end - 1) {
                check(System.currentTimeMillis() < deadline, "read of " + topic + " did not reach offset " + (end - 1) + ": " + got);
                for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(200))) {
                    got.add(r.offset() + " " + r.key() + "=" + r.value());
                    last = r.offset();
                }
            }
        }
        return got;
    }

    /**
     * A compacted topic made by kafka-topics (cleanup.policy=compact, min.cleanable.dirty.ratio=0.01,
     * delete.retention.ms=8000): a keyless record refused with InvalidRecordException, as the Java
     * broker refuses it; 10 keys x 5 versions, a tombstone and a tail record produced; a consumer from
     * the beginning polls (deadline 60 s) until it reads Kafka's compacted view (the latest record per
     * key at its original offset, gaps, the tombstone kept), then until the tombstone is gone.
     */
    static void compacted(String topic) throws Exception {
        try (KafkaProducer<String, String> p = producer(Map.of(ProducerConfig.RETRIES_CONFIG, 0,
                ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, false))) {
            try {
                RecordMetadata md = p.send(new ProducerRecord<>(topic, 0, null, "no key")).get(30, TimeUnit.SECONDS);
                check(false, "keyless record accepted at offset " + md.offset());
            } catch (ExecutionException e) {
                check(e.getCause() instanceof org.apache.kafka.common.InvalidRecordException,
                        "keyless record: " + e.getCause());
                System.out.println("keyless record refused: " + e.getCause());
            }
            TreeMap<String, String> latest = new TreeMap<>();
            int keys = 10, versions = 5;
            for (int v = 0; v < versions; v++) {
                List<Future<RecordMetadata>> fs = new ArrayList<>();
                for (int k = 0; k < keys; k++) fs.add(p.send(new ProducerRecord<>(topic, 0, String.format("meter-%02d", k), "reading-" + v)));
                p.flush(); // one batch per round
                for (int k = 0; k < keys; k++)
                    latest.put(String.format("meter-%02d", k), fs.get(k).get(30, TimeUnit.SECONDS).offset() + " reading-" + v);
            }
            long tomb = p.send(new ProducerRecord<>(topic, 0, "meter-00", null)).get(30, TimeUnit.SECONDS).offset();
            latest.put("meter-00", tomb + " null");
            // A last record on its own: the newest batch, which compaction leaves alone.
            long end = p.send(new ProducerRecord<>(topic, 0, "end", "tail")).get(30, TimeUnit.SECONDS).offset();
            latest.put("end", end + " tail");
            long produced = keys * versions + 2;
            check(end == produced - 1, "the keyless record took an offset: the last record is at " + end);
            TreeMap<Long, String> byOffset = new TreeMap<>();
            latest.forEach((k, ov) -> {
                String[] x = ov.split(" ", 2);
                byOffset.put(Long.parseLong(x[0]), x[0] + " " + k + "=" + x[1]);
            });
            List<String> withTombstone = new ArrayList<>(byOffset.values());
            List<String> without = new ArrayList<>(withTombstone);
            without.removeIf(l -> l.contains(" meter-00="));
            check(withTombstone.size() < produced, "gaps");
            long start = System.currentTimeMillis();
            List<String> got;
            while (!(got = view(topic, produced)).equals(withTombstone)) {
                check(!got.equals(without), "the tombstone went before it was seen");
                check(System.currentTimeMillis() - start < 60_000,
                        "no compacted view within 60 s: " + got.size() + " records read, " + withTombstone.size() + " expected: " + got);
                Thread.sleep(100); // the poll's interval
            }
            long compacted = System.currentTimeMillis() - start;
            while (!(got = view(topic, produced)).equals(without)) {
                check(got.equals(withTombstone), "view neither with nor without the tombstone: " + got);
                check(System.currentTimeMillis() - start < 64_000, "the tombstone is still there after " + (System.currentTimeMillis() - start) + " ms");
                Thread.sleep(100);
            }
            long gone = System.currentTimeMillis() - start;
            long again = p.send(new ProducerRecord<>(topic, 0, "meter-01", "again")).get(30, TimeUnit.SECONDS).offset();
            check(again == produced, "a record after compaction got offset " + again + ", not " + produced);
            System.out.println("compacted " + produced + " records to " + withTombstone + " in " + compacted
                    + " ms; the tombstone gone after " + gone + " ms");
        }
    }
}
