// Kafka's own offset translation over what tributary-cloud wrote: RemoteClusterUtils.translateOffsets
// (connect-mirror-client) reads the "{site}.checkpoints.internal" topic, decoding each record with
// Checkpoint.deserializeRecord, exactly as for MirrorMaker 2's checkpoints. Run by
// tests/it/mirror_checkpoints.rs as a single source file against the Kafka jars:
//
//   java -cp 'JARS/*' TranslateOffsets.java BOOTSTRAP SITE GROUP
//
// Prints one line per remote partition, "TOPIC PARTITION OFFSET", sorted.

import java.time.Duration;
import java.util.*;

import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.connect.mirror.RemoteClusterUtils;

public class TranslateOffsets {
    public static void main(String[] args) throws Exception {
        Map<String, Object> props = new HashMap<>();
        props.put("bootstrap.servers", args[0]);
        Map<TopicPartition, OffsetAndMetadata> offsets =
            RemoteClusterUtils.translateOffsets(props, args[1], args[2], Duration.ofSeconds(30));
        List<String> lines = new ArrayList<>();
        for (Map.Entry<TopicPartition, OffsetAndMetadata> e : offsets.entrySet()) {
            lines.add(e.getKey().topic() + " " + e.getKey().partition() + " " + e.getValue().offset());
        }
        Collections.sort(lines);
        for (String l : lines) {
            System.out.println(l);
        }
    }
}
