//! The durable log store: topics with partitions whose logs are RecordBatch v2 batches in one redb
//! database. Appends go through a single writer thread that commits in groups and acknowledges
//! only after the commit returned; reads open their own short read transaction. A failed write
//! does not latch: the writer reopens the database in-process (see `writer/open.rs`).

pub mod accounting;
pub mod batch;
pub mod clock;
pub mod compression;
pub mod config;
pub mod disk;
pub mod error;
pub mod histogram;
pub mod journal;
pub mod keymap;
mod producers;
pub mod refusals;
#[cfg(any(test, feature = "sim-disk"))]
pub mod simdisk;
mod stored;
pub mod tables;
mod tail;
mod writer;
mod zero_ahead;

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redb::{Database, ReadableDatabase, StorageBackend};
use tokio::sync::{mpsc, oneshot, watch};

use batch::{BatchHeader, NewRecord, StoredRecord};
pub use config::{
    CleanupPolicy, Codec, ConfigError, Durability, StorageConfig, TimestampKind, TopicConfig, TopicTemplate,
};
pub use error::StoreError;
use tables::{split_value, LOG, LOG_PIECES, TIME_INDEX};
pub use writer::validate_topic_name;
use writer::{AdminCmd, AppendData, Op};

/// File name of the database inside `storage.data_dir`.
pub const DB_FILE_NAME: &str = "tributary.redb";
/// The commit journal's file in `storage.data_dir` (`journal.rs`).
pub const JOURNAL_FILE_NAME: &str = "tributary.journal";

/// A partition's offset bounds: readable offsets are `[log_start_offset, high_watermark)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Watermarks {
    pub log_start_offset: i64,
    pub high_watermark: i64,
}

/// What the writer publishes to readers after each commit.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PartitionSignal {
    pub watermarks: Watermarks,
    pub deleted: bool,
}

/// In-memory state of one partition shared with readers.
#[derive(Debug)]
pub(crate) struct PartitionState {
    pub key: u64,
    /// The committed watermarks (what every reader but a staged one sees).
    pub signal: watch::Sender<PartitionSignal>,
    /// The staged end (see [`Store::staged_watermarks`]): at least the high watermark, above it
    /// while a durable round's batches wait in the tail cache for their commit. Sent when a
    /// round stages, and when a commit moves the high watermark past it.
    pub staged: watch::Sender<i64>,
    pub logical_bytes: AtomicU64,
    pub footprint_bytes: AtomicU64,
    /// Offset below which another system holds a copy of the partition (-1: nothing known).
    /// Global retention deletes archived batches first.
    pub archived: AtomicI64,
    /// The newest committed batches (see `tail`).
    pub tail: Arc<tail::PartitionTail>,
}

impl PartitionState {
    fn new(key: u64, meta: &tables::PartitionMeta) -> Arc<Self> {
        let (signal, _) = watch::channel(PartitionSignal {
            watermarks: Watermarks {
                log_start_offset: meta.log_start_offset as i64,
                high_watermark: meta.next_offset as i64,
            },
            deleted: false,
        });
        Arc::new(Self {
            key,
            signal,
            staged: watch::channel(meta.next_offset as i64).0,
            logical_bytes: AtomicU64::new(meta.logical_bytes),
            footprint_bytes: AtomicU64::new(meta.footprint_bytes),
            archived: AtomicI64::new(-1),
            tail: Arc::default(),
        })
    }
}

impl PartitionState {
    /// Moves the committed watermarks (after a commit, or a reopen). The staged end follows the
    /// high watermark up; staged readers are woken only if it moved (a round that was not
    /// staged): one that waits for a commit watches `signal`.
    pub(crate) fn set_watermarks(&self, log_start_offset: i64, high_watermark: i64) {
        self.signal.send_modify(|s| {
            s.watermarks.log_start_offset = log_start_offset;
            s.watermarks.high_watermark = high_watermark;
        });
        self.staged.send_if_modified(|e| {
            let raised = high_watermark > *e;
            *e = (*e).max(high_watermark);
            raised
        });
    }

    /// The partition is gone (deleted, or absent after a reopen): every watcher wakes to see it.
    pub(crate) fn set_deleted(&self) {
        self.signal.send_modify(|s| s.deleted = true);
        self.staged.send_modify(|_| ());
    }
}

/// In-memory state of one topic; replaced as a whole when its settings or partitions change.
#[derive(Debug)]
pub(crate) struct TopicState {
    pub id: u32,
    pub name: String,
    pub config: TopicConfig,
    pub partitions: Vec<Arc<PartitionState>>,
}

/// Result of an acknowledged (durable) append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub base_offset: i64,
    pub last_offset: i64,
    /// The broker's timestamp for LogAppendTime topics, `None` for CreateTime topics.
    pub log_append_time_ms: Option<i64>,
    pub log_start_offset: i64,
}

/// An append in the writer's queue; resolves once it is durable (or refused).
#[derive(Debug)]
pub struct PendingAppend(oneshot::Receiver<Result<AppendOutcome, StoreError>>);

impl PendingAppend {
    pub async fn wait(self) -> Result<AppendOutcome, StoreError> {
        self.0.await.map_err(|_| StoreError::Closed)?
    }
}

/// How far an in-memory read goes ([`Store::read_records_cached_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadTo {
    /// Up to the high watermark: committed records only.
    Committed,
    /// Up to the staged end: the records of a round waiting for its commit too.
    Staged,
}

/// Wakes on changes of one partition's watermarks; see [`Store::watch`] and
/// [`Store::watch_staged`].
#[derive(Debug)]
pub struct PartitionWatch(WatchOn);

#[derive(Debug)]
enum WatchOn {
    Committed(watch::Receiver<PartitionSignal>),
    /// The staged end, and the partition for its `deleted` flag.
    Staged(watch::Receiver<i64>, Arc<PartitionState>),
}

impl PartitionWatch {
    /// Waits for the next change; returns false if the partition is gone (deleted or store closed).
    pub async fn changed(&mut self) -> bool {
        match &mut self.0 {
            WatchOn::Committed(rx) => rx.changed().await.is_ok() && !rx.borrow().deleted,
            WatchOn::Staged(rx, p) => rx.changed().await.is_ok() && !p.signal.borrow().deleted,
        }
    }
}

/// Whole batches read from a partition.
#[derive(Debug, Clone)]
pub struct FetchedBatches {
    /// Concatenated RecordBatch v2 bytes, base offsets as stored.
    pub data: Bytes,
    pub batches: usize,
    /// Offset after the last returned record (where the next fetch continues).
    pub next_offset: i64,
    pub watermarks: Watermarks,
}

/// Description of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub id: u32,
    pub partitions: u32,
    pub config: TopicConfig,
}

/// Description of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    pub watermarks: Watermarks,
    pub logical_bytes: u64,
    pub footprint_bytes: u64,
}

/// A key-value space: a table of its own (`kv.<name>`) in the same database, written through the
/// same writer (a space's writes commit with appends, all or nothing), for state the store's users
/// keep durably. The store names only its own space (`ARCHIVE_MARKS`); users name theirs with
/// [`KvSpace::named`]. A space's table is created by its first write; until then it reads empty.
/// The name is part of the file format: a renamed space starts empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvSpace {
    table: &'static str,
}

impl KvSpace {
    /// The space whose table is `table`, which must start with `kv.` (checked at compile time
    /// when used in a `const`) so no space can be one of the store's own tables.
    pub const fn named(table: &'static str) -> Self {
        let b = table.as_bytes();
        assert!(
            b.len() > 3 && b[0] == b'k' && b[1] == b'v' && b[2] == b'.',
            "a key-value space's table starts with `kv.`"
        );
        KvSpace { table }
    }

    /// The store's own space: per partition, the offset below which another system holds a copy
    /// (`Store::set_archived`). Its table name predates the crate and is kept for existing files.
    const ARCHIVE_MARKS: KvSpace = KvSpace::named("kv.mirror");

    /// Whether a table name is a key-value space's.
    pub(crate) fn is_space(table: &str) -> bool {
        table.starts_with("kv.")
    }

    pub(crate) fn table(self) -> redb::TableDefinition<'static, &'static [u8], &'static [u8]> {
        redb::TableDefinition::new(self.table)
    }
}

/// A key and its value from a key-value space.
pub type KvEntry = (Vec<u8>, Vec<u8>);

/// Counters of the store's work since it was opened.
#[derive(Debug)]
pub(crate) struct Counters {
    pub commit_latency_micros: crate::histogram::Histogram,
    pub records_per_commit: crate::histogram::Histogram,
    pub commits: AtomicU64,
    pub durable_commits: AtomicU64,
    pub commit_micros_total: AtomicU64,
    pub appended_records: AtomicU64,
    pub appended_batches: AtomicU64,
    pub appended_bytes: AtomicU64,
    pub retention_deleted_batches: AtomicU64,
    pub retention_deleted_bytes: AtomicU64,
    /// Batches retention deleted before they were archived (`Store::set_archived`).
    pub retention_deleted_unarchived_batches: AtomicU64,
    pub footprint_bytes: AtomicU64,
    pub logical_bytes: AtomicU64,
    pub kv_bytes: AtomicU64,
    /// Every failed commit (each failed write of a storage fault counts, not only the first).
    pub failed_commits: AtomicU64,
    /// In-process reopens of the database after a failed write, and reopen attempts that failed.
    pub reopens: AtomicU64,
    pub failed_reopens: AtomicU64,
    /// The tail cache: bytes held, and reads it served or could not serve.
    pub tail_cache_bytes: AtomicU64,
    pub tail_cache_hits: AtomicU64,
    pub tail_cache_misses: AtomicU64,
    /// Compaction: bytes of batches it removed, records it removed, passes it finished, and
    /// (as of its last look at the compacted partitions) their dirty bytes, the highest dirty
    /// share (millionths) and the age of the oldest dirty batch.
    pub compaction_reclaimed_bytes: AtomicU64,
    pub compaction_removed_records: AtomicU64,
    pub compaction_passes: AtomicU64,
    pub compaction_dirty_bytes: AtomicU64,
    pub compaction_dirty_ratio_max_ppm: AtomicU64,
    pub compaction_lag_ms: AtomicU64,
    /// The commit journal's (`journal.rs`), kept across reopens.
    pub journal: Arc<journal::JournalCounters>,
}

impl Default for Counters {
    fn default() -> Self {
        use crate::histogram::{Histogram, COMMIT_MICROS, RECORDS_PER_COMMIT};
        Self {
            commit_latency_micros: Histogram::new(COMMIT_MICROS),
            records_per_commit: Histogram::new(RECORDS_PER_COMMIT),
            commits: AtomicU64::default(),
            durable_commits: AtomicU64::default(),
            commit_micros_total: AtomicU64::default(),
            appended_records: AtomicU64::default(),
            appended_batches: AtomicU64::default(),
            appended_bytes: AtomicU64::default(),
            retention_deleted_batches: AtomicU64::default(),
            retention_deleted_bytes: AtomicU64::default(),
            retention_deleted_unarchived_batches: AtomicU64::default(),
            footprint_bytes: AtomicU64::default(),
            logical_bytes: AtomicU64::default(),
            kv_bytes: AtomicU64::default(),
            failed_commits: AtomicU64::default(),
            reopens: AtomicU64::default(),
            failed_reopens: AtomicU64::default(),
            tail_cache_bytes: AtomicU64::default(),
            tail_cache_hits: AtomicU64::default(),
            tail_cache_misses: AtomicU64::default(),
            compaction_reclaimed_bytes: AtomicU64::default(),
            compaction_removed_records: AtomicU64::default(),
            compaction_passes: AtomicU64::default(),
            compaction_dirty_bytes: AtomicU64::default(),
            compaction_dirty_ratio_max_ppm: AtomicU64::default(),
            compaction_lag_ms: AtomicU64::default(),
            journal: Arc::default(),
        }
    }
}

/// A snapshot of the store's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    pub commits: u64,
    pub durable_commits: u64,
    pub commit_micros_total: u64,
    pub appended_records: u64,
    pub appended_batches: u64,
    pub appended_bytes: u64,
    pub retention_deleted_batches: u64,
    pub retention_deleted_bytes: u64,
    pub retention_deleted_unarchived_batches: u64,
    pub footprint_bytes: u64,
    pub logical_bytes: u64,
    /// Footprint of key-value state (sessions, committed offsets, retained messages, ...),
    /// counted against `storage.max_bytes` with the log's `footprint_bytes`.
    pub kv_bytes: u64,
    pub failed_commits: u64,
    pub reopens: u64,
    pub failed_reopens: u64,
    /// Bytes of committed batches held by the tail cache (`storage.tail_cache_bytes_max`).
    pub tail_cache_bytes: u64,
    /// Reads at or after a cached batch served from memory, and those that read the database.
    pub tail_cache_hits: u64,
    pub tail_cache_misses: u64,
    /// Logical bytes compaction removed (superseded records, expired tombstones).
    pub compaction_reclaimed_bytes: u64,
    pub compaction_removed_records: u64,
    /// Compaction passes finished (one partition each).
    pub compaction_passes: u64,
    /// Bytes of compacted topics appended since their partitions' last compaction...
    pub compaction_dirty_bytes: u64,
    /// ...the highest share of them in one partition, in millionths (`min.cleanable.dirty.ratio`)...
    pub compaction_dirty_ratio_max_ppm: u64,
    /// ...and the age of the oldest dirty batch (the compaction lag), in ms.
    pub compaction_lag_ms: u64,
    /// The commit journal: records appended (and of them, those written unbuffered with
    /// `O_DIRECT | O_DSYNC`), commits that synced the database file instead (too large for the
    /// ring), checkpoints, and records written back at opens.
    pub journal_records: u64,
    pub journal_unbuffered_records: u64,
    pub journal_direct_syncs: u64,
    pub journal_checkpoints: u64,
    /// Records that waited for a checkpoint to free room in the journal, and how long in all.
    pub journal_room_waits: u64,
    pub journal_room_wait_micros: u64,
    pub journal_replayed_records: u64,
}

/// Opens the redb storage a store runs on (see [`Store::open_with_backend`]); called at open and
/// again at every in-process reopen after a failed write, so it must give the same data each time.
pub type BackendOpener = Arc<dyn Fn() -> std::io::Result<Box<dyn StorageBackend>> + Send + Sync>;

/// Where the database lives.
#[derive(Clone)]
pub(crate) enum Location {
    /// `tributary.redb` in `storage.data_dir` (the gateway).
    File(PathBuf),
    /// A backend the caller supplies (tests: fault injection, simulated power cuts).
    Backend(BackendOpener),
}

/// A boxed backend as redb takes it (every method forwarded, locks included).
#[derive(Debug)]
struct DynBackend(Box<dyn StorageBackend>);

impl StorageBackend for DynBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.0.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.0.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.0.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.0.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.0.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.0.query_lock_range(start, end)
    }
}

/// The database file's backend: with zeros ahead of small writes, or redb's own.
fn db_file(config: &StorageConfig, path: &Path) -> Result<Box<dyn StorageBackend>, StoreError> {
    if config.zero_ahead_bytes > 0 {
        let b = zero_ahead::ZeroAhead::open(path, config.zero_ahead_bytes)
            .map_err(|e| StoreError::io("open the database file", e))?;
        return Ok(Box::new(b));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StoreError::io("open the database file", e))?;
    Ok(Box::new(redb::backends::FileBackend::new(f)?))
}

/// Opens the database with the configured cache; returns it and whether redb had to repair it
/// (it was not closed cleanly).
pub(crate) fn open_database(
    config: &StorageConfig,
    location: &Location,
    counters: &Counters,
) -> Result<(Database, bool), StoreError> {
    let repaired = Arc::new(AtomicBool::new(false));
    let repaired_flag = repaired.clone();
    let mut builder = Database::builder();
    builder.set_cache_size(config.cache_size_bytes as usize).set_repair_callback(move |session| {
        if !repaired_flag.swap(true, Ordering::Relaxed) {
            tracing::warn!("database was not closed cleanly: repairing");
        }
        tracing::info!(progress = session.progress(), "repair progress");
    });
    let db = match location {
        Location::File(path) if config.journal_bytes > 0 => {
            let journal_path = path.with_file_name(JOURNAL_FILE_NAME);
            let ring = config.journal_bytes;
            match journal::Journaled::open_file(db_file(config, path)?, &journal_path, ring, counters.journal.clone()) {
                Ok(backend) => builder.create_with_backend(backend)?,
                // A full disk (or a file-size limit) must not keep the gateway from starting:
                // without the journal every commit syncs the database file, as before it.
                Err(e) if journal::is_no_room(&e) => {
                    tracing::warn!(
                        error = %e,
                        path = %journal_path.display(),
                        "storage.journal_bytes: no room for the commit journal; running without it (every commit syncs the database file)"
                    );
                    builder.create_with_backend(DynBackend(db_file(config, path)?))?
                }
                Err(e) => return Err(StoreError::io("open the commit journal", e)),
            }
        }
        Location::File(path) => builder.create_with_backend(DynBackend(db_file(config, path)?))?,
        Location::Backend(open) => {
            let backend = open().map_err(|e| StoreError::io("open the storage backend", e))?;
            builder.create_with_backend(DynBackend(backend))?
        }
    };
    Ok((db, repaired.load(Ordering::Relaxed)))
}

pub(crate) struct Shared {
    pub config: StorageConfig,
    pub db_path: PathBuf,
    pub location: Location,
    /// `None` while closed, or after a failed write until the writer reopened the database.
    pub db: RwLock<Option<Arc<Database>>>,
    /// What keeps writes from working (after a failed write), until one works again.
    pub fault: Mutex<Option<String>>,
    pub topics: RwLock<HashMap<String, Arc<TopicState>>>,
    pub counters: Counters,
    /// Bumped by the writer after a commit that created or deleted topics or partitions.
    pub topics_changed: watch::Sender<u64>,
    /// Recent refusals (the writer's: disk full, write faults; the front ends' through
    /// `Store::refusals`).
    pub refusals: Arc<refusals::Refusals>,
    /// Topics the global disk budget does not delete from (`Store::keep_from_disk_budget`).
    pub budget_kept: RwLock<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("db_path", &self.db_path).finish_non_exhaustive()
    }
}

fn archive_key(pkey: u64) -> Vec<u8> {
    let mut k = b"m\0".to_vec();
    k.extend_from_slice(&pkey.to_be_bytes());
    k
}

/// Archive marks stored by `Store::set_archived`, back into the partitions at open (and after
/// a reopen: marks only move forward).
pub(crate) fn load_archive_marks(db: &Database, shared: &Shared) -> Result<(), StoreError> {
    let rtx = db.begin_read()?;
    let Some(table) = open_space(&rtx, KvSpace::ARCHIVE_MARKS)? else { return Ok(()) };
    let topics = shared.topics.read().map_err(|_| StoreError::Corrupt("topic map lock poisoned".into()))?;
    let by_key: HashMap<u64, &Arc<PartitionState>> =
        topics.values().flat_map(|t| t.partitions.iter()).map(|p| (p.key, p)).collect();
    for e in table.range(&b"m\0"[..]..&b"m\x01"[..])? {
        let (k, v) = e?;
        let (Some(key), Ok(off)) = (k.value().get(2..10), <[u8; 8]>::try_from(v.value())) else { continue };
        let pkey = u64::from_be_bytes(key.try_into().unwrap_or_default());
        if let Some(p) = by_key.get(&pkey) {
            p.archived.fetch_max(i64::from_be_bytes(off), Ordering::Relaxed);
        }
    }
    Ok(())
}

/// A key-value space's table, opened for reading.
type KvTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

/// A key-value space's table for reading; `None` before its first write created it.
fn open_space(rtx: &redb::ReadTransaction, space: KvSpace) -> Result<Option<KvTable>, StoreError> {
    match rtx.open_table(space.table()) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Handle to the store; cheap to clone. Dropping the last handle (or `close`) commits what is
/// queued and closes the database cleanly.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Op>,
    writer: Mutex<Option<JoinHandle<()>>>,
    ticker: Mutex<Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop the ticker; the writer sees the queue close when our sender drops, commits what
        // is queued and closes the database.
        if let Ok(mut t) = self.ticker.lock() {
            if let Some((stop, handle)) = t.take() {
                drop(stop);
                let _ = handle.join();
            }
        }
    }
}

/// What happened while opening the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenReport {
    pub duration: Duration,
    pub repaired: bool,
    pub topics: usize,
    pub partitions: usize,
    /// Partitions of `relaxed` topics that lost acknowledged appends in a crash: each got a gap
    /// batch over the offsets those appends had, so no offset is handed out twice.
    pub gaps: usize,
}

impl Store {
    /// Opens (or creates) the store in `config.data_dir`, recovering after a crash if needed.
    pub fn open(config: StorageConfig) -> Result<(Store, OpenReport), StoreError> {
        let location = Location::File(config.data_dir.join(DB_FILE_NAME));
        Self::open_at(config, location)
    }

    /// Opens the store on a redb backend that `open` supplies instead of the file in
    /// `data_dir` (which still holds nothing else, and is where free space is checked). `open` is
    /// called again each time the store reopens the database after a failed write. For tests:
    /// a backend that fails writes on demand, or one that simulates power cuts.
    pub fn open_with_backend(config: StorageConfig, open: BackendOpener) -> Result<(Store, OpenReport), StoreError> {
        Self::open_at(config, Location::Backend(open))
    }

    fn open_at(config: StorageConfig, location: Location) -> Result<(Store, OpenReport), StoreError> {
        config.validate("storage")?;
        let started = Instant::now();
        std::fs::create_dir_all(&config.data_dir).map_err(|e| StoreError::io("create data directory", e))?;
        let db_path = config.data_dir.join(DB_FILE_NAME);
        let counters = Counters::default();
        let (db, repaired) = open_database(&config, &location, &counters)?;
        let db = Arc::new(db);
        let loaded = writer::load(&db, &config)?;
        let shared = Arc::new(Shared {
            config: config.clone(),
            db_path,
            location,
            db: RwLock::new(Some(db.clone())),
            fault: Mutex::new(None),
            topics: RwLock::new(loaded.topics.clone()),
            counters,
            topics_changed: watch::channel(0).0,
            refusals: Arc::new(refusals::Refusals::default()),
            budget_kept: RwLock::new(std::collections::HashSet::new()),
        });
        load_archive_marks(&db, &shared)?;
        let report = OpenReport {
            duration: started.elapsed(),
            repaired,
            topics: loaded.topics.len(),
            partitions: loaded.metas.len(),
            gaps: loaded.gaps,
        };
        let (tx, rx) = mpsc::channel(config.write_queue_ops_max as usize);
        let writer = writer::Writer::new(shared.clone(), db, loaded);
        let handle = std::thread::Builder::new()
            .name("tributary-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::io("spawn writer thread", e))?;
        let ticker = spawn_ticker(&tx, &config)?;
        tracing::info!(
            duration_ms = report.duration.as_millis() as u64,
            repaired = report.repaired,
            topics = report.topics,
            partitions = report.partitions,
            gaps = report.gaps,
            path = %shared.db_path.display(),
            "store opened"
        );
        Ok((
            Store {
                inner: Arc::new(Inner {
                    shared,
                    queue: tx,
                    writer: Mutex::new(Some(handle)),
                    ticker: Mutex::new(Some(ticker)),
                }),
            },
            report,
        ))
    }

    pub fn config(&self) -> &StorageConfig {
        &self.inner.shared.config
    }

    /// Path of the database file.
    pub fn db_path(&self) -> &Path {
        &self.inner.shared.db_path
    }

    /// Commits everything queued, stops the writer and closes the database so that the next
    /// open needs no repair. Later calls on any handle fail with `Closed`.
    pub async fn close(&self) -> Result<(), StoreError> {
        let _ = self.inner.queue.send(Op::Shutdown).await;
        let handle = self.inner.writer.lock().map_err(|_| StoreError::Closed)?.take();
        if let Some(h) = handle {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|_| StoreError::Closed)?
                .map_err(|_| StoreError::Corrupt("writer thread panicked".into()))?;
        }
        Ok(())
    }

    /// `close` for callers without a runtime.
    pub fn close_blocking(&self) -> Result<(), StoreError> {
        let _ = self.inner.queue.blocking_send(Op::Shutdown);
        let handle = self.inner.writer.lock().map_err(|_| StoreError::Closed)?.take();
        if let Some(h) = handle {
            h.join().map_err(|_| StoreError::Corrupt("writer thread panicked".into()))?;
        }
        Ok(())
    }

    /// Liveness probe through the write path: the writer writes a counter in its next round
    /// and commits it durably (one small fsync), then answers. `Ok(None)`: written. `Ok(Some(e))`:
    /// the writer is alive but cannot write (`e`: disk full, a failed commit, writes paused while
    /// it recovers); that is no reason to restart the process, which would come back to the same
    /// disk without serving reads meanwhile. `Err`: the store is closed. A writer stuck in a
    /// commit never answers, so callers bound the wait (the systemd watchdog does).
    pub async fn probe(&self) -> Result<Option<StoreError>, StoreError> {
        self.submit(|reply| Op::Probe { reply }).await
    }

    /// Recent refusals, shared with the front ends (they record failed logins and denied
    /// publishes here; the writer records disk full and write faults).
    pub fn refusals(&self) -> &Arc<refusals::Refusals> {
        &self.inner.shared.refusals
    }

    /// Why writes are failing, while they are (after a failed write, until one succeeds).
    pub fn write_fault(&self) -> Option<String> {
        self.inner.shared.fault.lock().ok().and_then(|f| f.clone())
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let slot = self.inner.shared.db.read().map_err(|_| StoreError::Closed)?.clone();
        match slot {
            Some(db) => Ok(db),
            None => match self.write_fault() {
                Some(cause) => Err(StoreError::Unavailable(format!("the database is being reopened after: {cause}"))),
                None => Err(StoreError::Closed),
            },
        }
    }

    fn topic_state(&self, topic: &str) -> Result<Arc<TopicState>, StoreError> {
        self.inner
            .shared
            .topics
            .read()
            .map_err(|_| StoreError::Closed)?
            .get(topic)
            .cloned()
            .ok_or_else(|| StoreError::UnknownTopic(topic.to_string()))
    }

    fn partition_state(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<(Arc<TopicState>, Arc<PartitionState>), StoreError> {
        let t = self.topic_state(topic)?;
        let p = usize::try_from(partition)
            .ok()
            .and_then(|i| t.partitions.get(i).cloned())
            .ok_or_else(|| StoreError::UnknownPartition { topic: topic.to_string(), partition })?;
        Ok((t, p))
    }

    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        self.enqueue(make).await?.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues an operation for the writer (waiting while the queue is full) without waiting for
    /// its commit.
    async fn enqueue<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner.queue.send(make(tx)).await.map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    // ---- topics ----

    pub async fn create_topic(&self, name: &str, partitions: u32, config: TopicConfig) -> Result<(), StoreError> {
        writer::validate_topic_name(name)?;
        self.submit(|reply| Op::Admin {
            cmd: AdminCmd::CreateTopic { name: name.to_string(), partitions, config },
            reply,
        })
        .await
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), StoreError> {
        self.submit(|reply| Op::Admin { cmd: AdminCmd::DeleteTopic { name: name.to_string() }, reply }).await
    }

    /// Grows a topic to `total` partitions (Kafka's CreatePartitions).
    pub async fn create_partitions(&self, name: &str, total: u32) -> Result<(), StoreError> {
        self.submit(|reply| Op::Admin { cmd: AdminCmd::CreatePartitions { name: name.to_string(), total }, reply })
            .await
    }

    pub async fn alter_topic_config(&self, name: &str, config: TopicConfig) -> Result<(), StoreError> {
        self.submit(|reply| Op::Admin { cmd: AdminCmd::AlterConfig { name: name.to_string(), config }, reply }).await
    }

    /// Kafka's DeleteRecords: moves the partition's log start up to `offset` (-1: the high
    /// watermark), durably; reads below it get `OffsetOutOfRange` at once, and the batches wholly
    /// below it are deleted in bounded steps (the batch holding it stays). An offset at or below
    /// the log start changes nothing; one above the high watermark is `OffsetOutOfRange`. Returns
    /// the log start after the commit (the low watermark).
    pub async fn delete_records(&self, topic: &str, partition: i32, offset: i64) -> Result<i64, StoreError> {
        self.submit(|reply| Op::Admin {
            cmd: AdminCmd::DeleteRecords { name: topic.to_string(), partition, offset },
            reply,
        })
        .await?;
        Ok(self.watermarks(topic, partition)?.log_start_offset)
    }

    /// Keeps the global disk budget (`storage.max_bytes`) from deleting `topic`'s batches: they
    /// still count against it, so other topics' oldest batches go instead. For a compacted topic
    /// whose writer bounds its size, such as the MQTT retained messages (a topic's latest
    /// message must not go because it is old). `retention.*`, compaction and DeleteRecords
    /// still apply. Held in memory: each start of the writer's user says it again.
    pub fn keep_from_disk_budget(&self, topic: &str) {
        if let Ok(mut kept) = self.inner.shared.budget_kept.write() {
            kept.insert(topic.to_string());
        }
    }

    /// Wakes when topics or partitions were created or deleted (after the commit, once they are
    /// visible through [`Store::topic`]): for readers that follow topics which may appear later.
    pub fn topics_changed(&self) -> watch::Receiver<u64> {
        self.inner.shared.topics_changed.subscribe()
    }

    pub fn topic(&self, name: &str) -> Option<TopicInfo> {
        self.topic_state(name).ok().map(|t| topic_info(&t))
    }

    /// A topic's partition count, if it exists: [`Store::topic`] without copying its name and
    /// settings (for per-message paths).
    pub fn topic_partitions(&self, name: &str) -> Option<u32> {
        let topics = self.inner.shared.topics.read().ok()?;
        topics.get(name).map(|t| t.partitions.len() as u32)
    }

    /// All topics, sorted by name.
    pub fn topics(&self) -> Vec<TopicInfo> {
        let mut v: Vec<TopicInfo> = match self.inner.shared.topics.read() {
            Ok(m) => m.values().map(|t| topic_info(t)).collect(),
            Err(_) => Vec::new(),
        };
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn partition_info(&self, topic: &str, partition: i32) -> Result<PartitionInfo, StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        let watermarks = p.signal.borrow().watermarks;
        Ok(PartitionInfo {
            watermarks,
            logical_bytes: p.logical_bytes.load(Ordering::Relaxed),
            footprint_bytes: p.footprint_bytes.load(Ordering::Relaxed),
        })
    }

    pub fn watermarks(&self, topic: &str, partition: i32) -> Result<Watermarks, StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        let wm = p.signal.borrow().watermarks;
        Ok(wm)
    }

    // ---- appends ----

    /// Appends a client's ready RecordBatch v2: validated, stored as sent (base offset and leader
    /// epoch rewritten; LogAppendTime topics get the broker's timestamp). Returns once durable.
    pub async fn append_batch(&self, topic: &str, partition: i32, batch: Bytes) -> Result<AppendOutcome, StoreError> {
        self.enqueue_batch(topic, partition, batch).await?.wait().await
    }

    /// Validates and queues a client batch like [`Store::append_batch`], returning once it is
    /// queued; the returned [`PendingAppend`] resolves when it is durable. Appends queued one
    /// after the other from one task are stored in that order, so a connection can pipeline
    /// requests and still keep their order.
    pub async fn enqueue_batch(&self, topic: &str, partition: i32, batch: Bytes) -> Result<PendingAppend, StoreError> {
        let cfg = &self.inner.shared.config;
        if batch.len() as u64 > u64::from(cfg.append_size_bytes_max) {
            return Err(StoreError::AppendTooLarge { size: batch.len() as u64, max: cfg.append_size_bytes_max.into() });
        }
        let (t, p) = self.partition_state(topic, partition)?;
        let header: BatchHeader = batch::validate(&batch, cfg.decompressed_size_bytes_max)?;
        if t.config.compacted() {
            if let Some(index) = batch::first_keyless(&batch, cfg.decompressed_size_bytes_max)? {
                return Err(StoreError::KeylessRecord { topic: topic.to_string(), partition, index });
            }
        }
        // One copy, with room in front for the stored value's append-time prefix.
        let mut bytes = BytesMut::with_capacity(tables::VALUE_PREFIX_LEN + batch.len());
        bytes.extend_from_slice(&[0u8; tables::VALUE_PREFIX_LEN]);
        bytes.extend_from_slice(&batch);
        let rx = self
            .enqueue(|reply| Op::Append {
                topic: t,
                pkey: p.key,
                data: AppendData::Batch { bytes, header },
                kv: Vec::new(),
                also: Vec::new(),
                reply,
            })
            .await?;
        Ok(PendingAppend(rx))
    }

    /// Appends records; the writer packs the records waiting for one partition into batches
    /// compressed with the topic's codec. Returns once durable, with the records' offsets.
    pub async fn append_records(
        &self,
        topic: &str,
        partition: i32,
        records: Vec<NewRecord>,
    ) -> Result<AppendOutcome, StoreError> {
        self.enqueue_records(topic, partition, records).await?.wait().await
    }

    /// Queues records like [`Store::append_records`]; the [`PendingAppend`] resolves when durable.
    pub async fn enqueue_records(
        &self,
        topic: &str,
        partition: i32,
        records: Vec<NewRecord>,
    ) -> Result<PendingAppend, StoreError> {
        self.enqueue_records_with(topic, partition, records, Vec::new()).await
    }

    /// Like [`Store::enqueue_records`], and writes `kv` (space, key, value or removal) in the
    /// same commit: all are durable, or none (e.g. a client's packet id stored with the published
    /// record).
    pub async fn enqueue_records_with(
        &self,
        topic: &str,
        partition: i32,
        records: Vec<NewRecord>,
        kv: Vec<(KvSpace, Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<PendingAppend, StoreError> {
        let mut pending = self.enqueue_appends(vec![(topic, partition, records)], kv).await?;
        pending.pop().ok_or(StoreError::InvalidBatch(batch::BatchError::Empty(0)))
    }

    /// Appends records to one or more partitions and writes `kv` in one commit: all are durable,
    /// or none (e.g. an MQTT publish and the retained-message record it also writes). One
    /// [`PendingAppend`] per entry of `appends`, in order, each resolving after that commit.
    /// `append_size_bytes_max` applies to each entry's records (each is one append).
    pub async fn enqueue_appends(
        &self,
        appends: Vec<(&str, i32, Vec<NewRecord>)>,
        kv: Vec<(KvSpace, Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<Vec<PendingAppend>, StoreError> {
        let cfg = &self.inner.shared.config;
        let mut parts = Vec::with_capacity(appends.len());
        for (topic, partition, records) in appends {
            if records.is_empty() {
                return Err(StoreError::InvalidBatch(batch::BatchError::Empty(0)));
            }
            let size: usize = records.iter().map(NewRecord::encoded_len_max).sum();
            if size as u64 > u64::from(cfg.append_size_bytes_max) {
                return Err(StoreError::AppendTooLarge { size: size as u64, max: cfg.append_size_bytes_max.into() });
            }
            let (t, p) = self.partition_state(topic, partition)?;
            if t.config.compacted() {
                if let Some(index) = records.iter().position(|r| r.key.is_none()) {
                    return Err(StoreError::KeylessRecord { topic: topic.to_string(), partition, index: index as u64 });
                }
            }
            parts.push((t, p.key, records));
        }
        let mut parts = parts.into_iter();
        let Some((topic, pkey, records)) = parts.next() else {
            return Err(StoreError::InvalidBatch(batch::BatchError::Empty(0)));
        };
        let mut also = Vec::new();
        let mut receivers = Vec::new();
        for (topic, pkey, records) in parts {
            let (reply, rx) = oneshot::channel();
            also.push(writer::AlsoAppend { topic, pkey, records, reply });
            receivers.push(PendingAppend(rx));
        }
        let rx = self
            .enqueue(|reply| Op::Append { topic, pkey, data: AppendData::Records(records), kv, also, reply })
            .await?;
        receivers.insert(0, PendingAppend(rx));
        Ok(receivers)
    }

    /// A handle that wakes when the partition's watermarks change (appends, retention) or the
    /// partition is deleted: for long polls over many partitions.
    pub fn watch(&self, topic: &str, partition: i32) -> Result<PartitionWatch, StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        Ok(PartitionWatch(WatchOn::Committed(p.signal.subscribe())))
    }

    /// A handle that wakes when the partition's staged end moves (a round staged records, or a
    /// round that was not staged committed), or it is deleted: for readers of staged records
    /// ([`Store::read_records_cached_to`]). A reader that waits for a staged record's commit
    /// watches [`Store::watch`] instead.
    pub fn watch_staged(&self, topic: &str, partition: i32) -> Result<PartitionWatch, StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        let rx = p.staged.subscribe();
        Ok(PartitionWatch(WatchOn::Staged(rx, p)))
    }

    /// The partition's watermarks and its *staged end*: offsets in `[high_watermark, staged_end)`
    /// belong to a durable round that applied them and waits for its commit (its `fsync`). They
    /// are in the tail cache only, and only [`Store::read_records_cached_to`] serves them: the
    /// MQTT front end delivers them to subscribers while the disk writes, and acknowledges the
    /// publishers after the commit. Such an offset is final unless the commit fails, and then it
    /// is never handed out again (the next round covers it with a gap batch); a crash loses
    /// them as it loses every unacknowledged write. The high watermark is read first: every
    /// offset below it is committed.
    pub fn staged_watermarks(&self, topic: &str, partition: i32) -> Result<(Watermarks, i64), StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        let wm = p.signal.borrow().watermarks;
        let staged = *p.staged.borrow();
        Ok((wm, staged.max(wm.high_watermark)))
    }

    // ---- reads ----

    /// Whole batches starting with the one containing `offset`, until `max_bytes` is reached
    /// (soft: the first batch with records is returned even if larger, with any gap batches
    /// before it). An offset equal to the high watermark gives an empty result; outside
    /// `[log_start, high_watermark]` gives `OffsetOutOfRange`. Gap batches (control batches over
    /// offsets a crash took back, see `batch::encode_gap_batch`) are returned as stored: Kafka
    /// clients skip them; `read_records` yields nothing for them.
    pub fn fetch(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<FetchedBatches, StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        // Watermarks are read before the snapshot: every batch below them was committed first.
        let wm = p.signal.borrow().watermarks;
        if let Some(cached) = self.fetch_tail(&p, wm, wm.high_watermark, offset, max_bytes) {
            return Ok(cached);
        }
        self.fetch_stored(&p, wm, offset, max_bytes)
    }

    /// `fetch` from the database (a snapshot taken after `wm` was read).
    fn fetch_stored(
        &self,
        p: &PartitionState,
        wm: Watermarks,
        offset: i64,
        max_bytes: usize,
    ) -> Result<FetchedBatches, StoreError> {
        let db = self.db()?;
        let rtx = db.begin_read()?;
        if offset < wm.log_start_offset || offset > wm.high_watermark {
            return Err(StoreError::OffsetOutOfRange {
                offset,
                log_start_offset: wm.log_start_offset,
                high_watermark: wm.high_watermark,
            });
        }
        let mut out = BytesMut::new();
        let mut batches = 0usize;
        let mut has_records = false;
        let mut next_offset = offset;
        if offset < wm.high_watermark {
            let log = rtx.open_table(LOG)?;
            let pieces = rtx.open_table(LOG_PIECES)?;
            let target = offset as u64;
            let start = match log.range((p.key, 0u64)..=(p.key, target))?.next_back() {
                Some(entry) => entry?.0.value().1,
                None => wm.log_start_offset as u64,
            };
            for entry in log.range((p.key, start)..=(p.key, u64::MAX))? {
                let (k, v) = entry?;
                if k.value().0 != p.key || k.value().1 >= wm.high_watermark as u64 {
                    break;
                }
                let (_, head) = split_value(v.value())?;
                let h = BatchHeader::parse(head).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if h.next_offset() <= offset {
                    continue;
                }
                if batches == 0 && h.base_offset > offset {
                    // No batch holds `offset`: either retention removed it between our watermark
                    // read and the snapshot, or the offset lies in a hole above the log start
                    // (offsets no record has): serve from the next batch then.
                    let now = p.signal.borrow().watermarks;
                    if offset < now.log_start_offset {
                        return Err(StoreError::OffsetOutOfRange {
                            offset,
                            log_start_offset: now.log_start_offset,
                            high_watermark: now.high_watermark,
                        });
                    }
                }
                // `max_bytes` is soft for the first batch with records: gap batches (control
                // batches the store wrote) before it do not count, so a reader always gets
                // past a gap to the records after it.
                if has_records && out.len() + h.total_len().max(head.len()) > max_bytes {
                    break;
                }
                stored::read_batch_into(&pieces, p.key, k.value().1, head, &mut out)?;
                batches += 1;
                has_records |= !h.is_control();
                next_offset = h.next_offset();
                if has_records && out.len() >= max_bytes {
                    break;
                }
            }
        }
        Ok(FetchedBatches { data: out.freeze(), batches, next_offset, watermarks: wm })
    }

    /// `fetch` served from the tail cache only: `None` when the batches at `offset` are not in
    /// memory (then `fetch` reads the database). Never blocks on I/O, so async code may call it
    /// in place before sending a read to the blocking pool.
    pub fn fetch_cached(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: usize,
    ) -> Option<Result<FetchedBatches, StoreError>> {
        self.fetch_in_memory(topic, partition, offset, max_bytes, false)
    }

    /// `fetch_cached`, up to the staged end if `staged` (see [`Store::staged_watermarks`]).
    fn fetch_in_memory(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: usize,
        staged: bool,
    ) -> Option<Result<FetchedBatches, StoreError>> {
        let (_, p) = match self.partition_state(topic, partition) {
            Ok(found) => found,
            Err(e) => return Some(Err(e)),
        };
        // The high watermark first: every offset below it is committed.
        let wm = p.signal.borrow().watermarks;
        let end = if staged { (*p.staged.borrow()).max(wm.high_watermark) } else { wm.high_watermark };
        if offset < wm.log_start_offset || offset > end {
            return Some(Err(StoreError::OffsetOutOfRange {
                offset,
                log_start_offset: wm.log_start_offset,
                high_watermark: wm.high_watermark,
            }));
        }
        if offset == end {
            return Some(Ok(FetchedBatches { data: Bytes::new(), batches: 0, next_offset: offset, watermarks: wm }));
        }
        self.fetch_tail(&p, wm, end, offset, max_bytes).map(Ok)
    }

    /// Batches in `[offset, end)` from the tail cache (`end`: the high watermark, or the staged
    /// end for a staged read).
    fn fetch_tail(
        &self,
        p: &PartitionState,
        wm: Watermarks,
        end: i64,
        offset: i64,
        max_bytes: usize,
    ) -> Option<FetchedBatches> {
        if offset < wm.log_start_offset || offset >= end {
            return None;
        }
        let c = &self.inner.shared.counters;
        match p.tail.read(offset, end, max_bytes) {
            Some(t) => {
                c.tail_cache_hits.fetch_add(1, Ordering::Relaxed);
                Some(FetchedBatches { data: t.data, batches: t.batches, next_offset: t.next_offset, watermarks: wm })
            }
            None => {
                c.tail_cache_misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Decoded records from `offset` on (a convenience over `fetch` for tests and tools).
    pub fn read_records(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let f = self.fetch(topic, partition, offset, max_bytes)?;
        self.decode_fetched(&f, offset)
    }

    /// `read_records`, and the offset after the batches read: where the next read continues (past
    /// offsets compaction emptied and gap batches, which hold no records).
    pub fn read_records_next(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<(Vec<StoredRecord>, i64), StoreError> {
        let f = self.fetch(topic, partition, offset, max_bytes)?;
        Ok((self.decode_fetched(&f, offset)?, f.next_offset))
    }

    /// `read_records` served from the tail cache only (see `fetch_cached`): `None` when the
    /// records at `offset` are not in memory.
    pub fn read_records_cached(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: usize,
    ) -> Option<Result<Vec<StoredRecord>, StoreError>> {
        self.read_records_cached_to(topic, partition, offset, max_bytes, ReadTo::Committed)
    }

    /// `read_records_cached` up to the high watermark or, with [`ReadTo::Staged`], up to the
    /// staged end (see [`Store::staged_watermarks`]): records of a round waiting for its commit
    /// too. `None` when the records at `offset` are not in memory (below the high watermark the
    /// caller reads the database; above it, it waits for the commit).
    pub fn read_records_cached_to(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: usize,
        to: ReadTo,
    ) -> Option<Result<Vec<StoredRecord>, StoreError>> {
        let staged = to == ReadTo::Staged;
        Some(
            self.fetch_in_memory(topic, partition, offset, max_bytes, staged)?
                .and_then(|f| self.decode_fetched(&f, offset)),
        )
    }

    fn decode_fetched(&self, f: &FetchedBatches, offset: i64) -> Result<Vec<StoredRecord>, StoreError> {
        let limit = self.inner.shared.config.decompressed_size_bytes_max;
        let mut out = Vec::new();
        let mut rest = &f.data[..];
        while !rest.is_empty() {
            let h = BatchHeader::parse(rest).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let len = h.total_len().min(rest.len());
            let records = batch::decode_records(&rest[..len], limit).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.extend(records.into_iter().filter(|r| r.offset >= offset));
            rest = &rest[len..];
        }
        Ok(out)
    }

    /// Waits until the partition's high watermark passes `offset`, or `timeout`. Returns the
    /// watermarks then (no spinning: woken by the writer after each commit).
    pub async fn wait_for_data(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        timeout: Duration,
    ) -> Result<Watermarks, StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        let mut rx = p.signal.subscribe();
        drop(p);
        let waited = {
            let wait = rx.wait_for(|s| s.deleted || s.watermarks.high_watermark > offset);
            match tokio::time::timeout(timeout, wait).await {
                Ok(Ok(s)) => Some(*s),
                Ok(Err(_)) => return Err(StoreError::UnknownTopic(topic.to_string())),
                Err(_) => None,
            }
        };
        let signal = match waited {
            Some(s) => s,
            None => *rx.borrow(),
        };
        if signal.deleted {
            return Err(StoreError::UnknownTopic(topic.to_string()));
        }
        Ok(signal.watermarks)
    }

    /// First offset whose record timestamp is >= `timestamp_ms`, with that record's timestamp;
    /// `None` if no such record (Kafka answers -1 then).
    pub fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: i32,
        timestamp_ms: i64,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        let wm = p.signal.borrow().watermarks;
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let index = rtx.open_table(TIME_INDEX)?;
        let log = rtx.open_table(LOG)?;
        // The first entry at or past the time: nothing below its offset is that late. None: only
        // the batches past the newest entry can be, and they are in the log's last
        // `TIME_INDEX_INTERVAL_BYTES` (see `tables::TIME_INDEX`).
        let from = match index.range((p.key, timestamp_ms)..=(p.key, i64::MAX))?.next() {
            Some(entry) => entry?.1.value(),
            None => match stored::tail_region_start(&log, p.key, u64::MAX)? {
                Some((from, _)) => from,
                None => return Ok(None),
            },
        };
        let start = (from as i64).max(wm.log_start_offset);
        let pieces = rtx.open_table(LOG_PIECES)?;
        let limit = self.inner.shared.config.decompressed_size_bytes_max;
        let first = match log.range((p.key, 0u64)..=(p.key, start as u64))?.next_back() {
            Some(e) => e?.0.value().1,
            None => start as u64,
        };
        for e in log.range((p.key, first)..=(p.key, u64::MAX))? {
            let (k, v) = e?;
            if k.value().1 >= wm.high_watermark as u64 {
                break;
            }
            let (_, head) = split_value(v.value())?;
            let h = BatchHeader::parse(head).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if h.max_timestamp < timestamp_ms {
                continue;
            }
            let b = stored::read_batch(&pieces, p.key, k.value().1, head)?;
            for r in batch::decode_records(&b, limit).map_err(|e| StoreError::Corrupt(e.to_string()))? {
                if r.offset >= start && r.timestamp >= timestamp_ms {
                    return Ok(Some((r.offset, r.timestamp)));
                }
            }
        }
        Ok(None)
    }

    // ---- archive marks ----

    /// Records that everything below `offset` of a partition is held by another system as well
    /// (for the gateway: the central cluster): durable when this returns, and global retention
    /// deletes those batches first.
    pub async fn set_archived(&self, topic: &str, partition: i32, offset: i64) -> Result<(), StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        self.kv_put(KvSpace::ARCHIVE_MARKS, archive_key(p.key), Some(offset.to_be_bytes().to_vec())).await?;
        p.archived.fetch_max(offset, Ordering::Relaxed);
        Ok(())
    }

    /// The offset below which a partition is archived (`None`: nothing yet). Kept per
    /// partition, so a topic deleted and created again starts unarchived.
    pub fn archived(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let (_, p) = self.partition_state(topic, partition)?;
        let m = p.archived.load(Ordering::Relaxed);
        Ok((m >= 0).then_some(m))
    }

    // ---- key-value spaces ----

    /// Durably sets (`Some`) or removes (`None`) a key; returns after the commit.
    pub async fn kv_put(&self, space: KvSpace, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.kv_write(space, vec![(key, value)]).await
    }

    /// Writes (`Some`) or removes (`None`) several keys in one commit, all or none; returns once
    /// durable.
    pub async fn kv_write(&self, space: KvSpace, entries: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), StoreError> {
        self.submit(|reply| Op::Kv { space, entries, reply }).await
    }

    pub fn kv_get(&self, space: KvSpace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let Some(t) = open_space(&rtx, space)? else { return Ok(None) };
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Entries whose key is `from` or after it, at most `limit` of them.
    pub fn kv_scan_from(&self, space: KvSpace, from: &[u8], limit: usize) -> Result<Vec<KvEntry>, StoreError> {
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let Some(t) = open_space(&rtx, space)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for e in t.range::<&[u8]>(from..)?.take(limit) {
            let (k, v) = e?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Entries whose key starts with `prefix`, at most `limit` of them.
    pub fn kv_scan(&self, space: KvSpace, prefix: &[u8], limit: usize) -> Result<Vec<KvEntry>, StoreError> {
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let Some(t) = open_space(&rtx, space)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for e in t.range::<&[u8]>(prefix..)? {
            let (k, v) = e?;
            if !k.value().starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    // ---- observation ----

    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            commits: l(&c.commits),
            durable_commits: l(&c.durable_commits),
            commit_micros_total: l(&c.commit_micros_total),
            appended_records: l(&c.appended_records),
            appended_batches: l(&c.appended_batches),
            appended_bytes: l(&c.appended_bytes),
            retention_deleted_batches: l(&c.retention_deleted_batches),
            retention_deleted_unarchived_batches: l(&c.retention_deleted_unarchived_batches),
            retention_deleted_bytes: l(&c.retention_deleted_bytes),
            footprint_bytes: l(&c.footprint_bytes),
            logical_bytes: l(&c.logical_bytes),
            kv_bytes: l(&c.kv_bytes),
            failed_commits: l(&c.failed_commits),
            reopens: l(&c.reopens),
            failed_reopens: l(&c.failed_reopens),
            tail_cache_bytes: l(&c.tail_cache_bytes),
            tail_cache_hits: l(&c.tail_cache_hits),
            tail_cache_misses: l(&c.tail_cache_misses),
            compaction_reclaimed_bytes: l(&c.compaction_reclaimed_bytes),
            compaction_removed_records: l(&c.compaction_removed_records),
            compaction_passes: l(&c.compaction_passes),
            compaction_dirty_bytes: l(&c.compaction_dirty_bytes),
            compaction_dirty_ratio_max_ppm: l(&c.compaction_dirty_ratio_max_ppm),
            compaction_lag_ms: l(&c.compaction_lag_ms),
            journal_records: l(&c.journal.records),
            journal_unbuffered_records: l(&c.journal.unbuffered_records),
            journal_direct_syncs: l(&c.journal.direct_syncs),
            journal_checkpoints: l(&c.journal.checkpoints),
            journal_room_waits: l(&c.journal.room_waits),
            journal_room_wait_micros: l(&c.journal.room_wait_micros),
            journal_replayed_records: l(&c.journal.replayed_records),
        }
    }

    /// Real disk use of the database file (`st_blocks * 512`).
    /// Commit latency (microseconds) and records per commit, as histograms.
    pub fn commit_histograms(&self) -> (crate::histogram::HistogramSnapshot, crate::histogram::HistogramSnapshot) {
        let c = &self.inner.shared.counters;
        (c.commit_latency_micros.snapshot(), c.records_per_commit.snapshot())
    }

    pub fn disk_usage_bytes(&self) -> Result<u64, StoreError> {
        disk::file_disk_bytes(&self.inner.shared.db_path)
    }
}

fn topic_info(t: &TopicState) -> TopicInfo {
    TopicInfo { name: t.name.clone(), id: t.id, partitions: t.partitions.len() as u32, config: t.config.clone() }
}

/// Wakes the writer periodically for age-based retention and relaxed-durability flushes.
fn spawn_ticker(
    queue: &mpsc::Sender<Op>,
    config: &StorageConfig,
) -> Result<(std::sync::mpsc::Sender<()>, JoinHandle<()>), StoreError> {
    let weak = queue.downgrade();
    let period = Duration::from_millis(config.retention_check_interval_ms.min(config.relaxed_flush_interval_ms));
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("tributary-ticker".into())
        .spawn(move || loop {
            match stop_rx.recv_timeout(period) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let Some(q) = weak.upgrade() else { return };
            // A full queue means the writer is busy and will run retention on its own.
            let _ = q.try_send(Op::Tick);
        })
        .map_err(|e| StoreError::io("spawn ticker thread", e))?;
    Ok((stop_tx, handle))
}

#[cfg(test)]
mod compaction_tests;
#[cfg(test)]
mod layout_tests;
#[cfg(test)]
mod tests;
