//! Latest-first catch-up, end to end (issue 17): a compacted topic's backlog, produced with
//! librdkafka while the receiver is down, drains under a bandwidth cap into `{site}.{topic}` (every
//! record once, in order), while `{site}.{topic}.live` gets the backlog's compacted view first, so
//! a central consumer (librdkafka) has the latest value of every key long before the history has
//! drained. The centre is a second Tributary; the mirror helpers are `mirror.rs`'s.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Offset;
use tributary_sync::MirrorConfig;

use crate::mirror::{assert_same_records, caught_up, cloud_config, mirror_config, Cloud, Mirror, Pki, SITE};
use crate::support::{client_config, consume, read_all, KafkaBroker};

const TOPIC: &str = "state";

/// Creates the compacted topic with librdkafka's admin client: compaction held off for the test
/// (`min.compaction.lag.ms` an hour, mirrored to the centre too), so both ends keep every record.
async fn compacted_topic(bootstrap: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap).create().expect("admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let topic = NewTopic::new(TOPIC, partitions, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact")
        .set("min.compaction.lag.ms", "3600000");
    let r = admin.create_topics([&topic], &opts).await.expect("create");
    assert!(r[0].is_ok(), "{r:?}");
}

/// The two brokers (the centre, the gateway with the compacted topic of `partitions`) and the
/// certificates.
async fn brokers(partitions: i32) -> (Pki, KafkaBroker, KafkaBroker) {
    let pki = Pki::new();
    let central = KafkaBroker::start().await;
    let gateway = KafkaBroker::start().await;
    compacted_topic(&gateway.bootstrap(), partitions).await;
    (pki, central, gateway)
}

/// The receiver in front of `central`, and a mirror config sending TOPIC latest-first under a cap
/// of `cap` B/s (fresh age 100 ms: a backlog is seen at once).
fn centre(pki: &Pki, central: &KafkaBroker, cap: u64) -> (Cloud, MirrorConfig) {
    let cloud = Cloud::start(cloud_config(pki, central, "127.0.0.1:0".parse().expect("addr")));
    let mut mcfg = mirror_config(pki, cloud.addr, pki.site("site", SITE, None));
    mcfg.topics = vec![TOPIC.into()];
    mcfg.urgent_topics = Vec::new();
    mcfg.bandwidth_bytes_per_s_max = cap;
    mcfg.read_bytes_max = 16 * 1024;
    mcfg.latest_first_topics = vec![TOPIC.into()];
    mcfg.fresh_age_ms = 100;
    // Batches as stored: the cap is sized for the stored bytes, so that the history drains long
    // after the view; zstd on the wire (41% fewer bytes) would drain it before the view is done.
    mcfg.wire_compression = tributary_sync::config::WireCompression::None;
    (cloud, mcfg)
}

/// Produces `(key, value)` in order into `partition` with librdkafka (at most `per_batch` records
/// a batch); key -> (offset, value) of its latest record, and the records produced.
async fn produce(
    bootstrap: &str,
    partition: i32,
    records: impl Iterator<Item = (String, Option<String>)>,
    compression: &str,
    per_batch: usize,
) -> (BTreeMap<String, (i64, Option<String>)>, usize) {
    let producer: FutureProducer = client_config(bootstrap)
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("compression.type", compression)
        .set("batch.num.messages", per_batch.to_string())
        .set("max.in.flight.requests.per.connection", "1")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    let mut latest = BTreeMap::new();
    let mut n = 0;
    let records: Vec<_> = records.collect();
    for chunk in records.chunks(500) {
        let sends = chunk.iter().map(|(key, value)| {
            let mut r: FutureRecord<'_, str, str> = FutureRecord::to(TOPIC).partition(partition).key(key);
            if let Some(v) = value {
                r = r.payload(v);
            }
            producer.send(r, Duration::from_secs(30))
        });
        for ((key, value), sent) in chunk.iter().zip(futures_util::future::join_all(sends).await) {
            let offset = sent.expect("produced").offset;
            latest.insert(key.clone(), (offset, value.clone()));
            n += 1;
        }
    }
    (latest, n)
}

fn source_offset(m: &OwnedMessage) -> i64 {
    let h = m.headers().expect("provenance headers");
    let v = h.iter().find(|h| h.key == "tributary.offset").and_then(|h| h.value).expect("tributary.offset");
    std::str::from_utf8(v).expect("utf-8").parse().expect("number")
}

/// What a central consumer of the preview ends with: per key, the record with the highest
/// source offset (its value; `None` for a tombstone).
fn preview_state(preview: &[OwnedMessage]) -> BTreeMap<String, (i64, Option<String>)> {
    let mut out = BTreeMap::new();
    for m in preview {
        let key = String::from_utf8(m.key().expect("keyed").to_vec()).expect("utf-8");
        let value = m.payload().map(|v| String::from_utf8_lossy(v).into_owned());
        let offset = source_offset(m);
        let e = out.entry(key).or_insert((offset, value.clone()));
        if offset >= e.0 {
            *e = (offset, value);
        }
    }
    out
}

async fn consume_async(bootstrap: String, topic: String, partition: i32, count: usize) -> Vec<OwnedMessage> {
    tokio::task::spawn_blocking(move || consume(&bootstrap, &topic, partition, Offset::Beginning, count))
        .await
        .expect("consumer task")
}

/// 60 meters x 80 readings (each round of readings after the last, the last round with a
/// tombstone for one meter) produced while the receiver is down, then mirrored at 16 KiB/s: the
/// preview holds exactly the latest record of every meter (the compacted view, tombstone
/// included) while `{site}.state` has not yet half drained; then `{site}.state` holds every
/// record once, in order, and the preview each of its records once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_centre_has_every_key_s_latest_value_from_the_preview_long_before_the_history_drains() {
    const KEYS: usize = 60;
    const VERSIONS: usize = 80;
    let (pki, central, gateway) = brokers(1).await;
    let readings = (0..VERSIONS).flat_map(|v| {
        (0..KEYS).map(move |k| {
            let tombstone = v == VERSIONS - 1 && k == 7;
            (format!("meter-{k:03}"), (!tombstone).then(|| format!("{{\"kwh\":{},\"reading\":{v}}}", k * 1_000 + v)))
        })
    });
    let (latest, produced) = produce(&gateway.bootstrap(), 0, readings, "none", 100).await;
    assert_eq!(latest.len(), KEYS);

    let (cloud, mcfg) = centre(&pki, &central, 16 * 1024);
    let started = Instant::now();
    let mirror = Mirror::start(mcfg, &gateway.store);

    // A central consumer of the preview: the latest record of each key, nothing else.
    let preview = consume_async(central.bootstrap(), format!("{SITE}.{TOPIC}.live"), 0, KEYS).await;
    let current_s = started.elapsed().as_secs_f64();
    let ordered_then = central.store.watermarks(&format!("{SITE}.{TOPIC}"), 0).map_or(0, |w| w.high_watermark);
    assert_eq!(preview_state(&preview), latest, "the latest value (or tombstone) of every key");
    let offsets: Vec<i64> = preview.iter().map(source_offset).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in offset order, each once: {offsets:?}");
    assert!(
        (ordered_then as usize) < produced / 2,
        "the current state came before half the history: {ordered_then} of {produced} records in {SITE}.{TOPIC}"
    );

    mirror.until("the history drained", 120, |_| caught_up(&gateway.store, &[TOPIC])).await;
    let drain_s = started.elapsed().as_secs_f64();
    let parts = central.store.topic(&format!("{SITE}.{TOPIC}")).map(|t| t.partitions as i32);
    assert_same_records(&gateway.store, TOPIC, parts, |p| read_all(&central.store, &format!("{SITE}.{TOPIC}"), p));
    // The preview got nothing more: no fresh records came, and each of its records once.
    let all = read_all(&central.store, &format!("{SITE}.{TOPIC}.live"), 0);
    assert_eq!(all.len(), KEYS, "the preview holds the view only");
    let s = &mirror.stats;
    assert_eq!(s.latest_views_done.load(Ordering::Relaxed), 1);
    assert_eq!(s.latest_view_records_sent.load(Ordering::Relaxed), KEYS as u64);
    assert_eq!(
        (s.latest_view_windows.load(Ordering::Relaxed), s.latest_view_keys.load(Ordering::Relaxed)),
        (1, KEYS as u64)
    );
    eprintln!(
        "latest-first: {produced} records of {KEYS} keys; current state at the centre after {current_s:.2} s \
         ({ordered_then} records of the history there then), history drained after {drain_s:.1} s; \
         view {} ms, {} bytes",
        s.latest_view_last_ms.load(Ordering::Relaxed),
        s.latest_view_bytes_sent.load(Ordering::Relaxed),
    );
    mirror.stop().await;
    cloud.stop().await;
}

/// 400 keys of 10 versions each (each key's versions together, lz4 batches of 20 records) with a
/// key map of 4 KiB (about 50 keys): the view goes in windows, each the compacted view of its
/// part, and the preview still ends with the latest value of every key, each record once, far
/// fewer records than the history; `{site}.state` gets every record once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_whose_keys_overflow_the_map_goes_in_windows_and_still_ends_in_every_key_s_latest_value() {
    const KEYS: usize = 400;
    const VERSIONS: usize = 10;
    let (pki, central, gateway) = brokers(1).await;
    let readings = (0..KEYS).flat_map(|k| {
        (0..VERSIONS).map(move |v| (format!("meter-{k:03}"), Some(format!("{{\"kwh\":{}}}", k * 100 + v))))
    });
    let (latest, produced) = produce(&gateway.bootstrap(), 0, readings, "lz4", 20).await;

    let (cloud, mut mcfg) = centre(&pki, &central, 8 * 1024);
    mcfg.latest_first_map_bytes_max = 4 * 1024;
    let mirror = Mirror::start(mcfg, &gateway.store);
    mirror.until("the view sent", 120, |s| s.latest_views_done.load(Ordering::Relaxed) >= 1).await;
    let s = &mirror.stats;
    let sent = s.latest_view_records_sent.load(Ordering::Relaxed) as usize;
    let windows = s.latest_view_windows.load(Ordering::Relaxed);
    let preview = consume_async(central.bootstrap(), format!("{SITE}.{TOPIC}.live"), 0, sent).await;
    let offsets: Vec<i64> = preview.iter().map(source_offset).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in offset order, each once");
    // The view covers what the ordered stream had not sent when it began (its burst went
    // first): every key whose latest record is from there on has that value on the preview; the
    // others were sent, in order, before the view's first record.
    let state = preview_state(&preview);
    let first = offsets.first().copied().expect("a preview");
    for (key, want) in &latest {
        match state.get(key) {
            Some(got) => assert_eq!(got, want, "{key}: its latest value"),
            None => assert!(want.0 < first, "{key}: latest at {} not on the preview (from {first})", want.0),
        }
    }
    assert!(state.len() > KEYS / 2, "{} keys on the preview", state.len());
    assert!(windows > 1, "the keys overflowed the map: {windows} windows");
    assert!(sent < produced / 3, "{sent} records of {produced}: each window compacted");
    mirror.until("the history drained", 180, |_| caught_up(&gateway.store, &[TOPIC])).await;
    let parts = central.store.topic(&format!("{SITE}.{TOPIC}")).map(|t| t.partitions as i32);
    assert_same_records(&gateway.store, TOPIC, parts, |p| read_all(&central.store, &format!("{SITE}.{TOPIC}"), p));
    eprintln!("latest-first in {windows} windows: {sent} preview records for {produced} produced of {KEYS} keys");
    mirror.stop().await;
    cloud.stop().await;
}

/// Two partitions with a backlog each and `mirror.latest_first_views_max` = 1: the views take
/// turns (never two key maps at once), and each partition's preview ends with every key's latest
/// value. Then, in the same session once the history has drained, a second backlog: each
/// partition gets a second view (not only the first backlog of a session), from where its
/// preview ended, so the preview holds every key's newest value again, each record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_take_turns_within_latest_first_views_max_and_a_later_backlog_in_the_same_session_gets_its_own_view() {
    const KEYS: usize = 1_000;
    const PARTITIONS: i32 = 2;
    let (pki, central, gateway) = brokers(PARTITIONS).await;
    // Rounds of readings (every key once a round): each key's latest is in the last round.
    let rounds = |p: i32, rounds: std::ops::Range<usize>| {
        rounds.flat_map(move |v| (0..KEYS).map(move |k| (format!("p{p}-meter-{k:02}"), Some(format!("{{\"r\":{v}}}")))))
    };
    let mut latest = Vec::new();
    for p in 0..PARTITIONS {
        latest.push(produce(&gateway.bootstrap(), p, rounds(p, 0..3), "none", 500).await.0);
    }

    let (cloud, mut mcfg) = centre(&pki, &central, 16 * 1024);
    mcfg.latest_first_views_max = 1;
    let mirror = Mirror::start(mcfg, &gateway.store);
    // The most views seen running at once (sampled every millisecond: a view sends its 1,000
    // records, about 30 KB, beyond the cap's burst at the live share, for a second or more).
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (stats, peak) = (mirror.stats.clone(), peak.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            loop {
                tick.tick().await;
                peak.fetch_max(stats.latest_views_running.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        })
    };
    mirror.until("both views sent", 120, |s| s.latest_views_done.load(Ordering::Relaxed) >= 2).await;
    mirror.until("the history drained", 120, |_| caught_up(&gateway.store, &[TOPIC])).await;
    for (p, want) in latest.iter().enumerate() {
        let preview = consume_async(central.bootstrap(), format!("{SITE}.{TOPIC}.live"), p as i32, KEYS).await;
        assert_eq!(&preview_state(&preview), want, "partition {p}: every key's latest value");
    }

    // The link kept up; now a second backlog in the same session (more than the cap's burst,
    // drained at the cap for seconds).
    for (p, want) in latest.iter_mut().enumerate() {
        want.extend(produce(&gateway.bootstrap(), p as i32, rounds(p as i32, 3..5), "none", 500).await.0);
    }
    mirror.until("a view for the second backlog too", 120, |s| s.latest_views_done.load(Ordering::Relaxed) >= 4).await;
    mirror.until("the history drained again", 120, |_| caught_up(&gateway.store, &[TOPIC])).await;
    for (p, want) in latest.iter().enumerate() {
        let preview = consume_async(central.bootstrap(), format!("{SITE}.{TOPIC}.live"), p as i32, 2 * KEYS).await;
        assert_eq!(&preview_state(&preview), want, "partition {p}: every key's newest value");
        let offsets: Vec<i64> = preview.iter().map(source_offset).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "partition {p}: each record once: {offsets:?}");
        assert_eq!(read_all(&central.store, &format!("{SITE}.{TOPIC}.live"), p as i32).len(), 2 * KEYS);
    }
    let parts = Some(PARTITIONS);
    assert_same_records(&gateway.store, TOPIC, parts, |p| read_all(&central.store, &format!("{SITE}.{TOPIC}"), p));
    sampler.abort();
    assert_eq!(peak.load(Ordering::Relaxed), 1, "one view (one key map) at a time");
    assert_eq!(mirror.stats.latest_views_running.load(Ordering::Relaxed), 0);
    mirror.stop().await;
    cloud.stop().await;
}
