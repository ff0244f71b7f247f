//! The single writer thread that owns every write to the database: it drains the bounded queue
//! into one transaction per round (group commit), commits once, and only then publishes new
//! watermarks and answers the waiters. Retention runs inside the same rounds. It also owns the
//! two recoveries: offsets reserved for `relaxed` commits (gap batches after a crash), and the
//! in-process reopen of the database after a failed write (see `Writer::write_failed`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redb::{
    Database, Durability as RedbDurability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableHandle,
    WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use crate::batch::{self, BatchHeader, NewRecord, HEADER_LEN};
use crate::clock::now_ms;
use crate::config::{Codec, Durability, StorageConfig, TimestampKind, TopicConfig};
use crate::error::StoreError;
use crate::producers::{self, ProducerEntry, ProducerStates, SeqCheck};
use crate::stored::{self, LogTable, PiecesTable};
use crate::tables::{
    kv_footprint, partition_key, split_value, CleanState, PartitionMeta, TopicRecord, COMPACTION, LOG, LOG_PIECES,
    META, META_NEXT_TOPIC_ID, META_PROBE, PARTITIONS, TIME_INDEX, TIME_INDEX_INTERVAL_BYTES, TOPICS, VALUE_PREFIX_LEN,
};
use crate::{disk, AppendOutcome, KvSpace, PartitionState, Shared, TopicState};

mod admin;
mod append;
mod compaction;
mod open;
mod restore;
mod retention;

pub use admin::validate_topic_name;
pub(crate) use open::{load, Loaded};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(crate) enum AppendData {
    /// A validated client batch, after `VALUE_PREFIX_LEN` bytes of room for the append time.
    Batch { bytes: BytesMut, header: BatchHeader },
    /// Records to pack.
    Records(Vec<NewRecord>),
}

/// Records appended to another partition in the same commit as an `Op::Append` (all durable, or
/// none), answered on their own reply after that commit.
pub(crate) struct AlsoAppend {
    pub topic: Arc<TopicState>,
    pub pkey: u64,
    pub records: Vec<NewRecord>,
    pub reply: Reply<AppendOutcome>,
}

/// One key-value write: space, key, value (`None` = remove).
pub(crate) type KvWrite = (KvSpace, Vec<u8>, Option<Vec<u8>>);

pub(crate) enum AdminCmd {
    CreateTopic {
        name: String,
        partitions: u32,
        config: TopicConfig,
    },
    DeleteTopic {
        name: String,
    },
    CreatePartitions {
        name: String,
        total: u32,
    },
    AlterConfig {
        name: String,
        config: TopicConfig,
    },
    /// Kafka's DeleteRecords: the partition's log start moves up to `offset` (-1: the high
    /// watermark); the batches wholly below it go in bounded steps (`trim_below_log_start`).
    DeleteRecords {
        name: String,
        partition: i32,
        offset: i64,
    },
}

pub(crate) enum Op {
    Append {
        topic: Arc<TopicState>,
        pkey: u64,
        data: AppendData,
        /// Key-value writes committed in the same transaction as the append (or not at all).
        kv: Vec<KvWrite>,
        /// Records for other partitions committed in the same transaction (or not at all).
        also: Vec<AlsoAppend>,
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
    /// Records restored at their original offsets (`Store::restore_records`), with key-value
    /// writes committed in the same transaction (the restore's progress).
    Restore {
        topic: Arc<TopicState>,
        pkey: u64,
        records: Vec<(i64, NewRecord)>,
        /// `Store::restore_end`: no records; the next offset moves up to this.
        end: Option<i64>,
        kv: Vec<KvWrite>,
        reply: Reply<AppendOutcome>,
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
            Op::Restore { .. } => "Restore",
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
            Op::Append { data, also, .. } => {
                let main = match data {
                    AppendData::Batch { bytes, .. } => bytes.len() as u64,
                    AppendData::Records(r) => r.iter().map(|r| r.encoded_len_max() as u64).sum(),
                };
                let more: u64 = also.iter().flat_map(|a| &a.records).map(|r| r.encoded_len_max() as u64).sum();
                main + more
            }
            Op::Kv { entries, .. } => {
                entries.iter().map(|(k, v)| (k.len() + v.as_ref().map_or(0, Vec::len)) as u64).sum()
            }
            Op::Restore { records, .. } => records.iter().map(|(_, r)| r.encoded_len_max() as u64).sum(),
            _ => 64,
        }
    }

    fn needs_fsync(&self) -> bool {
        match self {
            Op::Append { topic, also, .. } => {
                topic.config.durability == Durability::Fsync
                    || also.iter().any(|a| a.topic.config.durability == Durability::Fsync)
            }
            // A restored record counts as restored only once durable, whatever the topic's
            // durability.
            Op::Admin { .. } | Op::Kv { .. } | Op::Probe { .. } | Op::Restore { .. } => true,
            Op::Tick | Op::Shutdown => false,
        }
    }

    /// Whether the op would add bytes to the database (refused while the disk is full).
    fn inserts(&self) -> bool {
        match self {
            Op::Append { .. } | Op::Probe { .. } | Op::Restore { .. } => true,
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

pub(crate) use crate::accounting::{apply_delta, debit};

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
    /// Batches written this round for the tail cache: partition, base and next offset, the batch;
    /// only the newest that fit the cache (older ones would be evicted at the commit anyway, and
    /// a round may write 8 MiB for a 1 MiB cache: their copies are not kept, nor made).
    cached: std::collections::VecDeque<(u64, i64, i64, bytes::Bytes)>,
    /// Bytes in `cached`.
    cached_bytes: usize,
    /// Partitions with a batch of this round left out of `cached`: what the cache holds of them
    /// no longer leads up to their tail, so it is cleared at the commit (as the cache does when
    /// a batch it cannot hold arrives).
    cache_cleared: HashSet<u64>,
    /// What compaction did this round.
    compaction: compaction::CompactionRound,
    /// Time index marks as of this round (`Writer::time_marks` once committed).
    time_marks: HashMap<u64, TimeMark>,
    /// The round holds a restore (`Op::Restore`): it is not staged, since a restore that
    /// failed is written again at the same offsets, which a gap over staged offsets would take.
    restores: bool,
}

struct Tables<'t> {
    log: LogTable<'t>,
    pieces: PiecesTable<'t>,
    parts: Table<'t, u64, &'static [u8]>,
    time: Table<'t, (u64, i64), u64>,
    topics: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    clean: Table<'t, u64, &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            log: txn.open_table(LOG)?,
            pieces: txn.open_table(LOG_PIECES)?,
            parts: txn.open_table(PARTITIONS)?,
            time: txn.open_table(TIME_INDEX)?,
            topics: txn.open_table(TOPICS)?,
            meta: txn.open_table(META)?,
            clean: txn.open_table(COMPACTION)?,
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
    /// The tail cache's budget (`storage.tail_cache_bytes_max`).
    tail: crate::tail::TailBudget,
    /// Compaction states of compacted partitions, as committed (a cache of the `compaction`
    /// table; a partition not here is read from the table).
    clean: HashMap<u64, CleanState>,
    /// The compaction pass under way (its key map is in memory only).
    pass: Option<compaction::Pass>,
    last_compaction_check: Instant,
    /// The data directory's volume, asked for free space before every round that writes.
    volume: disk::Volume,
    /// Partitions that may hold batches wholly below their log start (after DeleteRecords, and
    /// every partition after an open): deleted in bounded steps by `trim_below_log_start`.
    trim: std::collections::BTreeSet<u64>,
    /// Each partition's place in its sparse time index (`tables::TIME_INDEX`), as committed;
    /// a partition not here is read from the tables at its next append.
    time_marks: HashMap<u64, TimeMark>,
    /// Partitions a durable round staged (`stage`) and then failed to commit, with the end of
    /// what it staged: staged readers may have taken those offsets' records, so the next round
    /// that commits covers `[next offset, end)` with a gap batch before anything else
    /// (`cover_lost_stages`) and no other record ever gets them. Kept across reopens.
    lost_stages: HashMap<u64, u64>,
}

/// Where a partition's sparse time index stands (`tables::TIME_INDEX`): the first batch that
/// raised the running max timestamp since the newest entry, and the batch bytes stored from it
/// on. `pending: None`: the newest entry covers the running max.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TimeMark {
    pub pending: Option<(u64, u64)>,
}

/// Whether a failed round means the database must be reopened: redb latches an I/O failure
/// ("Previous I/O error occurred") until the `Database` is dropped.
fn is_storage_fault(e: &StoreError) -> bool {
    matches!(e, StoreError::Storage(_) | StoreError::Io { .. })
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, db: Arc<Database>, loaded: Loaded) -> Self {
        let cfg = shared.config.clone();
        let tail = crate::tail::TailBudget::new(cfg.tail_cache_bytes_max);
        let volume = disk::Volume::open(&cfg.data_dir);
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
            tail,
            clean: HashMap::new(),
            pass: None,
            last_compaction_check: Instant::now(),
            volume,
            trim: std::collections::BTreeSet::new(),
            time_marks: HashMap::new(),
            lost_stages: HashMap::new(),
        };
        w.adopt(loaded);
        w
    }

    /// Takes over the state read from the database (at open and after a reopen); the topic map
    /// in `Shared` must already hold the partition states.
    fn adopt(&mut self, loaded: Loaded) {
        // What was cached stays true, but the partitions may be new objects: start afresh.
        for p in self.pstates.values() {
            p.tail.clear();
        }
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
        self.clean.clear();
        self.pass = None;
        // A DeleteRecords committed before a crash may have left batches below a log start.
        self.trim = self.metas.keys().copied().collect();
        // Read from the tables again at each partition's next append.
        self.time_marks.clear();
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut shutdown = false;
        while !shutdown {
            let first = if self.compaction_pending() && self.fault.is_none() {
                // A compaction pass is under way: when idle, run rounds of it alone.
                match rx.try_recv() {
                    Ok(op) => op,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        self.round(Vec::new());
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                let Some(op) = rx.blocking_recv() else { break };
                op
            };
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
        if disk_full.is_some() {
            // The figure of free bytes stays out of the text, so repeats coalesce.
            let detail =
                format!("writes refused: disk full (storage.disk_free_bytes_min = {})", self.cfg.disk_free_bytes_min);
            self.shared.refusals.record(crate::refusals::RefusalKind::Storage, "store", "", &detail);
        }

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
        // Staged readers take the round's batches while the disk writes (see `stage`).
        let staged = if applied.is_ok() && durable { self.stage(&mut r) } else { HashMap::new() };
        let result = applied.and_then(|()| {
            if !durable {
                txn.set_durability(RedbDurability::None)?;
            }
            txn.commit().map_err(StoreError::from)
        });
        drop(db);
        if result.is_err() {
            self.unstage(staged);
        }
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
                // The pass's progress of this round is undone: it starts again.
                self.pass = None;
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

    fn disk_full(&self) -> Option<StoreError> {
        match self.volume.free_bytes() {
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
        if !self.lost_stages.is_empty() {
            // Before anything of this round: a key-value write of it (a subscriber's stored
            // position) may count on the gap.
            if let Err(e) = self.cover_lost_stages(&mut t, r, now) {
                r.unanswered = ops;
                return Err(e);
            }
            *durable = true;
        }
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
            if let Err(e) = self.trim_below_log_start(&mut t, r) {
                break 'apply Err(e);
            }
            if tick && self.last_time_retention.elapsed().as_millis() as u64 >= self.cfg.retention_check_interval_ms {
                self.last_time_retention = Instant::now();
                if let Err(e) = self.time_retention(&mut t, r, now) {
                    break 'apply Err(e);
                }
            }
            // Compaction looks for work at the ticker's period (the shorter of the retention
            // check and relaxed flush intervals): a look is two b-tree lookups per compacted
            // partition.
            let period = self.cfg.retention_check_interval_ms.min(self.cfg.relaxed_flush_interval_ms);
            let check = self.last_compaction_check.elapsed().as_millis() as u64 >= period;
            if check {
                self.last_compaction_check = Instant::now();
            }
            if let Err(e) = self.compaction_step(&mut t, r, now, check) {
                break 'apply Err(e);
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
            Op::Append { topic, pkey, data, kv, also, reply } => {
                let refused = disk_full.cloned().or_else(|| {
                    std::iter::once((&topic, pkey))
                        .chain(also.iter().map(|a| (&a.topic, a.pkey)))
                        .find(|(_, k)| self.meta(r, *k).is_none())
                        .map(|(t, _)| StoreError::UnknownTopic(t.name.clone()))
                });
                if let Some(e) = refused {
                    let _ = reply.send(Err(e.clone()));
                    for a in also {
                        let _ = a.reply.send(Err(e.clone()));
                    }
                    return Ok(());
                }
                for k in std::iter::once((&topic, pkey)).chain(also.iter().map(|a| (&a.topic, a.pkey))) {
                    if k.0.config.durability == Durability::Relaxed {
                        r.relaxed.insert(k.1);
                    }
                }
                // Only record appends carry `also` (`Store::enqueue_appends`), so nothing below
                // returns before they are queued.
                debug_assert!(also.is_empty() || matches!(data, AppendData::Records(_)));
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
                // They join the round's packs, so they are flushed in this transaction.
                for a in also {
                    let n = a.records.len();
                    match packs.iter_mut().find(|(k, _)| *k == a.pkey) {
                        Some((_, p)) => {
                            p.records.extend(a.records);
                            p.waiters.push((a.reply, n));
                        }
                        None => packs
                            .push((a.pkey, Pack { topic: a.topic, records: a.records, waiters: vec![(a.reply, n)] })),
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
            Op::Restore { topic, pkey, records, end, kv, reply } => {
                r.restores = true;
                if let Some(e) = disk_full {
                    let _ = reply.send(Err(e.clone()));
                    return Ok(());
                }
                // Keep order within the partition: records queued before are written first.
                if let Some(i) = packs.iter().position(|(k, _)| *k == pkey) {
                    let (k, p) = packs.remove(i);
                    if let Err(e) = self.flush_pack(t, r, k, p, now) {
                        r.done.push(Done::Doomed(reply));
                        return Err(e);
                    }
                }
                match match end {
                    Some(end) => self.apply_restore_end(t, r, &topic, pkey, end),
                    None => self.apply_restore(t, r, &topic, pkey, &records, now),
                } {
                    Ok(Ok(outcome)) => {
                        r.done.push(Done::Append(reply, outcome));
                        for (space, key, value) in kv {
                            Self::kv_apply(txn, r, space, &key, value.as_deref())?;
                        }
                    }
                    // Refused before anything was written for it.
                    Ok(Err(e)) => {
                        let _ = reply.send(Err(e));
                    }
                    Err(e) => {
                        r.done.push(Done::Doomed(reply));
                        return Err(e);
                    }
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

    /// Moves the round's batches into the tail cache: first the partitions compaction rewrote
    /// (the cache must never serve their old batches) and those whose run of batches in the
    /// cache broke are cleared. Returns the end of each partition's new batches. A durable
    /// round does it before its commit (`stage`), any other at `publish`; the second call
    /// finds nothing left to do.
    fn fill_tail(&mut self, r: &mut Round) -> HashMap<u64, i64> {
        for pkey in r.compaction.rewritten.drain().chain(r.cache_cleared.drain()) {
            if let Some(p) = self.pstates.get(&pkey) {
                p.tail.clear();
            }
        }
        // One entry per partition (a round may write to thousands), the last batch's end.
        let mut ends: HashMap<u64, i64> = HashMap::new();
        for (pkey, base, next, bytes) in r.cached.drain(..) {
            if let Some(p) = self.pstates.get(&pkey) {
                self.tail.add(&p.tail, base, next, bytes);
                ends.insert(pkey, next);
            }
        }
        r.cached_bytes = 0;
        self.shared.counters.tail_cache_bytes.store(self.tail.held_bytes() as u64, Ordering::Relaxed);
        ends
    }

    /// Before a durable round's commit: its batches go into the tail cache and each partition's
    /// staged end moves past them, so staged readers (MQTT delivery,
    /// [`Store::staged_watermarks`](crate::Store::staged_watermarks)) take them while the disk
    /// writes. Returns what was staged, for `unstage` if the commit fails. A round that creates
    /// topics stages nothing (its partitions are not in memory before `publish`), nor does one
    /// that restores records (`Round::restores`).
    fn stage(&mut self, r: &mut Round) -> HashMap<u64, i64> {
        if !r.topic_changes.is_empty() || r.restores {
            return HashMap::new();
        }
        let ends = self.fill_tail(r);
        for (&pkey, &end) in &ends {
            if let Some(p) = self.pstates.get(&pkey) {
                p.staged.send_modify(|e| *e = (*e).max(end));
            }
        }
        ends
    }

    /// A staged round's commit failed: its batches leave the cache, the staged ends go back to
    /// the committed high watermarks, and the offsets it showed are kept in `lost_stages` for
    /// the gap that the next committed round writes over them.
    fn unstage(&mut self, staged: HashMap<u64, i64>) {
        for (pkey, end) in staged {
            let lost = self.lost_stages.entry(pkey).or_insert(0);
            *lost = (*lost).max(end as u64);
            if let Some(p) = self.pstates.get(&pkey) {
                p.tail.clear();
                let hw = p.signal.borrow().watermarks.high_watermark;
                p.staged.send_replace(hw);
            }
        }
        self.shared.counters.tail_cache_bytes.store(self.tail.held_bytes() as u64, Ordering::Relaxed);
    }

    /// After a successful commit: memory catches up with the database, readers are woken and
    /// waiters answered - in that order, so an acknowledged offset is already readable.
    fn publish(&mut self, mut r: Round) {
        let topics_changed = !r.topic_changes.is_empty();
        if let Ok(mut topics) = self.shared.topics.write() {
            for change in r.topic_changes.drain(..) {
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
        // Into the cache before the watermarks move, so a woken reader finds the batches there
        // (a staged round's batches are there already).
        self.fill_tail(&mut r);
        for (k, f) in r.fronts {
            self.fronts.insert(k, f);
        }
        for (k, e) in r.producers {
            self.producers.insert(k, e);
        }
        self.time_marks.extend(r.time_marks);
        for (pkey, s) in r.compaction.states.drain() {
            match s {
                Some(s) => self.clean.insert(pkey, s),
                None => self.clean.remove(&pkey),
            };
        }
        for (pkey, m) in r.metas {
            match m {
                Some(m) => {
                    let before = self.metas.insert(pkey, m);
                    let (bf, bl) = before.map_or((0, 0), |b| (b.footprint_bytes, b.logical_bytes));
                    debug_assert!(
                        before
                            .is_none_or(|b| m.next_offset >= b.next_offset && m.log_start_offset >= b.log_start_offset),
                        "partition {pkey:#x}: offsets moved back ({before:?} -> {m:?})"
                    );
                    self.footprint_total = debit(self.footprint_total + m.footprint_bytes, bf, "footprint total");
                    self.logical_total = debit(self.logical_total + m.logical_bytes, bl, "logical total");
                    if let Some(p) = self.pstates.get(&pkey) {
                        p.logical_bytes.store(m.logical_bytes, Ordering::Relaxed);
                        p.footprint_bytes.store(m.footprint_bytes, Ordering::Relaxed);
                        p.set_watermarks(m.log_start_offset as i64, m.next_offset as i64);
                    }
                }
                None => {
                    if let Some(b) = self.metas.remove(&pkey) {
                        self.footprint_total = debit(self.footprint_total, b.footprint_bytes, "footprint total");
                        self.logical_total = debit(self.logical_total, b.logical_bytes, "logical total");
                    }
                    self.fronts.remove(&pkey);
                    self.ratios.remove(&pkey);
                    self.time_marks.remove(&pkey);
                    if let Some(p) = self.pstates.remove(&pkey) {
                        p.tail.clear();
                        p.set_deleted();
                    }
                }
            }
        }
        if topics_changed {
            // After the topic map and watermarks: a woken reader sees the new topics.
            self.shared.topics_changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        if !self.lost_stages.is_empty() {
            // Covered by a gap in this round (`cover_lost_stages`), or the partition is gone.
            let metas = &self.metas;
            self.lost_stages.retain(|k, end| metas.get(k).is_some_and(|m| m.next_offset < *end));
        }
        let c = &self.shared.counters;
        c.appended_records.fetch_add(r.appended_records, Ordering::Relaxed);
        c.appended_batches.fetch_add(r.appended_batches, Ordering::Relaxed);
        c.appended_bytes.fetch_add(r.appended_bytes, Ordering::Relaxed);
        c.retention_deleted_batches.fetch_add(r.deleted_batches, Ordering::Relaxed);
        c.retention_deleted_unarchived_batches.fetch_add(r.deleted_unarchived_batches, Ordering::Relaxed);
        c.retention_deleted_bytes.fetch_add(r.deleted_bytes, Ordering::Relaxed);
        c.compaction_reclaimed_bytes.fetch_add(r.compaction.reclaimed_bytes, Ordering::Relaxed);
        c.compaction_removed_records.fetch_add(r.compaction.removed_records, Ordering::Relaxed);
        c.compaction_passes.fetch_add(r.compaction.passes, Ordering::Relaxed);
        self.kv_total = apply_delta(self.kv_total, r.kv_delta, "key-value bytes");
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
            Op::Restore { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            Op::Append { reply, also, .. } => {
                let _ = reply.send(Err(e.clone()));
                for a in also {
                    let _ = a.reply.send(Err(e.clone()));
                }
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

#[cfg(test)]
mod tests {
    use super::{apply_delta, debit};

    #[test]
    fn accounting_moves_by_exact_amounts() {
        assert_eq!(debit(10, 4, "t"), 6);
        assert_eq!(debit(4, 4, "t"), 0);
        assert_eq!(apply_delta(10, -3, "t"), 7);
        assert_eq!(apply_delta(10, 5, "t"), 15);
    }

    /// A debit of more than was accounted is a bookkeeping bug: tests stop at it (saturating
    /// arithmetic, which this replaced, would have hidden it at zero).
    #[test]
    #[should_panic(expected = "goes below zero")]
    fn accounting_below_zero_is_caught_in_tests() {
        debit(3, 4, "partition logical bytes");
    }

    #[test]
    #[should_panic(expected = "goes below zero")]
    fn a_negative_delta_past_zero_is_caught_in_tests() {
        apply_delta(3, -4, "key-value bytes");
    }
}
