//! The single writer thread that owns every write to the database: it drains the bounded queue
//! into one transaction per round (group commit), commits once, and only then publishes new
//! watermarks and answers the waiters. Retention runs inside the same rounds. It also owns the
//! two recoveries: offsets reserved for `relaxed` commits (gap batches after a crash), and the
//! in-process reopen of the database after a failed write (see `Writer::write_failed`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use redb::{
    Database, Durability as RedbDurability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableHandle,
    WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use crate::batch::{self, BatchHeader, NewRecord, HEADER_LEN};
use crate::config::{Codec, Durability, StorageConfig, TimestampKind, TopicConfig};
use crate::error::StoreError;
use crate::producers::{self, ProducerEntry, ProducerStates, SeqCheck};
use crate::tables::{
    footprint, kv_footprint, partition_key, split_value, PartitionMeta, TopicRecord, LOG, META, META_NEXT_TOPIC_ID,
    META_PROBE, PARTITIONS, TIME_INDEX, TOPICS, VALUE_PREFIX_LEN,
};
use crate::{disk, AppendOutcome, KvSpace, PartitionState, Shared, TopicState};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(crate) enum AppendData {
    /// A validated client batch, after `VALUE_PREFIX_LEN` bytes of room for the append time.
    Batch { bytes: BytesMut, header: BatchHeader },
    /// Records to pack.
    Records(Vec<NewRecord>),
}

/// One key-value write: space, key, value (`None` = remove).
pub(crate) type KvWrite = (KvSpace, Vec<u8>, Option<Vec<u8>>);

pub(crate) enum AdminCmd {
    CreateTopic { name: String, partitions: u32, config: TopicConfig },
    DeleteTopic { name: String },
    CreatePartitions { name: String, total: u32 },
    AlterConfig { name: String, config: TopicConfig },
}

pub(crate) enum Op {
    Append {
        topic: Arc<TopicState>,
        pkey: u64,
        data: AppendData,
        /// Key-value writes committed in the same transaction as the append (or not at all).
        kv: Vec<KvWrite>,
        reply: Reply<AppendOutcome>,
    },
    Admin {
        cmd: AdminCmd,
        reply: Reply<()>,
    },
    Kv {
        space: KvSpace,
        entries: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        reply: Reply<()>,
    },
    Tick,
    Shutdown,
    /// The service watchdog's probe: a real write (a counter in `meta`) committed durably in the
    /// next round, so it proves the writer finished every round queued before it and that the
    /// write path (pages, commit, fsync) works. Answered `None` after the commit, or with the
    /// write fault that kept it from writing (disk full, a failed commit, writes paused): a fault
    /// is not a reason to restart the process (see `Store::probe`).
    Probe {
        reply: Reply<Option<StoreError>>,
    },
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Append { .. } => "Append",
            Op::Admin { .. } => "Admin",
            Op::Kv { .. } => "Kv",
            Op::Tick => "Tick",
            Op::Shutdown => "Shutdown",
            Op::Probe { .. } => "Probe",
        })
    }
}

impl Op {
    fn size(&self) -> u64 {
        match self {
            Op::Append { data: AppendData::Batch { bytes, .. }, .. } => bytes.len() as u64,
            Op::Append { data: AppendData::Records(r), .. } => r.iter().map(|r| r.encoded_len_max() as u64).sum(),
            Op::Kv { entries, .. } => {
                entries.iter().map(|(k, v)| (k.len() + v.as_ref().map_or(0, Vec::len)) as u64).sum()
            }
            _ => 64,
        }
    }

    fn needs_fsync(&self) -> bool {
        match self {
            Op::Append { topic, .. } => topic.config.durability == Durability::Fsync,
            Op::Admin { .. } | Op::Kv { .. } | Op::Probe { .. } => true,
            Op::Tick | Op::Shutdown => false,
        }
    }

    /// Whether the op would add bytes to the database (refused while the disk is full).
    fn inserts(&self) -> bool {
        match self {
            Op::Append { .. } | Op::Probe { .. } => true,
            Op::Kv { entries, .. } => entries.iter().any(|(_, v)| v.is_some()),
            Op::Admin { .. } | Op::Tick | Op::Shutdown => false,
        }
    }
}

/// How far a `relaxed` partition's reservation is raised past its next offset (see
/// `PartitionMeta::reserved_offset`): the most offsets a crash can turn into a gap, and how many
/// records a relaxed partition takes between the durable commits that raise it (a durable round
/// raises it for free once less than half of it is left). 65,536 offsets cost nothing to skip (a
/// gap is one small control batch) and, below 65,536 records per second and partition, no more
/// fsyncs than `storage.relaxed_flush_interval_ms` already makes.
pub(crate) const RELAXED_RESERVE_OFFSETS: u64 = 65_536;

/// First pause of writes after a failed write; doubled after each further failure...
const WRITE_RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// ...up to this. Reads go on meanwhile (the database is reopened at once).
const WRITE_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(10);

fn write_backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    (WRITE_RETRY_BACKOFF_MIN * (1u32 << shift)).min(WRITE_RETRY_BACKOFF_MAX)
}

/// The writer's state after a failed write: writes are refused until `retry_at`; the database is
/// reopened at once (and again at each round after `retry_at` while reopening fails).
struct Fault {
    cause: String,
    /// Consecutive failures (writes or reopens) since the last successful write.
    failures: u32,
    retry_at: Instant,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Kafka's topic name rules.
pub fn validate_topic_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason| Err(StoreError::InvalidTopicName { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 249 {
        return bad("longer than 249 characters");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are not allowed");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// State read from the database at open.
pub(crate) struct Loaded {
    pub topics: HashMap<String, Arc<TopicState>>,
    pub metas: HashMap<u64, PartitionMeta>,
    pub producers: ProducerStates,
    /// Footprint of every key-value entry (`tables::kv_footprint`), charged to `storage.max_bytes`.
    pub kv_bytes: u64,
    /// Partitions that got a gap batch at this open (see `fill_gaps`).
    pub gaps: usize,
}

/// Creates missing tables and reads topics and partition metadata, checking that each
/// partition's metadata agrees with its last stored batch; fills the gaps a crash left in
/// `relaxed` partitions (`fill_gaps`).
pub(crate) fn load(db: &Database, config: &StorageConfig) -> Result<Loaded, StoreError> {
    let tx = db.begin_write()?;
    {
        tx.open_table(TOPICS)?;
        tx.open_table(PARTITIONS)?;
        tx.open_table(LOG)?;
        tx.open_table(TIME_INDEX)?;
        tx.open_table(META)?;
    }
    tx.commit()?;
    let rtx = db.begin_read()?;
    let topics_t = rtx.open_table(TOPICS)?;
    let parts_t = rtx.open_table(PARTITIONS)?;
    let log_t = rtx.open_table(LOG)?;
    let mut topics = HashMap::new();
    let mut metas = HashMap::new();
    // (name, id, settings, partition keys), and the partitions holding a reservation.
    let mut listed = Vec::new();
    let mut held = Vec::new();
    for e in topics_t.iter()? {
        let (name, rec) = e?;
        let rec = TopicRecord::decode(rec.value())?;
        let config = TopicConfig::from_text(&rec.config_text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut partitions = Vec::with_capacity(rec.partitions as usize);
        for p in 0..rec.partitions {
            let key = partition_key(rec.id, p);
            let meta = match parts_t.get(key)? {
                Some(v) => PartitionMeta::decode(v.value())?,
                None => return Err(StoreError::Corrupt(format!("topic {} lacks partition {p}", name.value()))),
            };
            if let Some(last) = log_t.range((key, 0u64)..=(key, u64::MAX))?.next_back() {
                let (k, v) = last?;
                let (_, b) = split_value(v.value())?;
                let h = BatchHeader::parse(b).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if h.next_offset() as u64 != meta.next_offset || k.value().1 as i64 != h.base_offset {
                    return Err(StoreError::Corrupt(format!(
                        "{}-{p}: metadata says next offset {}, last batch ends at {}",
                        name.value(),
                        meta.next_offset,
                        h.next_offset()
                    )));
                }
            }
            if meta.reserved_offset > meta.next_offset {
                held.push((key, name.value().to_string(), p));
            }
            partitions.push(key);
            metas.insert(key, meta);
        }
        listed.push((name.value().to_string(), rec.id, config, partitions));
    }
    let mut producers = ProducerStates::new(config.producer_states_max as usize);
    for (&key, meta) in &metas {
        rebuild_producers(&log_t, key, meta, &mut producers)?;
    }
    let mut kv_bytes = 0u64;
    let spaces: Vec<String> =
        rtx.list_tables()?.map(|t| t.name().to_string()).filter(|n| KvSpace::is_space(n)).collect();
    for space in &spaces {
        let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new(space);
        for e in rtx.open_table(def)?.iter()? {
            let (k, v) = e?;
            kv_bytes += kv_footprint(k.value().len(), v.value().len());
        }
    }
    drop((topics_t, parts_t, log_t, rtx));
    let gaps = fill_gaps(db, &mut metas, &held)?;
    for (name, id, config, keys) in listed {
        let partitions = keys.iter().filter_map(|k| metas.get(k).map(|m| PartitionState::new(*k, m))).collect();
        topics.insert(name.clone(), Arc::new(TopicState { id, name, config, partitions }));
    }
    Ok(Loaded { topics, metas, producers, kv_bytes, gaps })
}

/// After a crash (or an in-process reopen after a failed write), a partition whose durable
/// reservation is above its next offset lost non-durable commits that had handed out offsets up
/// to it: `[next, reserved)` gets gap batches (`batch::encode_gap_batch`) in one durable commit,
/// so those offsets are never handed out again and consumers move past them. The reservation is
/// released (reserved = next). Returns how many partitions got a gap.
fn fill_gaps(
    db: &Database,
    metas: &mut HashMap<u64, PartitionMeta>,
    held: &[(u64, String, u32)],
) -> Result<usize, StoreError> {
    if held.is_empty() {
        return Ok(0);
    }
    let now = now_ms();
    let tx = db.begin_write()?;
    {
        let mut log = tx.open_table(LOG)?;
        let mut parts = tx.open_table(PARTITIONS)?;
        for (key, topic, partition) in held {
            let Some(m) = metas.get_mut(key) else { continue };
            let from = m.next_offset;
            while m.next_offset < m.reserved_offset {
                let count = (m.reserved_offset - m.next_offset).min(batch::GAP_OFFSETS_MAX as u64);
                let mut value = now.to_be_bytes().to_vec();
                value.extend_from_slice(&batch::encode_gap_batch(m.next_offset as i64, count as i64, now));
                log.insert((*key, m.next_offset), value.as_slice())?;
                m.account_batch(m.next_offset + count, value.len());
            }
            parts.insert(*key, m.encode().as_slice())?;
            tracing::warn!(%topic, partition, from, to = m.next_offset,
                "offsets handed out by relaxed commits a crash undid are skipped (a gap batch); they are never reused");
        }
    }
    tx.commit()?;
    Ok(held.len())
}

/// Reads the last batches of a partition (oldest first) into the idempotent-producer state.
fn rebuild_producers(
    log: &redb::ReadOnlyTable<(u64, u64), &'static [u8]>,
    key: u64,
    meta: &PartitionMeta,
    producers: &mut ProducerStates,
) -> Result<(), StoreError> {
    let mut tail = Vec::new();
    for e in log.range((key, 0u64)..=(key, u64::MAX))?.rev().take(producers::REBUILD_BATCHES_PER_PARTITION) {
        let (_, v) = e?;
        let (_, b) = split_value(v.value())?;
        let h = BatchHeader::parse(b).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if h.producer_id >= 0 {
            tail.push(h);
        }
    }
    for h in tail.into_iter().rev() {
        let log_append = h.attributes & 0x08 != 0;
        let outcome = AppendOutcome {
            base_offset: h.base_offset,
            last_offset: h.last_offset(),
            log_append_time_ms: log_append.then_some(h.max_timestamp),
            log_start_offset: meta.log_start_offset as i64,
        };
        let pk = (key, h.producer_id);
        let mut entry = producers.get(&pk).cloned().unwrap_or_else(|| ProducerEntry::new(h.producer_epoch));
        let clock = producers.tick();
        entry.record(
            h.producer_epoch,
            h.base_sequence,
            producers::last_seq(h.base_sequence, h.record_count),
            outcome,
            clock,
        );
        producers.insert(pk, entry);
    }
    Ok(())
}

/// Records waiting in one round for one partition, packed into batches at flush time.
struct Pack {
    topic: Arc<TopicState>,
    records: Vec<NewRecord>,
    waiters: Vec<(Reply<AppendOutcome>, usize)>,
}

impl Pack {
    fn fail(self, e: &StoreError) {
        for (tx, _) in self.waiters {
            let _ = tx.send(Err(e.clone()));
        }
    }

    /// Its waiters, to be answered with the error of the failing round.
    fn doom(self, r: &mut Round) {
        r.done.extend(self.waiters.into_iter().map(|(tx, _)| Done::Doomed(tx)));
    }
}

/// An answer sent only after the round's commit returned (and memory was updated).
enum Done {
    Append(Reply<AppendOutcome>, AppendOutcome),
    Unit(Reply<()>),
    /// A refusal that may depend on what this round did: a CreateTopic is answered TopicExists
    /// when an earlier op of the same round created the topic, and the answer must not arrive
    /// before the topic is visible.
    Refused(Reply<()>, StoreError),
    /// The watchdog probe: `None` if its write committed, or the fault that kept it from writing.
    Probe(Reply<Option<StoreError>>, Option<StoreError>),
    /// An append of a round that is failing: answered with the round's error once the writer
    /// recovered (so the caller can read again when it gets it).
    Doomed(Reply<AppendOutcome>),
}

impl Done {
    /// Answers after the commit.
    fn send(self) {
        match self {
            Done::Append(tx, outcome) => {
                let _ = tx.send(Ok(outcome));
            }
            Done::Unit(tx) => {
                let _ = tx.send(Ok(()));
            }
            Done::Refused(tx, e) => {
                let _ = tx.send(Err(e));
            }
            Done::Probe(tx, fault) => {
                let _ = tx.send(Ok(fault));
            }
            Done::Doomed(tx) => {
                let _ = tx.send(Err(StoreError::Corrupt("an append of a failed round was not answered".into())));
            }
        }
    }

    /// Answers after a commit that failed with `e`: nothing of the round was written.
    fn fail(self, e: &StoreError) {
        match self {
            Done::Append(tx, _) | Done::Doomed(tx) => {
                let _ = tx.send(Err(e.clone()));
            }
            Done::Unit(tx) | Done::Refused(tx, _) => {
                let _ = tx.send(Err(e.clone()));
            }
            Done::Probe(tx, _) => {
                let _ = tx.send(Ok(Some(e.clone())));
            }
        }
    }
}

enum TopicChange {
    Upsert(Arc<TopicState>),
    Remove(String),
}

/// Everything one round changes, applied to memory only after its commit.
#[derive(Default)]
struct Round {
    /// Partition metadata as of this round; `None` = deleted.
    metas: HashMap<u64, Option<PartitionMeta>>,
    topic_changes: Vec<TopicChange>,
    done: Vec<Done>,
    appended_records: u64,
    appended_batches: u64,
    appended_bytes: u64,
    deleted_batches: u64,
    /// Of those, batches not archived yet (`Store::set_archived`).
    deleted_unarchived_batches: u64,
    deleted_bytes: u64,
    /// Front (oldest batch) append times learned or changed this round; `None` = empty.
    fronts: HashMap<u64, Option<i64>>,
    /// Partitions appended to this round whose topic has `retention.bytes`, with that limit.
    retention_bytes: HashMap<u64, u64>,
    /// Idempotent-producer entries changed this round.
    producers: HashMap<(u64, i64), ProducerEntry>,
    /// Change of the key-value footprint this round.
    kv_delta: i64,
    /// Partitions of `relaxed` topics appended to this round (reservations checked at its end).
    relaxed: HashSet<u64>,
    /// Ops a failing round did not get to: answered with its error once the writer recovered.
    unanswered: Vec<Op>,
    /// Something was written for a client (a batch, a key, a topic change, the probe's
    /// counter): its commit shows the write path works again after a fault.
    wrote: bool,
}

struct Tables<'t> {
    log: Table<'t, (u64, u64), &'static [u8]>,
    parts: Table<'t, u64, &'static [u8]>,
    time: Table<'t, (u64, i64), u64>,
    topics: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            log: txn.open_table(LOG)?,
            parts: txn.open_table(PARTITIONS)?,
            time: txn.open_table(TIME_INDEX)?,
            topics: txn.open_table(TOPICS)?,
            meta: txn.open_table(META)?,
        })
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    /// `None` after a failed write until the database is open again.
    db: Option<Arc<Database>>,
    cfg: StorageConfig,
    metas: HashMap<u64, PartitionMeta>,
    pstates: HashMap<u64, Arc<PartitionState>>,
    /// Append time of each partition's oldest batch (for global retention); absent = unknown.
    fronts: HashMap<u64, Option<i64>>,
    /// Compressed/uncompressed ratio seen per partition, to size packed batches.
    ratios: HashMap<u64, f64>,
    footprint_total: u64,
    logical_total: u64,
    /// Footprint of every key-value entry: counted against the disk budget with the log's.
    kv_total: u64,
    /// Global retention is deleting (between the high and low marks).
    retention_active: bool,
    /// A non-durable commit happened since the last durable one.
    unsynced_since: Option<Instant>,
    last_time_retention: Instant,
    producers: ProducerStates,
    /// Set by a failed write, cleared by the next successful one.
    fault: Option<Fault>,
}

/// Whether a failed round means the database must be reopened: redb latches an I/O failure
/// ("Previous I/O error occurred") until the `Database` is dropped.
fn is_storage_fault(e: &StoreError) -> bool {
    matches!(e, StoreError::Storage(_) | StoreError::Io { .. })
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, db: Arc<Database>, loaded: Loaded) -> Self {
        let cfg = shared.config.clone();
        let mut w = Self {
            shared,
            db: Some(db),
            cfg,
            metas: HashMap::new(),
            pstates: HashMap::new(),
            fronts: HashMap::new(),
            ratios: HashMap::new(),
            footprint_total: 0,
            logical_total: 0,
            kv_total: 0,
            retention_active: false,
            unsynced_since: None,
            last_time_retention: Instant::now(),
            producers: ProducerStates::new(1),
            fault: None,
        };
        w.adopt(loaded);
        w
    }

    /// Takes over the state read from the database (at open and after a reopen); the topic map
    /// in `Shared` must already hold the partition states.
    fn adopt(&mut self, loaded: Loaded) {
        self.pstates.clear();
        if let Ok(topics) = self.shared.topics.read() {
            for t in topics.values() {
                for p in &t.partitions {
                    self.pstates.insert(p.key, p.clone());
                }
            }
        }
        self.footprint_total = loaded.metas.values().map(|m| m.footprint_bytes).sum();
        self.logical_total = loaded.metas.values().map(|m| m.logical_bytes).sum();
        self.kv_total = loaded.kv_bytes;
        let c = &self.shared.counters;
        c.footprint_bytes.store(self.footprint_total, Ordering::Relaxed);
        c.logical_bytes.store(self.logical_total, Ordering::Relaxed);
        c.kv_bytes.store(self.kv_total, Ordering::Relaxed);
        self.metas = loaded.metas;
        self.producers = loaded.producers;
        self.fronts.clear();
        self.retention_active = false;
        self.unsynced_since = None;
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut shutdown = false;
        while !shutdown {
            let Some(first) = rx.blocking_recv() else { break };
            let mut ops = Vec::with_capacity(64);
            let mut bytes = 0u64;
            match first {
                Op::Shutdown => shutdown = true,
                op => {
                    bytes += op.size();
                    ops.push(op);
                }
            }
            while !shutdown && bytes < self.cfg.commit_size_bytes_max {
                match rx.try_recv() {
                    Ok(Op::Shutdown) => shutdown = true,
                    Ok(op) => {
                        bytes += op.size();
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            if !ops.is_empty() {
                self.round(ops);
            }
        }
        // Refuse new work, then commit everything already queued.
        rx.close();
        let mut rest = Vec::new();
        let mut bytes = 0u64;
        while let Ok(op) = rx.try_recv() {
            if matches!(op, Op::Shutdown) {
                continue;
            }
            bytes += op.size();
            rest.push(op);
            if bytes >= self.cfg.commit_size_bytes_max {
                self.round(std::mem::take(&mut rest));
                bytes = 0;
            }
        }
        if !rest.is_empty() {
            self.round(rest);
        }
        self.release_reservations();
        self.close_db();
    }

    /// The last commit of a clean close: durable, and every reservation released (reserved =
    /// next), so a clean restart leaves no gap.
    fn release_reservations(&mut self) {
        let Some(db) = self.db.clone() else { return };
        let held: Vec<(u64, PartitionMeta)> =
            self.metas.iter().filter(|(_, m)| m.reserved_offset > m.next_offset).map(|(k, m)| (*k, *m)).collect();
        if held.is_empty() && self.unsynced_since.is_none() {
            return;
        }
        let released = (|| -> Result<(), StoreError> {
            let txn = db.begin_write()?;
            {
                let mut parts = txn.open_table(PARTITIONS)?;
                for (pkey, m) in &held {
                    let m = PartitionMeta { reserved_offset: m.next_offset, ..*m };
                    parts.insert(*pkey, m.encode().as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        match released {
            Ok(()) => {
                for (pkey, m) in held {
                    self.metas.insert(pkey, PartitionMeta { reserved_offset: m.next_offset, ..m });
                }
                self.unsynced_since = None;
            }
            Err(e) => tracing::warn!(error = %e, "releasing offset reservations failed; the next open skips them"),
        }
    }

    /// Stops readers from taking the database (they get `Unavailable` or `Closed`).
    fn detach_db(&self) {
        if let Ok(mut slot) = self.shared.db.write() {
            slot.take();
        }
    }

    fn close_db(mut self) {
        self.detach_db();
        let Some(db) = self.db.take() else { return };
        match wait_unshared(db) {
            Some(owned) => match owned.close() {
                Ok(()) => tracing::info!("store closed cleanly"),
                Err(e) => tracing::error!(error = %e, "closing the database failed"),
            },
            None => tracing::warn!("readers still hold the database after 5 s; it closes when they finish"),
        }
    }

    fn round(&mut self, ops: Vec<Op>) {
        if let Some(e) = self.fault_gate() {
            fail_ops(ops, &e);
            return;
        }
        let Some(db) = self.db.clone() else {
            fail_ops(ops, &StoreError::Closed);
            return;
        };
        let started = Instant::now();
        let now = now_ms();
        let mut r = Round::default();
        let relaxed_due =
            self.unsynced_since.is_some_and(|t| t.elapsed().as_millis() as u64 >= self.cfg.relaxed_flush_interval_ms);
        let mut durable = relaxed_due || ops.iter().any(Op::needs_fsync);
        let disk_full = if ops.iter().any(Op::inserts) { self.disk_full() } else { None };

        let mut txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                // Reopened first, so whoever gets the error can read again at once.
                let e = StoreError::from(e);
                self.write_failed(&e);
                fail_ops(ops, &e);
                return;
            }
        };
        txn.set_quick_repair(self.cfg.quick_repair);
        let applied = self.apply(&txn, ops, now, disk_full, &mut durable, &mut r);
        let result = applied.and_then(|()| {
            if !durable {
                txn.set_durability(RedbDurability::None)?;
            }
            txn.commit().map_err(StoreError::from)
        });
        drop(db);
        let micros = started.elapsed().as_micros() as u64;
        let c = &self.shared.counters;
        match result {
            Ok(()) => {
                c.commits.fetch_add(1, Ordering::Relaxed);
                c.commit_micros_total.fetch_add(micros, Ordering::Relaxed);
                c.commit_latency_micros.observe(micros);
                if r.appended_records > 0 {
                    c.records_per_commit.observe(r.appended_records);
                }
                if durable {
                    c.durable_commits.fetch_add(1, Ordering::Relaxed);
                    self.unsynced_since = None;
                } else if self.unsynced_since.is_none() {
                    self.unsynced_since = Some(Instant::now());
                }
                if r.wrote {
                    self.write_succeeded();
                }
                self.publish(r);
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; every waiter of this round gets the error");
                self.fronts.clear();
                // Reopened first, so whoever gets the error can read again at once.
                if is_storage_fault(&e) {
                    self.write_failed(&e);
                } else {
                    c.failed_commits.fetch_add(1, Ordering::Relaxed);
                }
                fail_ops(std::mem::take(&mut r.unanswered), &e);
                for d in r.done {
                    d.fail(&e);
                }
            }
        }
    }

    // ---- faults: a failed write pauses writes and reopens the database in-process ----

    /// Why in-process and not `exit` for systemd to restart us: a restart gives up the
    /// connections and sessions of every client and, with a full disk or a file-size limit,
    /// comes back to the same fault with reads gone meanwhile; the reopen is what a restart
    /// would do to the store (drop the database, open and repair it, reload the state), without
    /// the rest. Counts the failure, pauses writes for `write_backoff` and reopens at once so
    /// reads work again.
    fn write_failed(&mut self, e: &StoreError) {
        self.shared.counters.failed_commits.fetch_add(1, Ordering::Relaxed);
        let failures = self.fault.as_ref().map_or(0, |f| f.failures) + 1;
        let pause = write_backoff(failures);
        tracing::error!(error = %e, failures, pause_ms = pause.as_millis() as u64,
            "write failed: reopening the database; writes are refused until the pause ends");
        self.fault = Some(Fault { cause: e.to_string(), failures, retry_at: Instant::now() + pause });
        self.publish_fault();
        self.reopen();
    }

    fn write_succeeded(&mut self) {
        if let Some(f) = self.fault.take() {
            tracing::info!(failures = f.failures, "writes succeed again after a storage fault");
            self.publish_fault();
        }
    }

    /// The fault as readers and the watchdog see it.
    fn publish_fault(&self) {
        if let Ok(mut slot) = self.shared.fault.lock() {
            *slot = self.fault.as_ref().map(|f| f.cause.clone());
        }
    }

    /// `None`: the round may write. `Some(e)`: refuse its ops with `e` (writes paused after a
    /// fault, or the database could not be reopened yet).
    fn fault_gate(&mut self) -> Option<StoreError> {
        let f = self.fault.as_ref()?;
        let now = Instant::now();
        if now < f.retry_at {
            let wait = f.retry_at - now;
            return Some(StoreError::Unavailable(format!(
                "writes paused after a storage fault ({}); next attempt in {} ms",
                f.cause,
                wait.as_millis()
            )));
        }
        if self.db.is_none() && !self.reopen() {
            let cause = self.fault.as_ref().map_or_else(String::new, |f| f.cause.clone());
            return Some(StoreError::Unavailable(format!("the database could not be reopened: {cause}")));
        }
        None
    }

    /// Drops the database (waiting for readers, bounded) and opens it again, reloads the state
    /// and fills the gaps of offsets the lost non-durable commits had handed out (`load`). On
    /// failure the next attempt comes after a longer pause. Returns whether it is open.
    fn reopen(&mut self) -> bool {
        self.detach_db();
        if let Some(old) = self.db.take() {
            drop(wait_unshared(old));
        }
        let opened = crate::open_database(&self.shared.config, &self.shared.location).and_then(|(db, repaired)| {
            let loaded = load(&db, &self.cfg)?;
            Ok((Arc::new(db), loaded, repaired))
        });
        match opened {
            Ok((db, loaded, repaired)) => {
                let gaps = loaded.gaps;
                self.reconcile(loaded);
                if let Err(e) = crate::load_archive_marks(&db, &self.shared) {
                    tracing::warn!(error = %e, "archive marks not reloaded");
                }
                self.db = Some(db.clone());
                if let Ok(mut slot) = self.shared.db.write() {
                    *slot = Some(db);
                }
                self.shared.counters.reopens.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(repaired, gaps, "database reopened after a storage fault: reads work again");
                true
            }
            Err(e) => {
                self.shared.counters.failed_reopens.fetch_add(1, Ordering::Relaxed);
                let f = self.fault.get_or_insert(Fault { cause: String::new(), failures: 0, retry_at: Instant::now() });
                f.failures += 1;
                f.retry_at = Instant::now() + write_backoff(f.failures);
                f.cause = format!("reopening the database failed: {e}");
                tracing::error!(error = %e, failures = f.failures, "reopening the database failed; retrying later");
                self.publish_fault();
                false
            }
        }
    }

    /// After a reopen: the topic map keeps the partition states readers and watchers hold
    /// (same topic id and partition count) and moves them to what the database holds now.
    fn reconcile(&mut self, loaded: Loaded) {
        if let Ok(mut topics) = self.shared.topics.write() {
            let mut next: HashMap<String, Arc<TopicState>> = HashMap::new();
            for (name, fresh) in &loaded.topics {
                let t = match topics.get(name) {
                    Some(old) if old.id == fresh.id && old.partitions.len() == fresh.partitions.len() => {
                        Arc::new(TopicState {
                            id: old.id,
                            name: name.clone(),
                            config: fresh.config.clone(),
                            partitions: old.partitions.clone(),
                        })
                    }
                    _ => fresh.clone(),
                };
                next.insert(name.clone(), t);
            }
            let live: HashSet<*const PartitionState> =
                next.values().flat_map(|t| t.partitions.iter().map(Arc::as_ptr)).collect();
            for old in topics.values() {
                for p in old.partitions.iter().filter(|p| !live.contains(&Arc::as_ptr(p))) {
                    p.signal.send_modify(|s| s.deleted = true);
                }
            }
            for p in next.values().flat_map(|t| t.partitions.iter()) {
                if let Some(m) = loaded.metas.get(&p.key) {
                    p.logical_bytes.store(m.logical_bytes, Ordering::Relaxed);
                    p.footprint_bytes.store(m.footprint_bytes, Ordering::Relaxed);
                    p.signal.send_modify(|s| {
                        s.watermarks.log_start_offset = m.log_start_offset as i64;
                        s.watermarks.high_watermark = m.next_offset as i64;
                    });
                }
            }
            *topics = next;
        }
        // The reopened database may hold topics memory had not seen (or lack ones it had).
        self.shared.topics_changed.send_modify(|n| *n = n.wrapping_add(1));
        self.adopt(loaded);
    }

    fn disk_full(&self) -> Option<StoreError> {
        match disk::volume_free_bytes(&self.cfg.data_dir) {
            Ok(free) if free < self.cfg.disk_free_bytes_min => {
                Some(StoreError::DiskFull { free_bytes: free, min_bytes: self.cfg.disk_free_bytes_min })
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read free space of the data volume");
                None
            }
        }
    }

    /// Applies a round's operations to the transaction. Refusals answer their op at once
    /// (nothing was written for it); successes are answered after the commit. If applying
    /// fails, every op of the round is left in `r` to be answered with the error.
    fn apply(
        &mut self,
        txn: &WriteTransaction,
        ops: Vec<Op>,
        now: i64,
        disk_full: Option<StoreError>,
        durable: &mut bool,
        r: &mut Round,
    ) -> Result<(), StoreError> {
        let mut t = match Tables::open(txn) {
            Ok(t) => t,
            Err(e) => {
                r.unanswered = ops;
                return Err(e);
            }
        };
        let mut packs: Vec<(u64, Pack)> = Vec::new();
        let mut tick = false;
        let mut ops = ops.into_iter();
        let result = 'apply: {
            for op in ops.by_ref() {
                if let Err(e) = self.apply_op(txn, &mut t, &mut packs, &mut tick, op, now, disk_full.as_ref(), r) {
                    break 'apply Err(e);
                }
            }
            if let Err(e) = self.flush_packs(&mut t, r, &mut packs, now) {
                break 'apply Err(e);
            }
            if let Err(e) = self.reserve_relaxed_offsets(&mut t, r, durable) {
                break 'apply Err(e);
            }
            if let Err(e) = self.size_retention(&mut t, r) {
                break 'apply Err(e);
            }
            if tick && self.last_time_retention.elapsed().as_millis() as u64 >= self.cfg.retention_check_interval_ms {
                self.last_time_retention = Instant::now();
                if let Err(e) = self.time_retention(&mut t, r, now) {
                    break 'apply Err(e);
                }
            }
            Ok(())
        };
        if result.is_err() {
            r.unanswered = ops.collect();
            for (_, p) in packs {
                p.doom(r);
            }
        }
        result
    }

    /// Applies one op (see `apply`). On an error the op is in `r.done`, to be answered with it.
    #[allow(clippy::too_many_arguments)]
    fn apply_op(
        &mut self,
        txn: &WriteTransaction,
        t: &mut Tables<'_>,
        packs: &mut Vec<(u64, Pack)>,
        tick: &mut bool,
        op: Op,
        now: i64,
        disk_full: Option<&StoreError>,
        r: &mut Round,
    ) -> Result<(), StoreError> {
        match op {
            Op::Append { topic, pkey, data, kv, reply } => {
                if let Some(e) = disk_full {
                    let _ = reply.send(Err(e.clone()));
                    return Ok(());
                }
                if self.meta(r, pkey).is_none() {
                    let _ = reply.send(Err(StoreError::UnknownTopic(topic.name.clone())));
                    return Ok(());
                }
                if topic.config.durability == Durability::Relaxed {
                    r.relaxed.insert(pkey);
                }
                match data {
                    AppendData::Records(records) => {
                        let n = records.len();
                        match packs.iter_mut().find(|(k, _)| *k == pkey) {
                            Some((_, p)) => {
                                p.records.extend(records);
                                p.waiters.push((reply, n));
                            }
                            None => packs.push((pkey, Pack { topic, records, waiters: vec![(reply, n)] })),
                        }
                    }
                    AppendData::Batch { bytes, header } => {
                        // Keep order within the partition: records queued before this batch
                        // are written first.
                        if let Some(i) = packs.iter().position(|(k, _)| *k == pkey) {
                            let (k, p) = packs.remove(i);
                            if let Err(e) = self.flush_pack(t, r, k, p, now) {
                                r.done.push(Done::Doomed(reply));
                                return Err(e);
                            }
                        }
                        match self.append_client_batch(t, r, pkey, &topic, bytes, header, now) {
                            Ok(outcome) => r.done.push(Done::Append(reply, outcome)),
                            // Refused by the idempotence check: nothing was written for it.
                            Err(
                                e @ (StoreError::OutOfOrderSequence { .. } | StoreError::InvalidProducerEpoch { .. }),
                            ) => {
                                let _ = reply.send(Err(e));
                                return Ok(());
                            }
                            Err(e) => {
                                r.done.push(Done::Doomed(reply));
                                return Err(e);
                            }
                        }
                    }
                }
                for (space, key, value) in kv {
                    Self::kv_apply(txn, r, space, &key, value.as_deref())?;
                }
            }
            Op::Admin { cmd, reply } => {
                if let Err(e) = self.flush_packs(t, r, packs, now) {
                    r.done.push(Done::Refused(reply, e.clone()));
                    return Err(e);
                }
                match self.admin(t, r, cmd) {
                    Ok(()) => {
                        r.wrote = true;
                        r.done.push(Done::Unit(reply));
                    }
                    Err(e) if is_storage_fault(&e) => {
                        r.done.push(Done::Refused(reply, e.clone()));
                        return Err(e);
                    }
                    Err(e) => r.done.push(Done::Refused(reply, e)),
                }
            }
            Op::Kv { space, entries, reply } => {
                // Removals free space, so they go through on a full disk; inserts do not.
                if let Some(e) = disk_full.filter(|_| entries.iter().any(|(_, v)| v.is_some())) {
                    let _ = reply.send(Err(e.clone()));
                    return Ok(());
                }
                r.done.push(Done::Unit(reply));
                for (key, value) in entries {
                    Self::kv_apply(txn, r, space, &key, value.as_deref())?;
                }
            }
            Op::Tick => *tick = true,
            Op::Shutdown => {}
            Op::Probe { reply } => match disk_full {
                Some(e) => r.done.push(Done::Probe(reply, Some(e.clone()))),
                None => {
                    r.done.push(Done::Probe(reply, None));
                    let count = t.meta.get(META_PROBE)?.map_or(0, |v| v.value());
                    t.meta.insert(META_PROBE, count.wrapping_add(1))?;
                    r.wrote = true;
                }
            },
        }
        Ok(())
    }

    fn flush_packs(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        packs: &mut Vec<(u64, Pack)>,
        now: i64,
    ) -> Result<(), StoreError> {
        while !packs.is_empty() {
            let (k, p) = packs.remove(0);
            self.flush_pack(t, r, k, p, now)?;
        }
        Ok(())
    }

    /// Writes (`Some`) or removes (`None`) one key-value entry, tracking the footprint it adds
    /// or frees (charged to `storage.max_bytes` with the log).
    fn kv_apply(
        txn: &WriteTransaction,
        r: &mut Round,
        space: KvSpace,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let mut table = txn.open_table(space.table())?;
        let old = match value {
            Some(v) => table.insert(key, v)?.map(|g| g.value().len()),
            None => table.remove(key)?.map(|g| g.value().len()),
        };
        let added = value.map_or(0, |v| kv_footprint(key.len(), v.len()));
        let freed = old.map_or(0, |len| kv_footprint(key.len(), len));
        r.kv_delta += added as i64 - freed as i64;
        r.wrote = true;
        Ok(())
    }

    /// Keeps every offset a non-durable commit hands out below its partition's durable
    /// reservation (`PartitionMeta::reserved_offset`): a relaxed round that would go past it
    /// raises the reservation by `RELAXED_RESERVE_OFFSETS` and becomes durable; a round that is
    /// durable anyway tops up reservations that are less than half full.
    fn reserve_relaxed_offsets(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        durable: &mut bool,
    ) -> Result<(), StoreError> {
        let relaxed: Vec<u64> = r.relaxed.iter().copied().collect();
        for pkey in relaxed {
            let Some(mut m) = self.meta(r, pkey) else { continue };
            let beyond = m.next_offset > m.reserved_offset;
            let low = m.reserved_offset.saturating_sub(m.next_offset) < RELAXED_RESERVE_OFFSETS / 2;
            if beyond || (*durable && low) {
                m.reserved_offset = m.next_offset + RELAXED_RESERVE_OFFSETS;
                self.put_meta(t, r, pkey, m)?;
                *durable = true;
            }
        }
        Ok(())
    }

    /// Partition metadata as of the current round; `None` if the partition does not exist.
    fn meta(&self, r: &Round, pkey: u64) -> Option<PartitionMeta> {
        match r.metas.get(&pkey) {
            Some(m) => *m,
            None => self.metas.get(&pkey).copied(),
        }
    }

    fn put_meta(&self, t: &mut Tables<'_>, r: &mut Round, pkey: u64, m: PartitionMeta) -> Result<(), StoreError> {
        t.parts.insert(pkey, m.encode().as_slice())?;
        r.metas.insert(pkey, Some(m));
        Ok(())
    }

    fn front(&self, r: &Round, pkey: u64) -> Option<Option<i64>> {
        r.fronts.get(&pkey).copied().or_else(|| self.fronts.get(&pkey).copied())
    }

    /// Stores one batch (already carrying its base offset) and updates metadata and time index.
    /// `value` is the stored value: `VALUE_PREFIX_LEN` bytes of room for the append time, then
    /// the batch, so the batch is not copied again on its way into the table.
    #[allow(clippy::too_many_arguments)]
    fn store_batch(
        &self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        m: &mut PartitionMeta,
        value: &mut [u8],
        h: &BatchHeader,
        limit_bytes: Option<u64>,
        now: i64,
    ) -> Result<(), StoreError> {
        value[..VALUE_PREFIX_LEN].copy_from_slice(&now.to_be_bytes());
        let batch_len = value.len() - VALUE_PREFIX_LEN;
        t.log.insert((pkey, m.next_offset), &*value)?;
        if m.batches == 0 {
            r.fronts.insert(pkey, Some(now));
        }
        if let Some(limit) = limit_bytes {
            r.retention_bytes.insert(pkey, limit);
        }
        if h.max_timestamp > m.max_timestamp {
            t.time.insert((pkey, h.max_timestamp), m.next_offset)?;
            m.max_timestamp = h.max_timestamp;
        }
        m.account_batch(h.next_offset() as u64, value.len());
        r.wrote = true;
        r.appended_records += h.record_count as u64;
        r.appended_batches += 1;
        r.appended_bytes += batch_len as u64;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn append_client_batch(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        topic: &TopicState,
        mut bytes: BytesMut,
        header: BatchHeader,
        now: i64,
    ) -> Result<AppendOutcome, StoreError> {
        let mut m = self.meta(r, pkey).ok_or_else(|| StoreError::UnknownTopic(topic.name.clone()))?;
        let idempotent = header.producer_id >= 0;
        let (first_seq, last_seq) =
            (header.base_sequence, producers::last_seq(header.base_sequence, header.record_count));
        let pk = (pkey, header.producer_id);
        if idempotent {
            let entry = r.producers.get(&pk).or_else(|| self.producers.get(&pk));
            if let Some(e) = entry {
                if let SeqCheck::Duplicate(original) = e.check(header.producer_epoch, first_seq, last_seq)? {
                    return Ok(original);
                }
            }
        }
        let base = m.next_offset as i64;
        let b = &mut bytes[VALUE_PREFIX_LEN..];
        batch::set_base_offset(b, base);
        batch::set_leader_epoch(b, 0);
        let log_append = topic.config.timestamp_type == TimestampKind::LogAppendTime;
        if log_append {
            batch::stamp_log_append_time(b, now);
        }
        let h = BatchHeader {
            base_offset: base,
            max_timestamp: if log_append { now } else { header.max_timestamp },
            ..header
        };
        self.store_batch(t, r, pkey, &mut m, &mut bytes, &h, topic.config.retention_bytes, now)?;
        self.put_meta(t, r, pkey, m)?;
        let outcome = AppendOutcome {
            base_offset: base,
            last_offset: h.last_offset(),
            log_append_time_ms: log_append.then_some(now),
            log_start_offset: m.log_start_offset as i64,
        };
        if idempotent {
            let mut entry = match r.producers.remove(&pk) {
                Some(e) => e,
                None => self.producers.get(&pk).cloned().unwrap_or_else(|| ProducerEntry::new(header.producer_epoch)),
            };
            let clock = self.producers.tick();
            entry.record(header.producer_epoch, first_seq, last_seq, outcome, clock);
            r.producers.insert(pk, entry);
        }
        Ok(outcome)
    }

    /// Encodes a partition's waiting records into batches under `batch_size_bytes_max`.
    /// On an error its waiters are left in `r.done` to be answered with it.
    fn flush_pack(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        pack: Pack,
        now: i64,
    ) -> Result<(), StoreError> {
        let Some(m) = self.meta(r, pkey) else {
            let e = StoreError::UnknownTopic(pack.topic.name.clone());
            pack.fail(&e);
            return Ok(());
        };
        match self.pack_records(t, r, pkey, &pack, m, now) {
            Ok(m) => {
                let log_append = pack.topic.config.timestamp_type == TimestampKind::LogAppendTime;
                let mut next = m.next_offset as i64 - pack.records.len() as i64;
                for (tx, n) in pack.waiters {
                    let outcome = AppendOutcome {
                        base_offset: next,
                        last_offset: next + n as i64 - 1,
                        log_append_time_ms: log_append.then_some(now),
                        log_start_offset: m.log_start_offset as i64,
                    };
                    next += n as i64;
                    r.done.push(Done::Append(tx, outcome));
                }
                Ok(())
            }
            Err(e) => {
                pack.doom(r);
                Err(e)
            }
        }
    }

    /// Stores a pack's records as batches; returns the partition's metadata after them.
    fn pack_records(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        pack: &Pack,
        mut m: PartitionMeta,
        now: i64,
    ) -> Result<PartitionMeta, StoreError> {
        let cfg = &pack.topic.config;
        let stamped: Vec<(&NewRecord, i64)> =
            pack.records.iter().map(|rec| (rec, rec.timestamp_ms.unwrap_or(now))).collect();
        let cap = self.cfg.batch_size_bytes_max as usize;
        let mut ratio = *self.ratios.get(&pkey).unwrap_or(&1.0);
        let mut out = Vec::with_capacity(VALUE_PREFIX_LEN + cap + HEADER_LEN);
        let mut i = 0;
        while i < stamped.len() {
            // Take as many records as the expected compressed size allows (at least one).
            let budget = ((cap - HEADER_LEN) as f64 * 0.95 / ratio) as usize;
            let mut raw = 0usize;
            let mut j = i;
            while j < stamped.len() && (j == i || raw + stamped[j].0.encoded_len_max() <= budget) {
                raw += stamped[j].0.encoded_len_max();
                j += 1;
            }
            loop {
                out.clear();
                out.extend_from_slice(&[0u8; VALUE_PREFIX_LEN]);
                let h = batch::encode_batch(
                    &stamped[i..j],
                    m.next_offset as i64,
                    cfg.compression,
                    cfg.timestamp_type,
                    now,
                    &mut out,
                )?;
                let encoded = out.len() - VALUE_PREFIX_LEN;
                if encoded > cap && j - i > 1 {
                    // Compressed worse than expected: halve and retry.
                    j = i + (j - i) / 2;
                    ratio = (ratio * 1.5).min(1.2);
                    continue;
                }
                let observed = (encoded - HEADER_LEN) as f64 / raw.max(1) as f64;
                if cfg.compression != Codec::None {
                    ratio = (ratio * 0.7 + observed * 0.3).clamp(0.02, 1.2);
                }
                self.store_batch(t, r, pkey, &mut m, &mut out, &h, cfg.retention_bytes, now)?;
                break;
            }
            i = j;
        }
        self.ratios.insert(pkey, ratio);
        self.put_meta(t, r, pkey, m)?;
        Ok(m)
    }

    /// Deletes the oldest batch of a partition if `condition(its header, its length, the
    /// partition's metadata)` holds. Returns the footprint freed, `None` if nothing was deleted.
    fn delete_front_if(
        &mut self,
        t: &mut Tables<'_>,
        r: &mut Round,
        pkey: u64,
        condition: impl FnOnce(&BatchHeader, u64, &PartitionMeta) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        let Some(mut m) = self.meta(r, pkey) else { return Ok(None) };
        let first = match t.log.range((pkey, 0u64)..=(pkey, u64::MAX))?.next() {
            Some(e) => {
                let (k, v) = e?;
                let (_, b) = split_value(v.value())?;
                let h = BatchHeader::parse(b).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if !condition(&h, b.len() as u64, &m) {
                    return Ok(None);
                }
                Some((k.value().1, v.value().len(), b.len() as u64, h.next_offset() as u64))
            }
            None => None,
        };
        let Some((base, value_len, batch_len, next)) = first else {
            r.fronts.insert(pkey, None);
            return Ok(None);
        };
        t.log.remove((pkey, base))?;
        let fp = footprint(value_len);
        m.log_start_offset = next;
        m.logical_bytes = m.logical_bytes.saturating_sub(batch_len);
        m.footprint_bytes = m.footprint_bytes.saturating_sub(fp);
        m.batches = m.batches.saturating_sub(1);
        // Time index: entries pointing below the new log start move to it (see tables.rs).
        let mut stale = Vec::new();
        for e in t.time.range((pkey, i64::MIN)..=(pkey, i64::MAX))? {
            let (k, v) = e?;
            if v.value() >= next {
                break;
            }
            stale.push(k.value().1);
        }
        if let Some(&last_ts) = stale.last() {
            for ts in &stale {
                t.time.remove((pkey, *ts))?;
            }
            t.time.insert((pkey, last_ts), next)?;
        }
        let new_front = match t.log.range((pkey, next)..=(pkey, u64::MAX))?.next() {
            Some(e) => Some(split_value(e?.1.value())?.0),
            None => None,
        };
        r.fronts.insert(pkey, new_front);
        self.put_meta(t, r, pkey, m)?;
        r.deleted_batches += 1;
        r.deleted_bytes += batch_len;
        if (next as i64) > self.archived(pkey) {
            r.deleted_unarchived_batches += 1;
        }
        Ok(Some(fp))
    }

    /// The partition's archive mark (-1: none).
    fn archived(&self, pkey: u64) -> i64 {
        self.pstates.get(&pkey).map_or(-1, |p| p.archived.load(Ordering::Relaxed))
    }

    fn footprint_now(&self, r: &Round) -> u64 {
        let mut total = self.footprint_total;
        for (k, m) in &r.metas {
            let before = self.metas.get(k).map_or(0, |m| m.footprint_bytes);
            let after = m.map_or(0, |m| m.footprint_bytes);
            total = total + after - before.min(total + after);
        }
        total
    }

    /// Per-topic `retention.bytes` (Kafka semantics: delete while the partition stays at or
    /// above the limit without the batch) and the global disk budget (oldest batches first,
    /// from the high mark down to the low mark).
    fn size_retention(&mut self, t: &mut Tables<'_>, r: &mut Round) -> Result<(), StoreError> {
        let mut freed = 0u64;
        let cap = self.cfg.retention_delete_bytes_per_commit_max;
        let limited: Vec<(u64, u64)> = r.retention_bytes.iter().map(|(k, l)| (*k, *l)).collect();
        for (pkey, limit) in limited {
            while freed < cap {
                let over = |_: &BatchHeader, len: u64, m: &PartitionMeta| m.logical_bytes.saturating_sub(len) >= limit;
                match self.delete_front_if(t, r, pkey, over)? {
                    Some(fp) => freed += fp,
                    None => break,
                }
            }
        }
        let high = self.cfg.retention_high_bytes();
        let low = self.cfg.retention_low_bytes();
        // Key-value state (sessions, offsets, retained messages) counts against the budget too:
        // log batches are deleted to make room for it.
        let kv = self.kv_total.saturating_add_signed(r.kv_delta);
        let mut total = self.footprint_now(r).saturating_add(kv);
        if total > high {
            self.retention_active = true;
        }
        if !self.retention_active {
            return Ok(());
        }
        // Batches another system already has go first (an archived partition's front), then
        // the oldest front across partitions.
        let archived: Vec<(u64, i64)> = self
            .pstates
            .iter()
            .map(|(k, p)| (*k, p.archived.load(Ordering::Relaxed)))
            .filter(|(_, m)| *m > 0)
            .collect();
        for (pkey, mark) in archived {
            while total > low && freed < cap {
                let below = |h: &BatchHeader, _: u64, _: &PartitionMeta| h.next_offset() <= mark;
                let Some(fp) = self.delete_front_if(t, r, pkey, below)? else { break };
                freed += fp;
                total = total.saturating_sub(fp);
            }
        }
        let mut heap = BinaryHeap::new();
        let keys: Vec<u64> = self.metas.keys().chain(r.metas.keys()).copied().collect();
        let mut seen = std::collections::HashSet::new();
        for pkey in keys {
            if !seen.insert(pkey) {
                continue;
            }
            let Some(m) = self.meta(r, pkey) else { continue };
            if m.batches == 0 {
                continue;
            }
            let front = match self.front(r, pkey) {
                Some(f) => f,
                None => {
                    let f = match t.log.range((pkey, 0u64)..=(pkey, u64::MAX))?.next() {
                        Some(e) => Some(split_value(e?.1.value())?.0),
                        None => None,
                    };
                    r.fronts.insert(pkey, f);
                    f
                }
            };
            if let Some(at) = front {
                heap.push(Reverse((at, pkey)));
            }
        }
        while total > low && freed < cap {
            let Some(Reverse((_, pkey))) = heap.pop() else { break };
            let fp = self.delete_front_if(t, r, pkey, |_, _, _| true)?.unwrap_or(0);
            freed += fp;
            total = total.saturating_sub(fp);
            if let Some(Some(at)) = r.fronts.get(&pkey) {
                heap.push(Reverse((*at, pkey)));
            }
        }
        if total <= low {
            self.retention_active = false;
        }
        Ok(())
    }

    /// `retention.ms`: delete front batches whose max timestamp is older than the limit.
    fn time_retention(&mut self, t: &mut Tables<'_>, r: &mut Round, now: i64) -> Result<(), StoreError> {
        let cap = self.cfg.retention_delete_bytes_per_commit_max;
        let mut freed = 0u64;
        let topics: Vec<Arc<TopicState>> = match self.shared.topics.read() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return Ok(()),
        };
        for topic in topics {
            let Some(ms) = topic.config.retention_ms else { continue };
            let cutoff = now.saturating_sub(ms as i64);
            for p in &topic.partitions {
                while freed < cap {
                    match self.delete_front_if(t, r, p.key, |h, _, _| h.max_timestamp < cutoff)? {
                        Some(fp) => freed += fp,
                        None => break,
                    }
                }
            }
        }
        Ok(())
    }

    fn admin(&mut self, t: &mut Tables<'_>, r: &mut Round, cmd: AdminCmd) -> Result<(), StoreError> {
        match cmd {
            AdminCmd::CreateTopic { name, partitions, config } => {
                validate_topic_name(&name)?;
                if t.topics.get(name.as_str())?.is_some() {
                    return Err(StoreError::TopicExists(name));
                }
                self.check_partitions(&name, partitions, partitions)?;
                let topic_count = t.topics.len()?;
                if topic_count >= u64::from(self.cfg.topics_max) {
                    return Err(StoreError::LimitReached {
                        key: "storage.topics_max",
                        limit: self.cfg.topics_max.into(),
                    });
                }
                let id = t.meta.get(META_NEXT_TOPIC_ID)?.map_or(1, |v| v.value()) as u32;
                t.meta.insert(META_NEXT_TOPIC_ID, u64::from(id) + 1)?;
                let rec = TopicRecord { id, partitions, config_text: config.to_text() };
                t.topics.insert(name.as_str(), rec.encode().as_slice())?;
                let mut states = Vec::with_capacity(partitions as usize);
                for p in 0..partitions {
                    let key = partition_key(id, p);
                    let m = PartitionMeta { max_timestamp: i64::MIN, ..PartitionMeta::default() };
                    self.put_meta(t, r, key, m)?;
                    states.push(PartitionState::new(key, &m));
                }
                r.topic_changes.push(TopicChange::Upsert(Arc::new(TopicState {
                    id,
                    name,
                    config,
                    partitions: states,
                })));
            }
            AdminCmd::DeleteTopic { name } => {
                let rec = match t.topics.get(name.as_str())? {
                    Some(v) => TopicRecord::decode(v.value())?,
                    None => return Err(StoreError::UnknownTopic(name)),
                };
                for p in 0..rec.partitions {
                    let key = partition_key(rec.id, p);
                    t.log.retain_in((key, 0u64)..=(key, u64::MAX), |_, _| false)?;
                    t.time.retain_in((key, i64::MIN)..=(key, i64::MAX), |_, _| false)?;
                    t.parts.remove(key)?;
                    r.metas.insert(key, None);
                    r.fronts.insert(key, None);
                }
                t.topics.remove(name.as_str())?;
                r.topic_changes.push(TopicChange::Remove(name));
            }
            AdminCmd::CreatePartitions { name, total } => {
                let mut rec = match t.topics.get(name.as_str())? {
                    Some(v) => TopicRecord::decode(v.value())?,
                    None => return Err(StoreError::UnknownTopic(name)),
                };
                if total <= rec.partitions {
                    return Err(StoreError::InvalidPartitions {
                        topic: name,
                        reason: format!(
                            "topic has {} partitions; the new count must be larger (got {total})",
                            rec.partitions
                        ),
                    });
                }
                self.check_partitions(&name, total, total - rec.partitions)?;
                let current = self.current_topic(r, &name)?;
                let mut states = current.partitions.clone();
                for p in rec.partitions..total {
                    let key = partition_key(rec.id, p);
                    let m = PartitionMeta { max_timestamp: i64::MIN, ..PartitionMeta::default() };
                    self.put_meta(t, r, key, m)?;
                    states.push(PartitionState::new(key, &m));
                }
                rec.partitions = total;
                t.topics.insert(name.as_str(), rec.encode().as_slice())?;
                r.topic_changes.push(TopicChange::Upsert(Arc::new(TopicState {
                    id: rec.id,
                    name,
                    config: current.config.clone(),
                    partitions: states,
                })));
            }
            AdminCmd::AlterConfig { name, config } => {
                let mut rec = match t.topics.get(name.as_str())? {
                    Some(v) => TopicRecord::decode(v.value())?,
                    None => return Err(StoreError::UnknownTopic(name)),
                };
                rec.config_text = config.to_text();
                t.topics.insert(name.as_str(), rec.encode().as_slice())?;
                let current = self.current_topic(r, &name)?;
                if config.durability == Durability::Fsync {
                    // This commit is durable: nothing relaxed is left to reserve offsets for.
                    for p in &current.partitions {
                        if let Some(m) = self.meta(r, p.key).filter(|m| m.reserved_offset > m.next_offset) {
                            self.put_meta(t, r, p.key, PartitionMeta { reserved_offset: m.next_offset, ..m })?;
                        }
                    }
                }
                r.topic_changes.push(TopicChange::Upsert(Arc::new(TopicState {
                    id: rec.id,
                    name,
                    config,
                    partitions: current.partitions.clone(),
                })));
            }
        }
        Ok(())
    }

    fn check_partitions(&self, name: &str, total: u32, added: u32) -> Result<(), StoreError> {
        if total == 0 || total > self.cfg.partitions_per_topic_max {
            return Err(StoreError::InvalidPartitions {
                topic: name.to_string(),
                reason: format!(
                    "must be between 1 and storage.partitions_per_topic_max = {} (got {total})",
                    self.cfg.partitions_per_topic_max
                ),
            });
        }
        let existing = self.metas.len() as u64;
        if existing + u64::from(added) > u64::from(self.cfg.partitions_total_max) {
            return Err(StoreError::LimitReached {
                key: "storage.partitions_total_max",
                limit: self.cfg.partitions_total_max.into(),
            });
        }
        Ok(())
    }

    /// The topic as of this round (including changes staged earlier in it).
    fn current_topic(&self, r: &Round, name: &str) -> Result<Arc<TopicState>, StoreError> {
        for c in r.topic_changes.iter().rev() {
            match c {
                TopicChange::Upsert(t) if t.name == name => return Ok(t.clone()),
                TopicChange::Remove(n) if n == name => return Err(StoreError::UnknownTopic(name.to_string())),
                _ => {}
            }
        }
        self.shared
            .topics
            .read()
            .map_err(|_| StoreError::Closed)?
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::UnknownTopic(name.to_string()))
    }

    /// After a successful commit: memory catches up with the database, readers are woken and
    /// waiters answered - in that order, so an acknowledged offset is already readable.
    fn publish(&mut self, r: Round) {
        let topics_changed = !r.topic_changes.is_empty();
        if let Ok(mut topics) = self.shared.topics.write() {
            for change in r.topic_changes {
                match change {
                    TopicChange::Upsert(t) => {
                        for p in &t.partitions {
                            self.pstates.insert(p.key, p.clone());
                        }
                        topics.insert(t.name.clone(), t);
                    }
                    TopicChange::Remove(name) => {
                        topics.remove(&name);
                    }
                }
            }
        }
        for (k, f) in r.fronts {
            self.fronts.insert(k, f);
        }
        for (k, e) in r.producers {
            self.producers.insert(k, e);
        }
        for (pkey, m) in r.metas {
            match m {
                Some(m) => {
                    let before = self.metas.insert(pkey, m);
                    let (bf, bl) = before.map_or((0, 0), |b| (b.footprint_bytes, b.logical_bytes));
                    self.footprint_total =
                        self.footprint_total + m.footprint_bytes - bf.min(self.footprint_total + m.footprint_bytes);
                    self.logical_total =
                        self.logical_total + m.logical_bytes - bl.min(self.logical_total + m.logical_bytes);
                    if let Some(p) = self.pstates.get(&pkey) {
                        p.logical_bytes.store(m.logical_bytes, Ordering::Relaxed);
                        p.footprint_bytes.store(m.footprint_bytes, Ordering::Relaxed);
                        p.signal.send_modify(|s| {
                            s.watermarks.log_start_offset = m.log_start_offset as i64;
                            s.watermarks.high_watermark = m.next_offset as i64;
                        });
                    }
                }
                None => {
                    if let Some(b) = self.metas.remove(&pkey) {
                        self.footprint_total = self.footprint_total.saturating_sub(b.footprint_bytes);
                        self.logical_total = self.logical_total.saturating_sub(b.logical_bytes);
                    }
                    self.fronts.remove(&pkey);
                    self.ratios.remove(&pkey);
                    if let Some(p) = self.pstates.remove(&pkey) {
                        p.signal.send_modify(|s| s.deleted = true);
                    }
                }
            }
        }
        if topics_changed {
            // After the topic map and watermarks: a woken reader sees the new topics.
            self.shared.topics_changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        let c = &self.shared.counters;
        c.appended_records.fetch_add(r.appended_records, Ordering::Relaxed);
        c.appended_batches.fetch_add(r.appended_batches, Ordering::Relaxed);
        c.appended_bytes.fetch_add(r.appended_bytes, Ordering::Relaxed);
        c.retention_deleted_batches.fetch_add(r.deleted_batches, Ordering::Relaxed);
        c.retention_deleted_unarchived_batches.fetch_add(r.deleted_unarchived_batches, Ordering::Relaxed);
        c.retention_deleted_bytes.fetch_add(r.deleted_bytes, Ordering::Relaxed);
        self.kv_total = self.kv_total.saturating_add_signed(r.kv_delta);
        c.footprint_bytes.store(self.footprint_total, Ordering::Relaxed);
        c.logical_bytes.store(self.logical_total, Ordering::Relaxed);
        c.kv_bytes.store(self.kv_total, Ordering::Relaxed);
        for d in r.done {
            d.send();
        }
    }
}

/// Answers ops that were not applied with `e` (the probe: its writer is alive, the write is not).
fn fail_ops(ops: Vec<Op>, e: &StoreError) {
    for op in ops {
        match op {
            Op::Append { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            Op::Admin { reply, .. } | Op::Kv { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            Op::Probe { reply } => {
                let _ = reply.send(Ok(Some(e.clone())));
            }
            Op::Tick | Op::Shutdown => {}
        }
    }
}

/// The database once no reader holds it any more (readers hold it for one read each); `None`
/// after 5 s (it is dropped, and closes, when the last reader finishes).
fn wait_unshared(mut db: Arc<Database>) -> Option<Database> {
    for _ in 0..500 {
        match Arc::try_unwrap(db) {
            Ok(owned) => return Some(owned),
            Err(still_shared) => {
                db = still_shared;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    None
}
