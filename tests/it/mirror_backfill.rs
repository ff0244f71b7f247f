//! Backfill on request, end to end (issue 19 item 4): `tributary mirror backfill` (the real
//! command, over the gateway's Kafka listener) asks for a time range of a topic the mirror keeps
//! local; the range reaches `{site}.{topic}` in the central cluster, read there by a Kafka
//! consumer, each record once: through an overlapping request, a request below what the centre
//! holds (refused for that part, counted), a request for a mirrored topic (refused), a restart
//! of the mirror (the stored requests are not sent again) and a range retention deleted before
//! it went (done, counted, nothing sent).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use tributary_broker::storage::batch::NewRecord;
use tributary_broker::TopicConfig;
use tributary_sync::backfill::driver::BackfillStatus;
use tributary_sync::gateway::MirrorStats;

use crate::mirror::{cloud_config, mirror_config, Cloud, Mirror, Pki, SITE};
use crate::support::{read_all, KafkaBroker};

const PARTITIONS: i32 = 2;

/// Record `i` of a partition of `raw`: stamped `t0 + i` seconds, in batches of 10.
async fn fill(store: &tributary_broker::Store, t0: i64, n: i64) {
    for p in 0..PARTITIONS {
        for first in (0..n).step_by(10) {
            let batch = (first..first + 10)
                .map(|i| {
                    let mut r = NewRecord::new(Some(Bytes::from(format!("m{p}"))), Bytes::from(format!("p{p} i{i}")));
                    r.timestamp_ms = Some(t0 + i * 1_000);
                    r
                })
                .collect();
            store.append_records("raw", p, batch).await.expect("append");
        }
    }
}

fn backfill(gateway: &KafkaBroker, topic: &str, from_ms: i64, to_ms: i64) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .args(["mirror", "backfill", topic, "--from", &from_ms.to_string(), "--to", &to_ms.to_string()])
        .args(["--bootstrap-server", &gateway.addr.to_string()])
        .output()
        .expect("run tributary");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tributary mirror backfill failed: {stderr}");
    stdout.into_owned()
}

fn request(stats: &MirrorStats, topic: &str, from_ms: i64) -> Option<BackfillStatus> {
    stats.backfills.status().into_iter().find(|b| b.topic == topic && b.from_ms == from_ms)
}

/// The records of `{site}.raw` in the centre, per partition: each one's `i` (from its value) and
/// its provenance offset.
fn central_raw(central: &KafkaBroker) -> Vec<Vec<(i64, i64)>> {
    (0..PARTITIONS)
        .map(|p| {
            read_all(&central.store, &format!("{SITE}.raw"), p)
                .iter()
                .map(|r| {
                    let v = String::from_utf8(r.value.as_deref().expect("value").to_vec()).expect("utf-8");
                    let i: i64 = v.rsplit_once(" i").expect("i").1.parse().expect("number");
                    let o = r.headers.iter().find(|(k, _)| k == "tributary.offset").and_then(|(_, v)| v.clone());
                    (i, String::from_utf8(o.expect("offset").to_vec()).expect("utf-8").parse().expect("number"))
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfilled_range_of_a_local_topic_reaches_the_centre_once_through_overlaps_and_a_restart() {
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    gateway.store.create_topic("meters", 1, TopicConfig::default()).await.expect("meters");
    gateway.store.create_topic("raw", PARTITIONS as u32, TopicConfig::default()).await.expect("raw");
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64
        - 3 * 3_600_000;
    fill(&gateway.store, t0, 300).await;
    let cloud = Cloud::start(cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr")));
    let mut cfg = mirror_config(&pki, cloud.addr, pki.site("site", SITE, None));
    cfg.topics = vec!["meters".into()];
    cfg.urgent_topics = Vec::new();
    let mirror = Mirror::start(cfg.clone(), &gateway.store);
    mirror.until("the link up", 30, |s| s.link_up.load(Ordering::Relaxed)).await;
    assert!(central.store.topic(&format!("{SITE}.raw")).is_none(), "a local topic stays local");

    // Seconds 100..150: records 100..149 of each partition.
    let out = backfill(&gateway, "raw", t0 + 100_000, t0 + 150_000);
    assert!(out.contains("backfill request"), "{out}");
    mirror
        .until("the first range sent", 60, |s| {
            request(s, "raw", t0 + 100_000).is_some_and(|b| b.total > 0 && b.sent == b.total)
        })
        .await;
    let b = request(&mirror.stats, "raw", t0 + 100_000).expect("request");
    assert_eq!((b.total, b.below, b.refused), (100, 0, None));
    // A Kafka consumer in the centre reads them.
    let msgs =
        crate::support::consume(&central.addr.to_string(), &format!("{SITE}.raw"), 1, rdkafka::Offset::Beginning, 50);
    let first = rdkafka::Message::payload(&msgs[0]).map(|p| String::from_utf8_lossy(p).into_owned());
    let last = rdkafka::Message::payload(&msgs[49]).map(|p| String::from_utf8_lossy(p).into_owned());
    assert_eq!((first.as_deref(), last.as_deref()), (Some("p1 i100"), Some("p1 i149")));

    // Overlapping: 130..200 adds 150..199 only. Below: 20..40 lies under what the centre holds.
    // The mirrored topic: refused.
    backfill(&gateway, "raw", t0 + 130_000, t0 + 200_000);
    backfill(&gateway, "raw", t0 + 20_000, t0 + 40_000);
    backfill(&gateway, "meters", t0, t0 + 1_000);
    mirror
        .until("the requests decided and sent", 60, |s| {
            let (a, b, c) = (request(s, "raw", t0 + 130_000), request(s, "raw", t0 + 20_000), request(s, "meters", t0));
            a.is_some_and(|a| a.sent == a.total) && b.is_some() && c.is_some()
        })
        .await;
    let overlap = request(&mirror.stats, "raw", t0 + 130_000).expect("overlap");
    assert_eq!((overlap.total, overlap.below), (140, 0), "its range, 70 per partition, the overlap counted as its own");
    let below = request(&mirror.stats, "raw", t0 + 20_000).expect("below");
    assert_eq!((below.total, below.sent, below.below, below.refused), (0, 0, 40, None));
    let mirrored = request(&mirror.stats, "meters", t0).expect("mirrored");
    assert!(mirrored.refused.as_deref().is_some_and(|r| r.contains("mirrored")), "{mirrored:?}");

    // A restart: the stored requests are loaded, nothing goes twice; a new one goes.
    mirror.stop().await;
    let mirror = Mirror::start(cfg, &gateway.store);
    backfill(&gateway, "raw", t0 + 250_000, t0 + 260_000);
    mirror
        .until("the request after the restart sent", 60, |s| {
            request(s, "raw", t0 + 250_000).is_some_and(|b| b.total > 0 && b.sent == b.total)
        })
        .await;
    assert_eq!(mirror.stats.backfills.status().len(), 5, "every request kept across the restart");

    // Retention takes a range after it was accepted, before it went (the receiver down): none of
    // it reaches the centre, and the request is done, its slot free (it was held for good).
    let cloud_cfg = cloud_config(&pki, &central, cloud.addr);
    cloud.stop().await;
    mirror.until("the link seen down", 30, |s| !s.link_up.load(Ordering::Relaxed)).await;
    backfill(&gateway, "raw", t0 + 270_000, t0 + 290_000);
    mirror.until("the request accepted", 60, |s| request(s, "raw", t0 + 270_000).is_some_and(|b| b.total == 40)).await;
    for p in 0..PARTITIONS {
        gateway.store.delete_records("raw", p, 295).await.expect("retention");
    }
    let cloud = Cloud::restart(cloud_cfg).await;
    mirror
        .until("the deleted range settled", 60, |s| {
            request(s, "raw", t0 + 270_000).is_some_and(|b| b.deleted == b.total)
        })
        .await;
    let gone = request(&mirror.stats, "raw", t0 + 270_000).expect("kept");
    assert_eq!((gone.sent, gone.deleted, gone.total, gone.refused), (0, 40, 40, None));
    for (p, records) in central_raw(&central).iter().enumerate() {
        let want: Vec<(i64, i64)> = (100..200).chain(250..260).map(|i| (i, i)).collect();
        assert_eq!(records, &want, "partition {p}: the ranges asked for, each once, in order");
    }
    mirror.stop().await;
    cloud.stop().await;
}
