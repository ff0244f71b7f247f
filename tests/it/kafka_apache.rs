//! The Apache Kafka harness itself (`tributary_tests::kafka_cluster`), on one broker: it starts
//! from the fetched jars, Kafka's own `kafka-topics` tool and librdkafka both use it, a SIGKILLed
//! broker comes back on its data, and a stop is a clean exit. The three-broker cluster is used
//! by `mirror_kafka.rs`.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use tributary_tests::kafka_cluster::{KafkaCluster, KafkaOptions};

use crate::support::{client_config, consume};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_apache_kafka_broker_serves_tools_and_clients_and_survives_a_sigkill() {
    let mut kafka = tokio::task::block_in_place(|| KafkaCluster::start(KafkaOptions::default()))
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("one Apache Kafka broker serving in {:.1} s", kafka.started_in.as_secs_f64());
    let bootstrap = kafka.bootstrap();
    let created = kafka.jars().tool(
        "org.apache.kafka.tools.TopicCommand",
        &["--bootstrap-server", &bootstrap, "--create", "--topic", "t", "--partitions", "2"],
    );
    assert!(created.is_ok_and(|out| out.contains("Created topic t")), "kafka-topics --create");

    let producer: FutureProducer = client_config(&bootstrap).set("acks", "all").create().expect("producer");
    for i in 0..20 {
        let value = format!("v{i}");
        producer
            .send(FutureRecord::to("t").partition(1).key("k").payload(&value), Duration::from_secs(10))
            .await
            .expect("produced");
    }
    drop(producer);
    // Kafka acknowledged from the page cache, which a SIGKILL of the process does not lose.
    tokio::task::block_in_place(|| {
        kafka.kill(1)?;
        kafka.restart(1)?;
        kafka.wait_in_sync("t", 1, Duration::from_secs(60))
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let got = tokio::task::block_in_place(|| consume(&bootstrap, "t", 1, rdkafka::Offset::Beginning, 20));
    let values: Vec<_> = got.iter().map(|m| rdkafka::Message::payload(m).map(<[u8]>::to_vec)).collect();
    assert_eq!(values, (0..20).map(|i| Some(format!("v{i}").into_bytes())).collect::<Vec<_>>());
    tokio::task::block_in_place(|| kafka.stop()).expect("a clean stop");
}
