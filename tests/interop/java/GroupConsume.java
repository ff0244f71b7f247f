// A consumer group member with Kafka's own Java client, on the gateway: subscribes to TOPIC in
// GROUP, commits (commitSync with the offsets after the records it processed) once it has read
// COMMIT_AFTER records, then reads READ_AFTER more that it never commits (the uncommitted tail a
// failover re-reads) and closes without committing. Run by tests/it/mirror_checkpoints.rs as a
// single source file against the Kafka jars:
//
//   java -cp 'JARS/*' GroupConsume.java BOOTSTRAP GROUP TOPIC COMMIT_AFTER READ_AFTER
//
// Prints "committed PARTITION OFFSET" and "read PARTITION NEXT_OFFSET" lines, sorted.

import java.time.Duration;
import java.util.*;

import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class GroupConsume {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put("bootstrap.servers", args[0]);
        props.put("group.id", args[1]);
        props.put("client.id", "java-group-consume");
        props.put("enable.auto.commit", "false");
        props.put("auto.offset.reset", "earliest");
        props.put("key.deserializer", ByteArrayDeserializer.class.getName());
        props.put("value.deserializer", ByteArrayDeserializer.class.getName());
        int commitAfter = Integer.parseInt(args[3]);
        int total = commitAfter + Integer.parseInt(args[4]);
        Map<TopicPartition, Long> next = new TreeMap<>(Comparator.comparing(TopicPartition::toString));
        Map<TopicPartition, OffsetAndMetadata> committed = new HashMap<>();
        long deadline = System.currentTimeMillis() + 60_000;
        int read = 0;
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
            consumer.subscribe(List.of(args[2]));
            while (read < total) {
                if (System.currentTimeMillis() > deadline) {
                    throw new IllegalStateException("read " + read + " of " + total + " records in 60 s");
                }
                for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(200))) {
                    if (read == total) {
                        break;
                    }
                    next.put(new TopicPartition(r.topic(), r.partition()), r.offset() + 1);
                    read++;
                    if (read == commitAfter) {
                        for (Map.Entry<TopicPartition, Long> e : next.entrySet()) {
                            committed.put(e.getKey(), new OffsetAndMetadata(e.getValue()));
                        }
                        consumer.commitSync(committed);
                    }
                }
            }
        }
        List<String> lines = new ArrayList<>();
        committed.forEach((tp, o) -> lines.add("committed " + tp.partition() + " " + o.offset()));
        next.forEach((tp, o) -> lines.add("read " + tp.partition() + " " + o));
        Collections.sort(lines);
        lines.forEach(System.out::println);
    }
}
