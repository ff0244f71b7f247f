//! The commit journal under redb: every `sync_data` redb asks for becomes one record appended to
//! a preallocated ring file (`tributary.journal`) and synced there, while the pages go to the
//! database file in place without a sync; a background checkpoint syncs the database file and
//! frees the ring; an open replays what the database file may lack.
//!
//! Why: a commit of a few small records rewrites redb's copy-on-write paths, its table tree,
//! freed tree, allocator state and header: about 10 pages in 8-9 separate places of the file.
//! On the development machine's disk one `fdatasync` after 9 scattered pages takes p50 0.25-0.48
//! ms, after the same bytes in one contiguous write 0.11-0.15 ms (`tests/bench/fsync_pages.py`);
//! in the gateway under the MQTT fleet load (strace on the writer thread, four runs taking turns)
//! the commit's `fdatasync` took p50 195-329 us and p99 0.9-3.0 ms without the journal, p50
//! 164-270 us and p99 0.9-2.1 ms with it (BENCHMARKS.md "The commit journal"). redb
//! rewrites the same few hundred pages over and over (643 distinct pages in 18,318 page writes
//! over 3 s of the fleet), so a checkpoint writes each of them once: the database file gets far
//! fewer writes, the journal gets the commits' bytes in order.
//!
//! Records go to the disk with one `pwrite` on a second descriptor of the journal opened with
//! `O_DIRECT | O_DSYNC` (when the file system takes it): the write returns once the record is
//! on the disk (a write with FUA, or a write and a cache flush), with no copy into the page
//! cache and no writeback pass of `fdatasync`. Measured on the development machine
//! (`tests/bench/fsync_pages.py`: 9 pages in place unsynced and a 40 KiB record, 2,000 commits,
//! two rounds): p50 211-250 us and 155-185 us of CPU per commit, against 248-280 us and
//! 195-220 us with a buffered record and `fdatasync`. Headers, the ring's zeros and replay use
//! the buffered descriptor (a different page from any record).
//!
//! Layout: the first 4 KiB hold two header slots (in separate sectors, written alternately, the
//! valid one with the higher generation wins): a random salt, the ring's size, and where replay
//! starts (position and sequence number). Records follow from `FIRST`, each at a 4 KiB boundary
//! (so a record's write never touches a page of the one before it): magic, salt, sequence
//! number, body length, CRC-32C of all of it; the body is the operations in order (write bytes
//! at an offset, set the length). A record that does not fit before the ring's end goes to
//! `FIRST`; replay looks for record `s` where `s - 1` ended, then at `FIRST`.
//!
//! Invariants:
//! - A `sync_data` returns Ok only once its record (or, past `record_bytes_max`, the database
//!   file itself) is synced: what redb calls durable is durable.
//! - Replay applies exactly the chain of valid records from the header's start, in order; every
//!   record in it has its salt (a new one at every open, so nothing from an earlier run is
//!   taken) and the next sequence number (unique within a salt), so a stale or torn record ends
//!   the chain and is never applied.
//! - A record's space is reused only after a checkpoint that covers it is durable: the database
//!   file synced after the record's pages were written in place, then the header moved past it
//!   and synced. Replaying records the database file already holds rewrites each page with its
//!   last content in those records, which is the state after the last of them (redb writes new
//!   pages only where the committed state holds none).
//! - A failed write or sync latches until the next open (redb then fails its commits; the store
//!   reopens the database, which replays the journal).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use redb::StorageBackend;

/// Where records start: the header's page comes first.
pub const FIRST: u64 = 4096;
/// Records start on these boundaries.
const ALIGN: u64 = 4096;
/// The second header slot's offset (its own sector).
const SLOT_B: u64 = 512;
const HEADER_MAGIC: [u8; 8] = *b"TRBJRNL1";
const HEADER_BYTES: usize = 8 + 8 * 5 + 4;
const RECORD_MAGIC: u32 = 0x5452_4A52; // "TRJR"
/// magic u32, salt u64, seq u64, body length u64, crc u32.
const RECORD_HEADER_BYTES: usize = 4 + 8 + 8 + 8 + 4;
const OP_WRITE: u8 = 1;
const OP_SET_LEN: u8 = 2;
/// kind u8, offset or length u64, data length u64.
const OP_HEADER_BYTES: usize = 1 + 8 + 8;
/// A record's buffer is kept for the next commit when it holds at most this much (a commit of
/// small records fills 36-40 KiB: no allocation per commit); a larger one is freed.
const BUFFER_KEPT_BYTES: usize = 64 * 1024;
/// A record being built: bytes aligned to `ALIGN` in memory (for `O_DIRECT`).
type Record = aligned_vec::AVec<u8, aligned_vec::ConstAlign<{ ALIGN as usize }>>;
/// Smallest ring: a few records of the largest journaled size.
pub const RING_BYTES_MIN: u64 = 1 << 20;

/// The journal's counters (the store's `/metrics`), shared across reopens.
#[derive(Debug, Default)]
pub struct JournalCounters {
    /// Records appended (one per durable commit that went through the journal).
    pub records: AtomicU64,
    /// Of them, records written with `O_DIRECT | O_DSYNC` (the others: through the page cache
    /// and `fdatasync`).
    pub unbuffered_records: AtomicU64,
    /// Commits too large for the ring, which synced the database file instead.
    pub direct_syncs: AtomicU64,
    /// Checkpoints finished (the database file synced, the ring freed up to there).
    pub checkpoints: AtomicU64,
    /// Records that waited for a checkpoint to free room in the ring (the ring is small for the
    /// write rate, or the database file's sync slow), and the microseconds they waited.
    pub room_waits: AtomicU64,
    pub room_wait_micros: AtomicU64,
    /// Records written back into the database file at opens.
    pub replayed_records: AtomicU64,
}

/// What an open's replay wrote back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ReplayReport {
    /// Records written back into the database file.
    pub records: u64,
    /// Their bytes (record headers included).
    pub bytes: u64,
}

/// The database backend with its journal (see the module docs).
#[derive(Debug)]
pub struct Journaled {
    inner: Arc<Inner>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Inner {
    db: Box<dyn StorageBackend>,
    journal: Box<dyn StorageBackend>,
    /// The journal opened `O_DIRECT | O_DSYNC` for records (see the module docs); `None` where
    /// the file system refuses it, or on backends that are not a file (tests).
    direct: Option<std::fs::File>,
    /// Set when a direct write was refused as unaligned or unsupported ([`refused_direct`]):
    /// records go through `journal` with a sync from then on.
    direct_refused: std::sync::atomic::AtomicBool,
    ring_bytes: u64,
    /// Records larger than this are not journaled: their `sync_data` syncs the database file.
    record_bytes_max: u64,
    salt: u64,
    state: Mutex<State>,
    changed: Condvar,
    counters: Arc<JournalCounters>,
}

#[derive(Debug)]
struct State {
    /// The next record: room for its header, then the operations since the last `sync_data` as
    /// its body (empty while there are none). Aligned to `ALIGN` in memory: `O_DIRECT` writes
    /// go from aligned buffers.
    pending: Record,
    /// `pending` grew past `record_bytes_max` and was dropped: the next `sync_data` syncs the
    /// database file itself.
    oversized: bool,
    /// Where the next record goes.
    write_pos: u64,
    next_seq: u64,
    /// The oldest byte of the ring a replay may still need (the durable header's start).
    live_start: u64,
    generation: u64,
    checkpoint: Checkpoint,
    /// A write or sync that failed: every later `sync_data` fails until the next open.
    failed: Option<String>,
    stop: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checkpoint {
    Idle,
    /// Sync the database file, then start replay at `pos` with `seq`.
    Requested {
        pos: u64,
        seq: u64,
    },
    Running,
}

/// A header slot's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    salt: u64,
    generation: u64,
    ring_bytes: u64,
    start_pos: u64,
    start_seq: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..8].copy_from_slice(&HEADER_MAGIC);
        for (i, v) in [self.salt, self.generation, self.ring_bytes, self.start_pos, self.start_seq].iter().enumerate() {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..HEADER_BYTES - 4]);
        b[HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_BYTES || b[..8] != HEADER_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[HEADER_BYTES - 4..HEADER_BYTES].try_into().ok()?);
        if crc != crc32c::crc32c(&b[..HEADER_BYTES - 4]) {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(b[8 + i * 8..16 + i * 8].try_into().unwrap_or_default());
        Some(Header { salt: u(0), generation: u(1), ring_bytes: u(2), start_pos: u(3), start_seq: u(4) })
    }
}

fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

fn new_salt() -> u64 {
    // Seeded from the OS's randomness; never 0, so a zeroed file never matches.
    RandomState::new().hash_one(std::time::SystemTime::now()) | 1
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // State changes are single assignments under the lock; a panic cannot leave them half done.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Journaled {
    /// Opens the journal at `journal_path` (created and filled with zeros to `ring_bytes` when
    /// missing or of another size) over the database backend `db`: replays what the journal
    /// holds into `db`, syncs it, and starts a new journal. Fails if another process has the
    /// journal open.
    pub fn open_file(
        db: Box<dyn StorageBackend>,
        journal_path: &Path,
        ring_bytes: u64,
        counters: Arc<JournalCounters>,
    ) -> io::Result<Self> {
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(journal_path)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another process", journal_path.display()),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        // redb's file backend: positioned reads and writes, `fdatasync`; its locks are not
        // used here (the lock above is the journal's).
        let journal = redb::backends::FileBackend::new(file).map_err(io::Error::other)?;
        let direct = open_direct(journal_path);
        Self::open_with(db, Box::new(journal), direct, ring_bytes, counters)
    }

    /// [`Journaled::open_file`] on any two backends (tests: simulated disks); `ring_bytes` is
    /// rounded up to whole 4 KiB pages. If the journal cannot be made `ring_bytes` long for want of space, the error is [`NoRoom`] (see
    /// [`is_no_room`]): what it held is replayed and synced into `db` and the journal is cut to
    /// nothing, so the caller can run on `db` alone.
    pub fn open(
        db: Box<dyn StorageBackend>,
        journal: Box<dyn StorageBackend>,
        ring_bytes: u64,
        counters: Arc<JournalCounters>,
    ) -> io::Result<Self> {
        Self::open_with(db, journal, None, ring_bytes, counters)
    }

    /// [`Journaled::open`], records written through `direct` when given (see [`open_direct`]).
    fn open_with(
        db: Box<dyn StorageBackend>,
        journal: Box<dyn StorageBackend>,
        direct: Option<std::fs::File>,
        ring_bytes: u64,
        counters: Arc<JournalCounters>,
    ) -> io::Result<Self> {
        assert!(ring_bytes >= RING_BYTES_MIN, "journal ring of {ring_bytes} B");
        let ring_bytes = align_up(ring_bytes);
        let old = read_header(journal.as_ref())?;
        let mut replayed = ReplayReport::default();
        let mut next_seq = 1;
        let mut generation = 0;
        if let Some(h) = old {
            let (report, seq) = replay(db.as_ref(), journal.as_ref(), &h)?;
            replayed = report;
            next_seq = seq;
            generation = h.generation;
            if report.records > 0 {
                db.sync_data()?;
                counters.replayed_records.fetch_add(report.records, Ordering::Relaxed);
            }
        }
        // A new ring: zeros written (not a hole: its blocks stay allocated, so appending
        // never grows the file and its `fdatasync` never writes metadata), then a header
        // with a new salt.
        if let Err(e) = prepare_ring(journal.as_ref(), ring_bytes) {
            if !no_room(&e) {
                return Err(e);
            }
            // Everything replayed is synced into the database file, so the journal holds
            // nothing still needed: cut to nothing (no later open replays it), the caller may
            // run without it. If even that fails, the error stands.
            journal.set_len(0)?;
            journal.sync_data()?;
            return Err(io::Error::new(io::ErrorKind::StorageFull, NoRoom(e)));
        }
        let salt = new_salt();
        generation += 1;
        let header = Header { salt, generation, ring_bytes, start_pos: FIRST, start_seq: next_seq };
        write_header(journal.as_ref(), &header)?;
        journal.sync_data()?;
        if replayed.records > 0 {
            tracing::info!(
                records = replayed.records,
                bytes = replayed.bytes,
                "journal replayed into the database file"
            );
        }
        let inner = Arc::new(Inner {
            db,
            journal,
            direct,
            direct_refused: std::sync::atomic::AtomicBool::new(false),
            ring_bytes,
            record_bytes_max: (ring_bytes - FIRST) / 4,
            salt,
            state: Mutex::new(State {
                pending: Record::new(ALIGN as usize),
                oversized: false,
                write_pos: FIRST,
                next_seq,
                live_start: FIRST,
                generation,
                checkpoint: Checkpoint::Idle,
                failed: None,
                stop: false,
            }),
            changed: Condvar::new(),
            counters,
        });
        let worker = inner.clone();
        let handle = std::thread::Builder::new().name("tributary-ckpt".into()).spawn(move || worker.checkpointer())?;
        Ok(Self { inner, checkpointer: Mutex::new(Some(handle)) })
    }

    /// A [`BackendOpener`](crate::BackendOpener) that opens the journal from `journal` over
    /// what `db` opens (tests: a store on two simulated disks).
    pub fn opener(db: crate::BackendOpener, journal: crate::BackendOpener, ring_bytes: u64) -> crate::BackendOpener {
        let counters = Arc::new(JournalCounters::default());
        Arc::new(move || {
            Ok(Box::new(Journaled::open(db()?, journal()?, ring_bytes, counters.clone())?) as Box<dyn StorageBackend>)
        })
    }

    fn stop_checkpointer(&self) {
        lock(&self.inner.state).stop = true;
        self.inner.changed.notify_all();
        let handle = self.checkpointer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Journaled {
    fn drop(&mut self) {
        self.stop_checkpointer();
    }
}

/// The journal could not be made its full size for want of space (ENOSPC, EDQUOT, or EFBIG
/// past a file-size limit); nothing it held is lost (see [`Journaled::open`]).
#[derive(Debug, thiserror::Error)]
#[error("no room for the commit journal: {0}")]
pub struct NoRoom(pub io::Error);

/// Whether `e` is [`Journaled::open`]'s [`NoRoom`].
pub fn is_no_room(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NoRoom>())
}

fn no_room(e: &io::Error) -> bool {
    let errno = rustix::io::Errno::from_io_error(e);
    [rustix::io::Errno::NOSPC, rustix::io::Errno::DQUOT, rustix::io::Errno::FBIG].iter().any(|n| errno == Some(*n))
}

/// The journal opened a second time, `O_DIRECT | O_DSYNC`, for records; `None` (records then go
/// through the page cache and `fdatasync`) where the file system refuses it.
fn open_direct(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::DSYNC;
    match std::fs::OpenOptions::new().write(true).custom_flags(flags.bits() as i32).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::info!(path = %path.display(), error = %e, "journal records go through the page cache (no O_DIRECT)");
            None
        }
    }
}

/// Whether a direct write failed because the file system does not take it there (unaligned for
/// its block size, or no direct I/O at all), not because the disk failed.
fn refused_direct(e: &io::Error) -> bool {
    let errno = rustix::io::Errno::from_io_error(e);
    [rustix::io::Errno::INVAL, rustix::io::Errno::OPNOTSUPP].iter().any(|n| errno == Some(*n))
}

/// Makes the journal `ring_bytes` long, every block written (zeros where it grows).
fn prepare_ring(journal: &dyn StorageBackend, ring_bytes: u64) -> io::Result<()> {
    let len = journal.len()?;
    if len > ring_bytes {
        journal.set_len(ring_bytes)?;
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = len.min(ring_bytes) / ALIGN * ALIGN;
    while at < ring_bytes {
        let n = (ring_bytes - at).min(zeros.len() as u64) as usize;
        journal.write(at, &zeros[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// The valid header slot with the highest generation, if any.
fn read_header(journal: &dyn StorageBackend) -> io::Result<Option<Header>> {
    if journal.len()? < FIRST {
        return Ok(None);
    }
    let mut page = vec![0u8; SLOT_B as usize + HEADER_BYTES];
    journal.read(0, &mut page)?;
    let a = Header::decode(&page[..HEADER_BYTES]);
    let b = Header::decode(&page[SLOT_B as usize..]);
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(if b.generation > a.generation { b } else { a }),
        (a, b) => a.or(b),
    })
}

fn write_header(journal: &dyn StorageBackend, h: &Header) -> io::Result<()> {
    let at = if h.generation % 2 == 0 { 0 } else { SLOT_B };
    journal.write(at, &h.encode())
}

/// Reads the record with sequence number `seq` at `pos`, if one is there whole before `end`.
fn read_record(journal: &dyn StorageBackend, h: &Header, end: u64, pos: u64, seq: u64) -> io::Result<Option<Vec<u8>>> {
    if pos < FIRST || pos + RECORD_HEADER_BYTES as u64 > end {
        return Ok(None);
    }
    let mut head = [0u8; RECORD_HEADER_BYTES];
    journal.read(pos, &mut head)?;
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or_default());
    let magic = u32::from_le_bytes(head[..4].try_into().unwrap_or_default());
    let (salt, rseq, body_len) = (u64_at(4), u64_at(12), u64_at(20));
    let crc = u32::from_le_bytes(head[28..32].try_into().unwrap_or_default());
    if magic != RECORD_MAGIC || salt != h.salt || rseq != seq {
        return Ok(None);
    }
    // No record the writer makes is over a quarter of the ring: a longer one is not read (and
    // nothing is allocated for it).
    if body_len > end - pos - RECORD_HEADER_BYTES as u64 || body_len > (h.ring_bytes - FIRST) / 4 {
        return Ok(None);
    }
    let Ok(body_len) = usize::try_from(body_len) else { return Ok(None) };
    let mut body = vec![0u8; body_len];
    journal.read(pos + RECORD_HEADER_BYTES as u64, &mut body)?;
    let mut c = crc32c::crc32c(&head[..28]);
    c = crc32c::crc32c_append(c, &body);
    Ok((c == crc).then_some(body))
}

/// Applies the chain of records from the header's start to `db`; returns what it applied and
/// the sequence number after the last.
fn replay(db: &dyn StorageBackend, journal: &dyn StorageBackend, h: &Header) -> io::Result<(ReplayReport, u64)> {
    let mut report = ReplayReport::default();
    let (mut pos, mut seq) = (h.start_pos, h.start_seq);
    // The file may be shorter than the ring its header names (cut short while resized).
    let end = h.ring_bytes.min(journal.len()?);
    loop {
        let found = match read_record(journal, h, end, pos, seq)? {
            Some(body) => Some((pos, body)),
            None if pos != FIRST => read_record(journal, h, end, FIRST, seq)?.map(|b| (FIRST, b)),
            None => None,
        };
        let Some((at, body)) = found else { break };
        apply_ops(db, &body).map_err(|e| corrupt(format!("journal record {seq} at {at}: {e}")))?;
        let total = align_up((RECORD_HEADER_BYTES + body.len()) as u64);
        report.records += 1;
        report.bytes += total;
        pos = at + total;
        seq += 1;
    }
    Ok((report, seq))
}

/// Performs a record body's operations on `db`, in order.
fn apply_ops(db: &dyn StorageBackend, mut body: &[u8]) -> io::Result<()> {
    while !body.is_empty() {
        if body.len() < OP_HEADER_BYTES {
            return Err(corrupt("a truncated operation".into()));
        }
        let kind = body[0];
        let arg = u64::from_le_bytes(body[1..9].try_into().unwrap_or_default());
        let n = u64::from_le_bytes(body[9..17].try_into().unwrap_or_default());
        body = &body[OP_HEADER_BYTES..];
        match kind {
            OP_WRITE => {
                let n = usize::try_from(n).ok().filter(|&n| n <= body.len());
                let n = n.ok_or_else(|| corrupt("a write past the record's end".into()))?;
                db.write(arg, &body[..n])?;
                body = &body[n..];
            }
            OP_SET_LEN => db.set_len(arg)?,
            other => return Err(corrupt(format!("unknown operation {other}"))),
        }
    }
    Ok(())
}

impl Inner {
    fn push_op(&self, st: &mut State, kind: u8, arg: u64, data: &[u8]) {
        if st.oversized {
            return;
        }
        if st.pending.is_empty() {
            st.pending.resize(RECORD_HEADER_BYTES, 0);
        }
        if (st.pending.len() + OP_HEADER_BYTES + data.len()) as u64 > self.record_bytes_max {
            st.oversized = true;
            st.pending = Record::new(ALIGN as usize);
            return;
        }
        st.pending.push(kind);
        st.pending.extend_from_slice(&arg.to_le_bytes());
        st.pending.extend_from_slice(&(data.len() as u64).to_le_bytes());
        st.pending.extend_from_slice(data);
    }

    fn live_bytes(&self, st: &State) -> u64 {
        if st.write_pos >= st.live_start {
            st.write_pos - st.live_start
        } else {
            (self.ring_bytes - st.live_start) + (st.write_pos - FIRST)
        }
    }

    /// Where a record of `total` bytes can go without covering a live one.
    fn place(&self, st: &State, total: u64) -> Option<u64> {
        if st.write_pos >= st.live_start {
            if st.write_pos + total <= self.ring_bytes {
                Some(st.write_pos)
            } else {
                (FIRST + total <= st.live_start).then_some(FIRST)
            }
        } else {
            (st.write_pos + total <= st.live_start).then_some(st.write_pos)
        }
    }

    fn fail(&self, what: &str, e: &io::Error) -> io::Error {
        let mut st = lock(&self.state);
        if st.failed.is_none() {
            st.failed = Some(format!("{what}: {e}"));
        }
        io::Error::new(e.kind(), format!("journal: {what}: {e}"))
    }

    /// Puts `record` (its length a multiple of `ALIGN`) at `pos` in the ring, durably.
    fn write_record(&self, record: &[u8], pos: u64) -> io::Result<()> {
        if let Some(direct) = self.direct.as_ref().filter(|_| !self.direct_refused.load(Ordering::Relaxed)) {
            match std::os::unix::fs::FileExt::write_all_at(direct, record, pos) {
                Ok(()) => {
                    self.counters.unbuffered_records.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if refused_direct(&e) => {
                    tracing::warn!(error = %e, "the journal's direct write was refused; records go through the page cache");
                    self.direct_refused.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(self.fail("append a record", &e)),
            }
        }
        self.write_buffered(record, pos)
    }

    fn write_buffered(&self, record: &[u8], pos: u64) -> io::Result<()> {
        self.journal.write(pos, record).map_err(|e| self.fail("append a record", &e))?;
        self.journal.sync_data().map_err(|e| self.fail("sync the journal", &e))
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = lock(&self.state);
        if let Some(f) = &st.failed {
            return Err(io::Error::other(format!("journal: an earlier write failed ({f}); reopen to recover")));
        }
        let mut record = std::mem::replace(&mut st.pending, Record::new(ALIGN as usize));
        let oversized = std::mem::replace(&mut st.oversized, false);
        if record.is_empty() && !oversized {
            return Ok(());
        }
        let total = align_up(record.len() as u64);
        if oversized || total > self.record_bytes_max {
            drop(st);
            self.counters.direct_syncs.fetch_add(1, Ordering::Relaxed);
            return self.sync_database_directly();
        }
        let mut waited_since: Option<std::time::Instant> = None;
        let pos = loop {
            if let Some(pos) = self.place(&st, total) {
                if let Some(since) = waited_since {
                    self.counters.room_waits.fetch_add(1, Ordering::Relaxed);
                    self.counters.room_wait_micros.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                break pos;
            }
            waited_since.get_or_insert_with(std::time::Instant::now);
            // No room: the oldest records must be checkpointed first (here if the
            // checkpoint thread has stopped).
            if st.stop {
                drop(st);
                return self.sync_database_directly();
            }
            if st.checkpoint == Checkpoint::Idle {
                st.checkpoint = Checkpoint::Requested { pos: st.write_pos, seq: st.next_seq };
                self.changed.notify_all();
            }
            st = self.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(f) = &st.failed {
                return Err(io::Error::other(format!("journal: checkpoint failed ({f})")));
            }
        };
        let seq = st.next_seq;
        st.next_seq += 1;
        st.write_pos = pos + total;
        drop(st);

        let body_len = (record.len() - RECORD_HEADER_BYTES) as u64;
        record[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        record[4..12].copy_from_slice(&self.salt.to_le_bytes());
        record[12..20].copy_from_slice(&seq.to_le_bytes());
        record[20..28].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&record[..28]), &record[RECORD_HEADER_BYTES..]);
        record[28..32].copy_from_slice(&crc.to_le_bytes());
        record.resize(total as usize, 0);
        self.write_record(&record, pos)?;
        self.counters.records.fetch_add(1, Ordering::Relaxed);

        let mut st = lock(&self.state);
        if st.pending.is_empty() && record.capacity() <= BUFFER_KEPT_BYTES {
            record.clear();
            st.pending = record;
        }
        if st.checkpoint == Checkpoint::Idle && self.live_bytes(&st) >= (self.ring_bytes - FIRST) / 2 {
            st.checkpoint = Checkpoint::Requested { pos: st.write_pos, seq: st.next_seq };
            self.changed.notify_all();
        }
        Ok(())
    }

    /// A commit too large for the ring: the database file is synced (as redb does without a
    /// journal), then the header moved past everything so far.
    fn sync_database_directly(&self) -> io::Result<()> {
        let mut st = lock(&self.state);
        while st.checkpoint != Checkpoint::Idle {
            st = self.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        st.checkpoint = Checkpoint::Running;
        let (pos, seq) = (st.write_pos, st.next_seq);
        drop(st);
        let done = self.checkpoint(pos, seq);
        self.finish_checkpoint(pos, &done);
        done
    }

    /// Syncs the database file, then makes replay start at `pos` with `seq`.
    fn checkpoint(&self, pos: u64, seq: u64) -> io::Result<()> {
        self.db.sync_data().map_err(|e| self.fail("sync the database file", &e))?;
        let generation = lock(&self.state).generation + 1;
        let h = Header { salt: self.salt, generation, ring_bytes: self.ring_bytes, start_pos: pos, start_seq: seq };
        write_header(self.journal.as_ref(), &h).map_err(|e| self.fail("write the journal header", &e))?;
        self.journal.sync_data().map_err(|e| self.fail("sync the journal header", &e))
    }

    fn finish_checkpoint(&self, pos: u64, done: &io::Result<()>) {
        let mut st = lock(&self.state);
        if done.is_ok() {
            st.live_start = pos;
            st.generation += 1;
            self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        }
        st.checkpoint = Checkpoint::Idle;
        self.changed.notify_all();
    }

    /// The checkpoint thread: one checkpoint per request, until stopped.
    fn checkpointer(&self) {
        loop {
            let mut st = lock(&self.state);
            let (pos, seq) = loop {
                if st.stop {
                    if st.checkpoint != Checkpoint::Running {
                        st.checkpoint = Checkpoint::Idle;
                    }
                    self.changed.notify_all();
                    return;
                }
                if let Checkpoint::Requested { pos, seq } = st.checkpoint {
                    break (pos, seq);
                }
                st = self.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
            };
            st.checkpoint = Checkpoint::Running;
            drop(st);
            let done = self.checkpoint(pos, seq);
            self.finish_checkpoint(pos, &done);
        }
    }
}

impl StorageBackend for Journaled {
    fn len(&self) -> io::Result<u64> {
        self.inner.db.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.db.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = lock(&self.inner.state);
        self.inner.push_op(&mut st, OP_SET_LEN, len, &[]);
        drop(st);
        self.inner.db.set_len(len).map_err(|e| self.inner.fail("set the database file's length", &e))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut st = lock(&self.inner.state);
        self.inner.push_op(&mut st, OP_WRITE, offset, data);
        drop(st);
        self.inner.db.write(offset, data).map_err(|e| self.inner.fail("write the database file", &e))
    }

    fn close(&self) -> io::Result<()> {
        self.stop_checkpointer();
        // A last checkpoint, so the database file alone is whole after a clean close.
        let failed = lock(&self.inner.state).failed.clone();
        let result = match failed {
            None => self.inner.sync_database_directly(),
            Some(_) => Ok(()),
        };
        let closed = self.inner.db.close();
        let _ = self.inner.journal.close();
        result.and(closed)
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.db.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.db.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.db.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.db.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.db.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.db.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use redb::{ReadableDatabase, ReadableTableMetadata};

    use super::*;
    use crate::simdisk::{Event, Replay, SimDisk};

    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
    /// The smallest ring: records past 255 KiB take the direct path, and it wraps often.
    const RING: u64 = RING_BYTES_MIN;

    type Model = BTreeMap<u64, Vec<u8>>;

    fn open_db(db: SimDisk, journal: SimDisk) -> redb::Database {
        let counters = Arc::new(JournalCounters::default());
        let backend = Journaled::open(Box::new(db), Box::new(journal), RING, counters).expect("open the journal");
        redb::Database::builder().create_with_backend(backend).expect("open the database")
    }

    fn contents(db: &redb::Database) -> Model {
        let txn = db.begin_read().expect("read");
        let Ok(table) = txn.open_table(TABLE) else { return Model::new() };
        let mut out = Model::new();
        for entry in table.range::<u64>(..).expect("range") {
            let (k, v) = entry.expect("entry");
            out.insert(k.value(), v.value().to_vec());
        }
        assert_eq!(out.len() as u64, table.len().expect("len"));
        out
    }

    /// One commit of random inserts (mostly small, now and then one larger than a quarter of
    /// the ring) and deletes, applied to the model too.
    fn commit(db: &redb::Database, model: &mut Model, rng: &mut StdRng, version: u64) {
        let txn = db.begin_write().expect("begin");
        {
            let mut t = txn.open_table(TABLE).expect("table");
            for _ in 0..rng.random_range(1..5) {
                let key = rng.random_range(0..300u64);
                let len = if rng.random_ratio(1, 60) { 300_000 } else { rng.random_range(1..6_000) };
                let value: Vec<u8> = (0..len).map(|i| (key as usize * 31 + i + version as usize) as u8).collect();
                t.insert(key, &value[..]).expect("insert");
                model.insert(key, value);
            }
            if rng.random_bool(0.3) {
                let key = rng.random_range(0..300u64);
                t.remove(key).expect("remove");
                model.remove(&key);
            }
        }
        txn.commit().expect("commit");
    }

    /// The journal's durability claim against a model: a power cut at any instant of a run (of
    /// commits that wrap the ring many times, checkpoints in the background, commits too large
    /// for the ring, a clean reopen) leaves, after replay, exactly the state of some commit
    /// between the last one that returned and the one in progress; and the images of the page
    /// cache (a process crash) reopen to the state of their moment.
    #[test]
    fn a_power_cut_at_any_instant_keeps_every_returned_commit_and_nothing_half_done() {
        let clock = Arc::new(AtomicU64::new(0));
        let db_disk = SimDisk::recording_clocked(clock.clone());
        let journal_disk = SimDisk::recording_clocked(clock.clone());
        // Checkpoints slower than commits, so records arrive while one runs.
        db_disk.set_sync_delay(std::time::Duration::from_millis(3));
        let mut rng = StdRng::seed_from_u64(11);
        let mut model = Model::new();
        // states[k]: after k commits; spans[k]: the clock before and after commit k + 1.
        let mut states = vec![Model::new()];
        let mut spans = Vec::new();
        let mut crashes = Vec::new(); // (page cache images, state index)
        for run in 0..2 {
            let db = open_db(db_disk.clone(), journal_disk.clone());
            assert_eq!(contents(&db), model, "a clean reopen reads the last state (run {run})");
            for i in 0..300u64 {
                let before = clock.load(Ordering::SeqCst);
                commit(&db, &mut model, &mut rng, i);
                spans.push((before, clock.load(Ordering::SeqCst)));
                states.push(model.clone());
                if i % 97 == 50 {
                    crashes.push((db_disk.image(), journal_disk.image(), states.len() - 1));
                }
            }
        }
        let db_trace = db_disk.trace();
        let journal_trace = journal_disk.trace();
        let db_syncs = db_trace.iter().filter(|e| **e == Event::Sync).count();
        assert!(db_syncs >= 10, "checkpoints ran: {db_syncs} database syncs");
        let journaled =
            journal_trace.iter().filter(|e| matches!(e, Event::Write { offset, .. } if *offset >= FIRST)).count();
        assert!(journaled >= 500, "commits went to the journal: {journaled} records");

        for (db_image, journal_image, k) in crashes {
            let db = open_db(SimDisk::from_image(db_image), SimDisk::from_image(journal_image));
            assert!(contents(&db) == states[k], "a process crash after commit {k} reopens to it");
        }

        let end = clock.load(Ordering::SeqCst);
        let mut cuts: Vec<u64> = (0..160).map(|_| rng.random_range(0..=end)).collect();
        // Instants inside commits, where the journal is mid-record or mid-checkpoint.
        for (before, after) in spans.iter().step_by(7) {
            if after > before {
                cuts.push(rng.random_range(*before..*after));
            }
        }
        cuts.sort_unstable();
        let (mut db_replay, mut journal_replay) = (Replay::new(&db_trace), Replay::new(&journal_trace));
        for t in cuts {
            db_replay.advance(db_disk.events_before(t));
            journal_replay.advance(journal_disk.events_before(t));
            let (db_image, journal_image) = (db_replay.power_cut(&mut rng), journal_replay.power_cut(&mut rng));
            let db = open_db(SimDisk::from_image(db_image), SimDisk::from_image(journal_image));
            let got = contents(&db);
            let returned = spans.iter().filter(|(_, after)| *after <= t).count();
            let started = spans.iter().filter(|(before, _)| *before < t).count();
            assert!(
                (returned..=started).any(|k| states[k] == got),
                "a power cut at {t} left a state that is none of commits {returned}..={started} ({} keys)",
                got.len()
            );
        }
    }

    /// A database on the journal over `db_disk` and `journal_disk`, after `n` random commits
    /// (seeded), and the model of what it holds.
    fn committed(db_disk: &SimDisk, journal_disk: &SimDisk, seed: u64, n: u64) -> (redb::Database, Model, StdRng) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = Model::new();
        let db = open_db(db_disk.clone(), journal_disk.clone());
        for i in 0..n {
            commit(&db, &mut model, &mut rng, i);
        }
        (db, model, rng)
    }

    /// What a power cut leaves of a recording disk whose last sync was its last durable write
    /// (the database file under the journal: synced only by checkpoints).
    fn as_last_synced(disk: &SimDisk, rng: &mut StdRng) -> Vec<u8> {
        let trace = disk.trace();
        let last_sync = trace.iter().rposition(|e| *e == Event::Sync).map_or(0, |i| i + 1);
        let synced: Vec<Event> = trace[..last_sync].iter().filter(|e| !matches!(e, Event::Mark(_))).cloned().collect();
        let mut replay = Replay::new(&synced);
        replay.advance(synced.len());
        replay.power_cut(rng)
    }

    /// Records written unbuffered (`O_DIRECT | O_DSYNC`, on a real file): a power cut after the
    /// last commit (the database file as of its last sync, the journal as it is on the disk)
    /// replays to exactly the last commit.
    #[test]
    fn records_written_unbuffered_replay_after_a_power_cut() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tributary.journal");
        let db_disk = SimDisk::recording();
        let counters = Arc::new(JournalCounters::default());
        let backend =
            Journaled::open_file(Box::new(db_disk.clone()), &path, RING, counters.clone()).expect("open the journal");
        assert!(
            backend.inner.direct.is_some(),
            "the temporary directory's file system takes O_DIRECT (ext4, xfs, btrfs and tmpfs do)"
        );
        let db = redb::Database::builder().create_with_backend(backend).expect("open the database");
        let mut rng = StdRng::seed_from_u64(17);
        let mut model = Model::new();
        for i in 0..120 {
            commit(&db, &mut model, &mut rng, i);
        }
        let records = counters.records.load(Ordering::Relaxed);
        assert!(records >= 100, "{records} records");
        assert_eq!(counters.unbuffered_records.load(Ordering::Relaxed), records, "every record unbuffered");
        assert!(counters.direct_syncs.load(Ordering::Relaxed) >= 1, "large commits synced the file instead");
        // The power cut: the journal file as the disk has it (its records bypassed the page
        // cache), then the database file as of its last sync and none of its writes since (a
        // checkpoint in between only makes the database file newer than the journal's start).
        let journal_image = std::fs::read(&path).expect("read the journal");
        let db_image = as_last_synced(&db_disk, &mut rng);
        drop(db);
        let db = open_db(SimDisk::from_image(db_image), SimDisk::from_image(journal_image));
        assert!(contents(&db) == model, "every commit, replayed from unbuffered records");
    }

    /// A process killed after redb shrank the database file (the zero-ahead backend over a real
    /// file, as the store runs): the next open replays, from the last checkpoint, records that
    /// wrote into free pages near the file's old end, then the record that shrank it, and reads
    /// exactly the last commit. (Such an open panicked in the zero-ahead backend before a973185:
    /// the writes land past the shorter file's end; an end-to-end SIGKILL test found it.)
    #[test]
    fn a_kill_after_the_file_shrank_replays_writes_past_its_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (db_path, journal_path) = (dir.path().join("db.redb"), dir.path().join("tributary.journal"));
        let open = |db_path: &Path, journal_path: &Path| {
            let db = crate::zero_ahead::ZeroAhead::open(db_path, 256 * 1024).expect("database file");
            // A ring large enough that no checkpoint runs: every record since the open replays.
            let backend = Journaled::open_file(Box::new(db), journal_path, 64 << 20, Arc::default()).expect("journal");
            redb::Database::builder().create_with_backend(backend).expect("open the database")
        };
        let put = |db: &redb::Database, model: &mut Model, key: u64, value: Option<Vec<u8>>| {
            let txn = db.begin_write().expect("begin");
            {
                let mut t = txn.open_table(TABLE).expect("table");
                match &value {
                    Some(v) => t.insert(key, &v[..]).map(drop).expect("insert"),
                    None => t.remove(key).map(drop).expect("remove"),
                }
            }
            txn.commit().expect("commit");
            match value {
                Some(v) => model.insert(key, v),
                None => model.remove(&key),
            };
        };
        let mut model = Model::new();
        // The file grows; its last quarter is freed (too little for redb to shrink it); a clean
        // close checkpoints it all.
        let db = open(&db_path, &journal_path);
        for key in 0..400u64 {
            put(&db, &mut model, key, Some(vec![key as u8; 8_000]));
        }
        for key in 300..400u64 {
            put(&db, &mut model, key, None);
        }
        drop(db);
        let grown = std::fs::metadata(&db_path).expect("stat").len();
        // After the checkpoint: new values go into the freed pages near the end, then everything
        // is deleted and later commits shrink the file (by half its free tail each).
        let db = open(&db_path, &journal_path);
        for key in 1_000..1_060u64 {
            put(&db, &mut model, key, Some(vec![key as u8; 8_000]));
        }
        for key in model.keys().copied().collect::<Vec<_>>() {
            put(&db, &mut model, key, None);
        }
        for i in 0..30u64 {
            put(&db, &mut model, 7, Some(i.to_le_bytes().to_vec()));
        }
        let shrunk = std::fs::metadata(&db_path).expect("stat").len();
        assert!(shrunk < grown / 2, "redb shrank the file: {grown} -> {shrunk} B");
        // The kill: the files as the page cache has them (copies, as the dead process's journal
        // lock goes with it).
        let (db_copy, journal_copy) = (dir.path().join("db2.redb"), dir.path().join("tributary2.journal"));
        std::fs::copy(&db_path, &db_copy).expect("copy the database file");
        std::fs::copy(&journal_path, &journal_copy).expect("copy the journal");
        let reopened = open(&db_copy, &journal_copy);
        assert!(contents(&reopened) == model, "the last commit, after a replay past the file's end");
        drop(db);
    }

    /// A record that finds the ring full waits for the checkpoint to free room, and the wait is
    /// counted (`tributary_store_journal_room_waits_total`): here records of about 100 KiB fill
    /// half the smallest ring in a few commits, faster than a 20 ms sync of the database file.
    #[test]
    fn a_record_waiting_for_room_in_the_ring_is_counted() {
        let db_disk = SimDisk::new();
        db_disk.set_sync_delay(std::time::Duration::from_millis(20));
        let counters = Arc::new(JournalCounters::default());
        let backend = Journaled::open(Box::new(db_disk), Box::new(SimDisk::new()), RING, counters.clone())
            .expect("open the journal");
        let db = redb::Database::builder().create_with_backend(backend).expect("open the database");
        let mut model = Model::new();
        for key in 0..40u64 {
            let txn = db.begin_write().expect("begin");
            let value = vec![key as u8; 90_000];
            txn.open_table(TABLE).expect("table").insert(key, &value[..]).expect("insert");
            txn.commit().expect("commit");
            model.insert(key, value);
        }
        let waits = counters.room_waits.load(Ordering::Relaxed);
        let waited = counters.room_wait_micros.load(Ordering::Relaxed);
        assert!(waits >= 1, "records waited for room: {waits}");
        assert!(waited >= 1_000 * waits, "each wait spans part of a 20 ms checkpoint: {waited} us for {waits}");
        assert!(contents(&db) == model, "and every commit is there");
    }

    /// A failed journal write latches: later commits fail until the database is opened again,
    /// and the reopen finds every commit that returned before the fault.
    #[test]
    fn a_failed_journal_write_fails_later_commits_until_a_reopen() {
        let db_disk = SimDisk::new();
        let journal_disk = SimDisk::new();
        let (db, model, _) = committed(&db_disk, &journal_disk, 3, 20);
        journal_disk.set_fault(Some(crate::simdisk::WriteFault::All));
        let txn = db.begin_write().expect("begin");
        txn.open_table(TABLE).expect("table").insert(9_999, &b"lost"[..]).expect("insert");
        assert!(txn.commit().is_err(), "the commit's journal record could not be written");
        journal_disk.set_fault(None);
        assert!(db.begin_write().map(|t| t.commit()).map_or(true, |r| r.is_err()), "still refused");
        drop(db);
        let db = open_db(db_disk, journal_disk);
        assert!(contents(&db) == model, "every commit before the fault, nothing after");
    }

    /// No room to make the ring its size: what the journal held is replayed and synced into
    /// the database file, the journal is cut to nothing (no later open replays it), and the
    /// database file alone holds every commit.
    #[test]
    fn no_room_for_the_ring_keeps_every_commit_and_leaves_nothing_to_replay() {
        let db_disk = SimDisk::recording();
        let journal_disk = SimDisk::new();
        let (db, model, mut rng) = committed(&db_disk, &journal_disk, 5, 40);
        // A power cut: the database file as of its last sync (a checkpoint) and none of the
        // writes since; the journal as written.
        let db_image = as_last_synced(&db_disk, &mut rng);
        let journal_image = journal_disk.image();
        drop(db);
        let (db_disk, journal_disk) = (SimDisk::from_image(db_image), SimDisk::from_image(journal_image));
        // The next open wants a ring twice as large, and there is no room for it (EFBIG).
        journal_disk.set_fault(Some(crate::simdisk::WriteFault::Beyond(RING + RING / 2)));
        let counters = Arc::new(JournalCounters::default());
        let e = Journaled::open(Box::new(db_disk.clone()), Box::new(journal_disk.clone()), 2 * RING, counters.clone())
            .expect_err("no room for the ring");
        assert!(is_no_room(&e), "{e}");
        assert!(counters.replayed_records.load(Ordering::Relaxed) > 0, "the open had records to write back");
        assert_eq!(journal_disk.len_bytes(), 0, "the journal is cut to nothing");
        let alone = redb::Database::builder().create_with_backend(db_disk.clone()).expect("the database alone");
        assert!(contents(&alone) == model, "every commit is in the database file");
        drop(alone);
        journal_disk.set_fault(None);
        let db = open_db(db_disk, journal_disk);
        assert!(contents(&db) == model, "and with a journal again");
    }

    /// Another process's journal is not touched.
    #[test]
    fn a_journal_in_use_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j");
        let first = Journaled::open_file(Box::new(SimDisk::new()), &path, RING, Arc::default()).expect("first");
        let second = Journaled::open_file(Box::new(SimDisk::new()), &path, RING, Arc::default()).expect_err("second");
        assert_eq!(second.kind(), io::ErrorKind::WouldBlock, "{second}");
        drop(first);
        Journaled::open_file(Box::new(SimDisk::new()), &path, RING, Arc::default()).expect("free again");
    }
}
