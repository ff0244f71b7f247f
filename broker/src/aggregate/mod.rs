//! Aggregation at the edge: each `[[aggregate]]` entry is a task turning a source topic of JSON
//! readings into a derived topic of per-key tumbling-window results, emitted once per window
//! when it closes, exactly once across crashes: the results of a step are appended in the same
//! commit as the aggregator's state (open windows, input position, stream time) that says they
//! were emitted (`Store::enqueue_records_with`). The window rules live in `window` (no I/O).

pub mod config;
pub mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::storage::batch::{NewRecord, StoredRecord};
use crate::storage::{KvSpace, Store, StoreError, TopicConfig};
pub use config::{validate_all, validate_with_storage, AggregateConfig};
use window::{Closed, Offer, WindowSpec, WindowState, Windows};

const SPACE: KvSpace = crate::spaces::AGGREGATES;

/// Stored entries read per page at start-up (each page its own read transaction).
const RESTORE_PAGE: usize = 1024;
/// Wait after a store error before the aggregator restarts from its stored state.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Counters of one aggregate, for `/metrics`.
#[derive(Debug, Default)]
pub struct AggregateStats {
    pub source: String,
    pub derived: String,
    /// Source records read.
    pub records_in: AtomicU64,
    /// Records skipped: not a JSON object, a field missing or not a number, no usable key or
    /// event time, larger than `record_bytes_max`.
    pub skipped_invalid: AtomicU64,
    /// Records whose window had closed (event time before window end + lateness by stream time).
    pub skipped_late: AtomicU64,
    /// Records dropped because `windows_open_max` windows were open and theirs was not.
    pub skipped_windows_full: AtomicU64,
    /// Source offsets retention removed before the aggregator read them.
    pub skipped_retention: AtomicU64,
    /// Windows open now.
    pub windows_open: AtomicU64,
    /// Results appended to the derived topic.
    pub results_out: AtomicU64,
    /// The stored position: the sum over source partitions of the next offset to read, as of
    /// the last commit of the state (an emission or a checkpoint).
    pub position_stored: AtomicU64,
}

impl AggregateStats {
    fn new(cfg: &AggregateConfig) -> Self {
        Self { source: cfg.source.clone(), derived: cfg.derived.clone(), ..Default::default() }
    }
}

/// Prefix of every stored entry of the aggregate deriving `derived`: topic names hold no NUL,
/// so prefixes of two aggregates never overlap.
fn prefix(derived: &str, tag: u8) -> Vec<u8> {
    let mut k = derived.as_bytes().to_vec();
    k.push(0);
    k.push(tag);
    k
}

const TAG_POSITION: u8 = b'p';
const TAG_WINDOW: u8 = b'w';

/// A window's stored key: prefix, start (big-endian, sign bit flipped so keys sort by time), key.
fn window_key(derived: &str, start_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = prefix(derived, TAG_WINDOW);
    k.extend_from_slice(&((start_ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// Where the aggregator stands: the stream time and, per source partition, the next offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Position {
    stream_ms: Option<i64>,
    next: Vec<i64>,
}

impl Position {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * (1 + self.next.len()));
        out.extend_from_slice(&self.stream_ms.unwrap_or(i64::MIN).to_be_bytes());
        for n in &self.next {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() % 8 != 0 || bytes.is_empty() {
            return None;
        }
        let mut words = bytes.chunks_exact(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            i64::from_be_bytes(w)
        });
        let stream = words.next()?;
        Some(Self { stream_ms: (stream != i64::MIN).then_some(stream), next: words.collect() })
    }
}

/// Why a source record is not a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    Invalid,
}

/// A record's reading under `cfg`: its device key, event time and field values.
fn reading(cfg: &AggregateConfig, r: &StoredRecord) -> Result<(Vec<u8>, i64, Vec<f64>), Skip> {
    let value = r.value.as_deref().ok_or(Skip::Invalid)?;
    if value.len() > cfg.record_bytes_max as usize {
        return Err(Skip::Invalid);
    }
    let serde_json::Value::Object(obj) = serde_json::from_slice(value).map_err(|_| Skip::Invalid)? else {
        return Err(Skip::Invalid);
    };
    let key = if cfg.key_field.is_empty() {
        r.key.as_deref().ok_or(Skip::Invalid)?.to_vec()
    } else {
        match obj.get(&cfg.key_field) {
            Some(serde_json::Value::String(s)) => s.as_bytes().to_vec(),
            Some(serde_json::Value::Number(n)) => n.to_string().into_bytes(),
            _ => return Err(Skip::Invalid),
        }
    };
    if key.len() > cfg.key_bytes_max as usize {
        return Err(Skip::Invalid);
    }
    let event_ms = if cfg.time_field.is_empty() {
        r.timestamp
    } else {
        obj.get(&cfg.time_field).and_then(serde_json::Value::as_i64).ok_or(Skip::Invalid)?
    };
    let values = cfg
        .fields
        .iter()
        .map(|f| obj.get(f).and_then(serde_json::Value::as_f64).ok_or(Skip::Invalid))
        .collect::<Result<Vec<f64>, Skip>>()?;
    Ok((key, event_ms, values))
}

/// A closed window as the derived topic's record: key = device key, timestamp = window end,
/// value = `{"window_start", "window_end", "count", "fields": {name: {min, max, mean, last}}}`.
fn result_record(cfg: &AggregateConfig, c: &Closed) -> NewRecord {
    let mut fields = serde_json::Map::new();
    for (name, f) in cfg.fields.iter().zip(&c.state.fields) {
        fields.insert(
            name.clone(),
            serde_json::json!({"min": f.min, "max": f.max, "mean": f.sum / c.state.count as f64, "last": f.last}),
        );
    }
    let value = serde_json::json!({
        "window_start": c.start_ms,
        "window_end": c.end_ms,
        "count": c.state.count,
        "fields": fields,
    });
    NewRecord {
        key: Some(Bytes::copy_from_slice(&c.key)),
        value: Some(Bytes::from(value.to_string())),
        headers: Vec::new(),
        timestamp_ms: Some(c.end_ms),
    }
}

/// One aggregate's running state.
#[derive(Debug)]
struct Aggregator {
    cfg: AggregateConfig,
    store: Store,
    stats: Arc<AggregateStats>,
    windows: Windows,
    position: Position,
    /// Records read since the last checkpoint.
    unsaved: u64,
    saved_at: Instant,
    /// Steps taken (the partition a step starts at).
    turn: usize,
}

/// Runs the aggregate `cfg` until `stop` resolves: creates the derived topic (one partition,
/// `topic`'s settings) if absent, restores the stored state, then follows the source. A store
/// error restarts it from the stored state after a pause.
pub async fn run(
    cfg: AggregateConfig,
    store: Store,
    topic: TopicConfig,
    stats: Arc<AggregateStats>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let attempt = async {
            let mut agg = Aggregator::restore(cfg.clone(), store.clone(), topic.clone(), stats.clone()).await?;
            agg.follow().await
        };
        tokio::select! {
            _ = &mut stop => return,
            r = attempt => {
                if let Err(e) = r {
                    tracing::warn!(derived = %cfg.derived, error = %e, "aggregator stopped; restarting from its stored state");
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(RETRY_DELAY) => {}
        }
    }
}

/// Starts one task per entry; returns their counters (for `/metrics`) and join handles.
pub fn spawn_all(
    entries: &[AggregateConfig],
    store: &Store,
    topic: &TopicConfig,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<Arc<AggregateStats>>, Vec<tokio::task::JoinHandle<()>>) {
    let mut stats = Vec::new();
    let mut tasks = Vec::new();
    for cfg in entries {
        let s = Arc::new(AggregateStats::new(cfg));
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(run(cfg.clone(), store.clone(), topic.clone(), s.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
        stats.push(s);
    }
    (stats, tasks)
}

impl Aggregator {
    async fn restore(
        cfg: AggregateConfig,
        store: Store,
        topic: TopicConfig,
        stats: Arc<AggregateStats>,
    ) -> Result<Self, StoreError> {
        match store.create_topic(&cfg.derived, 1, topic).await {
            Ok(()) | Err(StoreError::TopicExists(_)) => {}
            Err(e) => return Err(e),
        }
        let spec = WindowSpec { size_ms: cfg.window_ms as i64, lateness_ms: cfg.lateness_ms as i64 };
        let mut windows = Windows::new(spec, cfg.fields.len(), cfg.windows_open_max as usize);
        let pos_key = prefix(&cfg.derived, TAG_POSITION);
        let position = {
            let (s, k) = (store.clone(), pos_key.clone());
            let stored = blocking(move || s.kv_get(SPACE, &k)).await?;
            stored.and_then(|b| Position::decode(&b)).unwrap_or_default()
        };
        windows.restore_stream_time(position.stream_ms);
        // The stored windows, a page (one read transaction) at a time.
        let wprefix = prefix(&cfg.derived, TAG_WINDOW);
        let mut from = wprefix.clone();
        loop {
            let (s, f) = (store.clone(), from.clone());
            let page = blocking(move || s.kv_scan_from(SPACE, &f, RESTORE_PAGE)).await?;
            let full = page.len() == RESTORE_PAGE;
            for (k, v) in &page {
                if !k.starts_with(&wprefix) {
                    break;
                }
                let rest = &k[wprefix.len()..];
                let (Some(start), Some(state)) = (
                    rest.get(..8).map(|b| {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(b);
                        (u64::from_be_bytes(w) ^ (1 << 63)) as i64
                    }),
                    WindowState::decode(v, cfg.fields.len()),
                ) else {
                    // Written under other `fields`: its result cannot be computed; dropped.
                    tracing::warn!(derived = %cfg.derived, "stored window of another field list dropped");
                    continue;
                };
                windows.restore(start, rest[8..].to_vec(), state);
            }
            match page.last() {
                Some((k, _)) if full && k.starts_with(&wprefix) => {
                    from = k.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        stats.windows_open.store(windows.open_count() as u64, Ordering::Relaxed);
        tracing::info!(source = %cfg.source, derived = %cfg.derived, windows_open = windows.open_count(),
            stream_ms = ?position.stream_ms, "aggregator resumed");
        Ok(Self { cfg, store, stats, windows, position, unsaved: 0, saved_at: Instant::now(), turn: 0 })
    }

    /// The stored-state writes for what changed since the last checkpoint, position included.
    fn changes(&mut self) -> Vec<(KvSpace, Vec<u8>, Option<Vec<u8>>)> {
        let derived = &self.cfg.derived;
        let mut kv: Vec<_> = self
            .windows
            .take_changes()
            .into_iter()
            .map(|(start, key, state)| (SPACE, window_key(derived, start, &key), state.map(|s| s.encode())))
            .collect();
        self.position.stream_ms = self.windows.stream_ms();
        kv.push((SPACE, prefix(derived, TAG_POSITION), Some(self.position.encode())));
        kv
    }

    /// Notes that the state `changes` returned is durable.
    fn stored(&mut self) {
        self.unsaved = 0;
        self.saved_at = Instant::now();
        let sum: i64 = self.position.next.iter().sum();
        self.stats.position_stored.store(sum.max(0) as u64, Ordering::Relaxed);
    }

    /// Follows the source: steps of at most `records_per_step_max` records, each followed by
    /// the results it closed (appended with the state) and, when due, a checkpoint.
    async fn follow(&mut self) -> Result<(), StoreError> {
        let mut topics = self.store.topics_changed();
        loop {
            let read = self.step().await?;
            self.emit().await?;
            let due = self.saved_at.elapsed() >= Duration::from_millis(self.cfg.checkpoint_interval_ms);
            if self.unsaved > 0 && due {
                self.checkpoint().await?;
            }
            if read > 0 {
                tokio::task::yield_now().await;
                continue;
            }
            // Nothing to read: wait for an append to a source partition, a new topic or
            // partition, or the checkpoint due.
            let wait = if self.unsaved > 0 {
                Duration::from_millis(self.cfg.checkpoint_interval_ms)
            } else {
                Duration::from_secs(3600)
            };
            let partitions = self.store.topic(&self.cfg.source).map_or(0, |t| t.partitions) as i32;
            let mut watches = Vec::new();
            for p in 0..partitions {
                if let Ok(w) = self.store.watch(&self.cfg.source, p) {
                    watches.push(w);
                }
            }
            // Checked after subscribing: an append between the step and here is not missed.
            if self.pending_input() {
                continue;
            }
            let any = async {
                if watches.is_empty() {
                    std::future::pending::<()>().await;
                } else {
                    let _ = futures_util::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed()))).await;
                }
            };
            tokio::select! {
                _ = any => {}
                _ = topics.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Whether a source partition has records past the position.
    fn pending_input(&self) -> bool {
        let partitions = self.store.topic(&self.cfg.source).map_or(0, |t| t.partitions) as usize;
        (0..partitions).any(|p| {
            let next = self.position.next.get(p).copied().unwrap_or(0);
            self.store.watermarks(&self.cfg.source, p as i32).is_ok_and(|w| w.high_watermark > next)
        })
    }

    /// Reads and feeds up to `records_per_step_max` source records; returns how many.
    async fn step(&mut self) -> Result<u64, StoreError> {
        let Some(topic) = self.store.topic(&self.cfg.source) else { return Ok(0) };
        let partitions = topic.partitions as usize;
        if partitions == 0 {
            return Ok(0);
        }
        if self.position.next.len() < partitions {
            self.position.next.resize(partitions, 0);
        }
        let mut budget = u64::from(self.cfg.records_per_step_max);
        let mut read = 0u64;
        // Each step starts at the next partition, so a busy one cannot starve the others.
        self.turn = self.turn.wrapping_add(1);
        let first = self.turn;
        for p in (0..partitions).map(|i| (i + first) % partitions) {
            if budget == 0 {
                break;
            }
            let records = match self.read(p as i32, self.position.next[p]).await {
                Ok(r) => r,
                Err(StoreError::OffsetOutOfRange { offset, log_start_offset, .. }) if offset < log_start_offset => {
                    // Retention removed records before they were read: counted, skipped.
                    self.stats.skipped_retention.fetch_add((log_start_offset - offset) as u64, Ordering::Relaxed);
                    self.position.next[p] = log_start_offset;
                    self.unsaved += 1;
                    continue;
                }
                Err(StoreError::OffsetOutOfRange { log_start_offset, .. }) => {
                    // Past the end: the source was deleted and created again. Its records are
                    // new to the aggregator: read from its start.
                    tracing::warn!(source = %self.cfg.source, partition = p, "source position past its end; reading it from its start");
                    self.position.next[p] = log_start_offset;
                    self.unsaved += 1;
                    continue;
                }
                Err(StoreError::UnknownTopic(_)) | Err(StoreError::UnknownPartition { .. }) => return Ok(read),
                Err(e) => return Err(e),
            };
            for r in records.iter().take(budget as usize) {
                self.feed(r);
                self.position.next[p] = r.offset + 1;
                budget -= 1;
                read += 1;
            }
        }
        self.unsaved += read;
        Ok(read)
    }

    /// Records of one partition from `offset` on (the tail cache in place, else the database on
    /// the blocking pool; no read transaction outlives the call).
    async fn read(&self, partition: i32, offset: i64) -> Result<Vec<StoredRecord>, StoreError> {
        let bytes = self.cfg.record_bytes_max as usize;
        if let Some(r) = self.store.read_records_cached(&self.cfg.source, partition, offset, bytes) {
            return r;
        }
        let (store, source) = (self.store.clone(), self.cfg.source.clone());
        blocking(move || store.read_records(&source, partition, offset, bytes)).await
    }

    fn feed(&mut self, r: &StoredRecord) {
        let s = &self.stats;
        s.records_in.fetch_add(1, Ordering::Relaxed);
        let counter = match reading(&self.cfg, r) {
            Err(Skip::Invalid) => &s.skipped_invalid,
            Ok((key, event_ms, values)) => match self.windows.offer(&key, event_ms, &values) {
                Offer::Added => {
                    s.windows_open.store(self.windows.open_count() as u64, Ordering::Relaxed);
                    return;
                }
                Offer::Late => &s.skipped_late,
                Offer::Full => &s.skipped_windows_full,
                Offer::Invalid => &s.skipped_invalid,
            },
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the closed windows' results, each commit with the state saying they were
    /// emitted (removed from the open windows) and the position they were closed at.
    async fn emit(&mut self) -> Result<(), StoreError> {
        loop {
            let closed = self.windows.take_closed(self.cfg.results_per_commit_max as usize);
            if closed.is_empty() {
                return Ok(());
            }
            let records: Vec<NewRecord> = closed.iter().map(|c| result_record(&self.cfg, c)).collect();
            let n = records.len() as u64;
            let kv = self.changes();
            self.store.enqueue_records_with(&self.cfg.derived, 0, records, kv).await?.wait().await?;
            self.stats.results_out.fetch_add(n, Ordering::Relaxed);
            self.stats.windows_open.store(self.windows.open_count() as u64, Ordering::Relaxed);
            self.stored();
        }
    }

    /// Stores the open windows changed since the last checkpoint and the position.
    async fn checkpoint(&mut self) -> Result<(), StoreError> {
        let kv = self.changes();
        // One commit, all or none (a key-value write of one space).
        let entries = kv.into_iter().map(|(_, k, v)| (k, v)).collect();
        self.store.kv_write(SPACE, entries).await?;
        self.stored();
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| StoreError::Closed)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_round_trips() {
        for p in [
            Position::default(),
            Position { stream_ms: Some(-5), next: vec![0, 7, 1 << 40] },
            Position { stream_ms: None, next: vec![3] },
        ] {
            assert_eq!(Position::decode(&p.encode()), Some(p));
        }
        assert_eq!(Position::decode(&[1, 2, 3]), None);
    }

    #[test]
    fn stored_window_keys_sort_by_start_and_never_overlap_another_aggregate() {
        assert!(window_key("a", -1, b"z") < window_key("a", 0, b"a"));
        assert!(window_key("a", 0, b"z") < window_key("a", 1, b""));
        assert!(!window_key("a.b", 0, b"k").starts_with(&prefix("a", TAG_WINDOW)));
        assert!(!window_key("ab", 0, b"k").starts_with(&prefix("a", TAG_WINDOW)));
    }

    fn record(key: Option<&str>, value: &str, timestamp: i64) -> StoredRecord {
        StoredRecord {
            offset: 0,
            timestamp,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
            headers: Vec::new(),
        }
    }

    #[test]
    fn readings_from_record_key_or_json_fields() {
        let mut cfg = AggregateConfig {
            source: "s".into(),
            derived: "d".into(),
            fields: vec!["kw".into(), "v".into()],
            ..Default::default()
        };
        let r = record(Some("dev1"), r#"{"kw": 1.5, "v": 230, "t": 42, "dev": "m7"}"#, 99);
        assert_eq!(reading(&cfg, &r), Ok((b"dev1".to_vec(), 99, vec![1.5, 230.0])), "record key and timestamp");
        cfg.key_field = "dev".into();
        cfg.time_field = "t".into();
        assert_eq!(reading(&cfg, &r), Ok((b"m7".to_vec(), 42, vec![1.5, 230.0])), "JSON key and event time");
        for bad in [
            r#"[1]"#,
            "not json",
            r#"{"kw": "x", "v": 1, "t": 1, "dev": "a"}"#,
            r#"{"kw": 1, "t": 1, "dev": "a"}"#,
            r#"{"kw": 1, "v": 1, "t": 1.5, "dev": "a"}"#,
            r#"{"kw": 1, "v": 1, "t": 1, "dev": true}"#,
        ] {
            assert_eq!(reading(&cfg, &record(Some("k"), bad, 0)), Err(Skip::Invalid), "{bad}");
        }
        cfg.key_field.clear();
        assert_eq!(reading(&cfg, &record(None, r#"{"kw": 1, "v": 1, "t": 1}"#, 0)), Err(Skip::Invalid), "no key");
        cfg.key_bytes_max = 3;
        assert_eq!(reading(&cfg, &r), Err(Skip::Invalid), "key over key_bytes_max");
        cfg.key_bytes_max = 256;
        cfg.record_bytes_max = 10;
        assert_eq!(reading(&cfg, &r), Err(Skip::Invalid), "value over record_bytes_max");
    }

    #[test]
    fn result_value_has_bounds_count_and_per_field_aggregates() {
        let cfg = AggregateConfig { fields: vec!["kw".into()], ..Default::default() };
        let c = Closed {
            key: b"m1".to_vec(),
            start_ms: 0,
            end_ms: 1000,
            state: WindowState {
                count: 4,
                fields: vec![window::FieldAgg { min: 1.0, max: 4.0, sum: 10.0, last: 3.0, last_ms: 900 }],
            },
        };
        let r = result_record(&cfg, &c);
        assert_eq!(r.key.as_deref(), Some(b"m1".as_slice()));
        assert_eq!(r.timestamp_ms, Some(1000), "timestamp = window end");
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap_or_default()).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({"window_start": 0, "window_end": 1000, "count": 4,
                "fields": {"kw": {"min": 1.0, "max": 4.0, "mean": 2.5, "last": 3.0}}})
        );
    }
}
