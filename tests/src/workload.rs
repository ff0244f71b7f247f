//! The smart-meter workload appended to a gateway store ([`crate::SmartMeters`] readings on the
//! `meters` topic, lz4, concurrent appenders each waiting for durability), shared by the mirror
//! benchmarks, and the mirror's progress as the store sees it (the gateway's marks; a remote
//! topic followed in the central store, each record's age when it arrived there).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tributary_broker::partitioner::partition_for_key;
use tributary_broker::{Codec, StorageConfig, Store, TopicConfig};

use crate::{cpu_seconds, SmartMeters};

/// The source topic.
pub const TOPIC: &str = "meters";

/// One ingest phase: what was appended and how long until the last append was acknowledged.
#[derive(Debug, Default)]
pub struct Ingest {
    pub records: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
    pub secs: f64,
    pub cpu: f64,
    /// The store's group commits during the phase, and their total time.
    pub commits: u64,
    pub commit_micros: u64,
    /// Each append's time from the call to its durable acknowledgement (microseconds).
    pub latencies_us: Vec<u32>,
}

impl Ingest {
    pub fn rate(&self) -> f64 {
        self.records as f64 / self.secs
    }

    /// `N commits, R records/commit, T ms/commit`.
    pub fn commits(&self) -> String {
        commits(self.commits, self.commit_micros, self.records)
    }

    /// The `q` quantile (0..=1) of the append latencies, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        let Some(last) = l.len().checked_sub(1) else { return 0.0 };
        f64::from(l[((last as f64) * q).round() as usize]) / 1000.0
    }
}

pub fn commits(n: u64, micros: u64, records: u64) -> String {
    let n1 = n.max(1) as f64;
    format!("{n} commits, {:.0} records/commit, {:.2} ms/commit", records as f64 / n1, micros as f64 / n1 / 1000.0)
}

/// Appends `total` readings from the fleets (one appender task per fleet), `per_append` records
/// of one partition per append, each appender waiting for its append to be durable.
pub async fn ingest(
    store: &Store,
    fleets: &mut Vec<SmartMeters>,
    total: u64,
    per_append: usize,
    partitions: u32,
) -> anyhow::Result<Ingest> {
    ingest_at(store, fleets, total, per_append, partitions, None).await
}

/// [`ingest`], at most `records_per_s` records per second over all appenders (each keeps its
/// share of the schedule; one that falls behind appends at once until it catches up), so that
/// append latencies measure the store rather than a queue the benchmark built.
pub async fn ingest_at(
    store: &Store,
    fleets: &mut Vec<SmartMeters>,
    total: u64,
    per_append: usize,
    partitions: u32,
    records_per_s: Option<f64>,
) -> anyhow::Result<Ingest> {
    let n = fleets.len() as u64;
    let cpu = cpu_seconds("self");
    let stats = store.stats();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut fleet) in fleets.drain(..).enumerate() {
        let quota = total / n + u64::from((i as u64) < total % n);
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut buckets: Vec<Vec<_>> = (0..partitions).map(|_| Vec::with_capacity(per_append)).collect();
            let (mut keys, mut values) = (0u64, 0u64);
            let mut latencies = Vec::new();
            // This appender's share of the rate: one record every `gap`.
            let gap = records_per_s.map(|r| std::time::Duration::from_secs_f64(n as f64 / r));
            let mut sent = 0u32;
            for _ in 0..quota {
                let r = fleet.next_reading();
                let key = r.key.as_deref().unwrap_or_default();
                keys += key.len() as u64;
                values += r.value.as_ref().map_or(0, |v| v.len() as u64);
                let p = partition_for_key(key, partitions) as usize;
                buckets[p].push(r);
                if buckets[p].len() == per_append {
                    let batch = std::mem::replace(&mut buckets[p], Vec::with_capacity(per_append));
                    if let Some(gap) = gap {
                        tokio::time::sleep_until((start + gap * sent).into()).await;
                    }
                    sent += per_append as u32;
                    let t = Instant::now();
                    store.append_records(TOPIC, p as i32, batch).await?;
                    latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            for (p, batch) in buckets.into_iter().enumerate() {
                if !batch.is_empty() {
                    store.append_records(TOPIC, p as i32, batch).await?;
                }
            }
            anyhow::Ok((fleet, keys, values, latencies))
        }));
    }
    let mut out = Ingest { records: total, ..Ingest::default() };
    for t in tasks {
        let (fleet, keys, values, latencies) = t.await??;
        fleets.push(fleet);
        out.key_bytes += keys;
        out.value_bytes += values;
        out.latencies_us.extend(latencies);
    }
    out.secs = start.elapsed().as_secs_f64();
    out.cpu = cpu_seconds("self") - cpu;
    let now = store.stats();
    out.commits = now.commits - stats.commits;
    out.commit_micros = now.commit_micros_total - stats.commit_micros_total;
    Ok(out)
}

/// The fleet split among `appenders` (meter ids 0..meters), readings from `start_ms`.
pub fn fleets(meters: usize, appenders: usize, start_ms: i64, interval_ms: i64) -> Vec<SmartMeters> {
    let per = meters.div_ceil(appenders);
    (0..appenders)
        .map(|a| {
            let first = (a * per).min(meters);
            SmartMeters::new(first, per.min(meters - first).max(1), 42 + a as u64, start_ms, interval_ms)
        })
        .collect()
}

pub async fn open_store(dir: &Path, partitions: u32, topic: bool) -> anyhow::Result<Store> {
    let cfg = StorageConfig { data_dir: dir.to_path_buf(), max_bytes: 16 << 30, ..StorageConfig::default() };
    let (store, _) = tokio::task::spawn_blocking(move || Store::open(cfg)).await?.context("open store")?;
    if topic {
        store
            .create_topic(TOPIC, partitions, TopicConfig { compression: Codec::Lz4, ..TopicConfig::default() })
            .await?;
    }
    Ok(store)
}

/// Every partition confirmed mirrored up to its high watermark.
pub fn caught_up(store: &Store, partitions: u32) -> bool {
    (0..partitions as i32).all(|p| {
        let hw = store.watermarks(TOPIC, p).map_or(0, |w| w.high_watermark);
        store.archived(TOPIC, p).ok().flatten().unwrap_or(0) >= hw
    })
}

/// A mirrored record seen in a central store: its source offset (`tributary.offset`) and its age
/// (now minus its timestamp) when it was first seen there.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub offset: i64,
    pub age_ms: i64,
    pub at: Instant,
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Follows partition 0 of `remote` in `central` as records arrive (woken by its watermark watch;
/// it waits for the topic to be created), noting each record's source offset and age. Returns
/// what it saw once `stop` is set and it has read up to the high watermark.
pub fn follow(
    central: Store,
    remote: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<Seen>>> {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    tokio::spawn(async move {
        let mut topics = central.topics_changed();
        while central.topic(&remote).is_none() {
            if stop.load(Ordering::Relaxed) {
                return Ok(Vec::new());
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), topics.changed()).await;
        }
        let mut watch = central.watch(&remote, 0)?;
        let (mut next, mut seen) = (0, Vec::new());
        loop {
            let hw = central.watermarks(&remote, 0)?.high_watermark;
            if next < hw {
                let (records, after) = central.read_records_next(&remote, 0, next, 1 << 20)?;
                let (now, at) = (epoch_ms(), Instant::now());
                for r in &records {
                    let offset = r
                        .headers
                        .iter()
                        .find(|(k, _)| k == "tributary.offset")
                        .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok()?.parse().ok())
                        .context("a record without its provenance offset")?;
                    seen.push(Seen { offset, age_ms: now - r.timestamp, at });
                }
                next = after;
                continue;
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(seen);
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), watch.changed()).await;
        }
    })
}

/// The `p` quantile (0..=1) of sorted values, nearest rank (0 when empty).
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}
