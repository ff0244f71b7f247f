//! The chaos soak, short form (the harness is tests/src/soak.rs; the long form is the `soak`
//! binary): 45 s of well-behaved MQTT and Kafka traffic beside misbehaving clients, two SIGKILLs
//! and two disk faults of the real gateway binary. Every acknowledged record is in the log exactly
//! once and in order, subscribers and the consumer group got every one, the gateway kept
//! answering, and its RSS stayed under the stated ceiling. `TRIBUTARY_SOAK_SEED` repeats a run.

use std::path::PathBuf;

use tributary_tests::soak::{run, SoakConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak_loses_nothing_acknowledged_and_keeps_serving() {
    let seed = std::env::var("TRIBUTARY_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("soak seed {seed} (TRIBUTARY_SOAK_SEED={seed} repeats this schedule)");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg =
        SoakConfig::short(PathBuf::from(env!("CARGO_BIN_EXE_tributary-under-test")), dir.path().join("soak"), seed);
    let report = run(cfg).await.unwrap_or_else(|e| panic!("soak with seed {seed}: {e:#}"));
    eprintln!("{report}");
    assert!(report.kafka_acked > 1000 && report.mqtt_qos2_acked > 100, "the well-behaved clients got work done");
    for (name, n, _p50, p99, _max) in &report.latencies {
        assert!(*n > 10, "{name}: too few samples outside faults");
        assert!(*p99 < 1000.0, "{name}: p99 {p99:.1} ms outside faults");
    }
}
