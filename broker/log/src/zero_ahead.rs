//! The database file's storage backend: redb's own file backend, plus zeros written ahead of a
//! growing file so that small commits overwrite blocks the file system has already allocated.
//!
//! Why: redb grows its file with `set_len`, which leaves a hole. The first write into a hole makes
//! the file system allocate blocks, and the commit's `fdatasync` must then also write the file's
//! metadata (ext4 without a journal writes the inode synchronously; with a journal it commits
//! the journal): a second device round trip in every commit that wrote new space. Measured on
//! the development machine (ext4, virtio disk; 10 x 4 KiB + 1 page + `fdatasync`): 4,000-4,600
//! commits/s into a hole against 6,400-6,700 into written blocks (p50 0.22 -> 0.15 ms); a
//! `fallocate`d range behaves like a hole (its extents are "unwritten" until written). In the
//! gateway: commits of 16 KiB Kafka batches 12-21% shorter; commits of small records, whose
//! pages redb mostly reuses, unchanged (BENCHMARKS.md "Zeros ahead of small writes").
//!
//! How: when a write of less than a quarter of `storage.zero_ahead_bytes` lands in a hole, the
//! holes in the `zero_ahead_bytes` past it are written with zeros first (never past the file's
//! length, so the file keeps the length redb gave it). redb's allocator fills a region upwards,
//! so the next pages it writes there are already allocated. Large writes (a client's 1 MB Kafka
//! batch) do not trigger it: for them the extra metadata write is small against their own
//! bytes, and zeroing ahead of them would double the bytes written. The zeros go to disk with
//! the commit's own `fdatasync`; a crash before that loses nothing (unallocated pages of a redb
//! file hold nothing redb reads).
//!
//! Invariant: zeros are only written where redb has written nothing since the file was opened
//! and which was not part of the file then: the backend keeps the ranges that are (or may be)
//! written, a bounded set (`RANGES_MAX`) that only ever widens, so zeros never cover redb's
//! data. A failed zero write is not an error of redb's write: that hole stays a hole (the file
//! stays correct, only its first commit there stays slower).

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;

use redb::backends::FileBackend;
use redb::StorageBackend;

/// Zeros written at once.
static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// Most separate written ranges remembered; past it the two closest merge (the hole between
/// them is then never zeroed: less gain, never a wrong byte). 16 B each.
const RANGES_MAX: usize = 1024;

#[derive(Debug)]
pub(crate) struct ZeroAhead {
    inner: FileBackend,
    /// Bytes zeroed past a small write's end.
    ahead: u64,
    state: Mutex<Written>,
}

/// What of the file may hold redb's bytes.
#[derive(Debug)]
struct Written {
    /// The file's length as redb set it.
    len: u64,
    /// Disjoint, non-adjacent ranges (start -> end) that are written (by redb or with zeros) or
    /// may be: the whole file as it was at open, every write of redb since, and holes merged
    /// away at `RANGES_MAX`. Zeros go only outside them.
    ranges: BTreeMap<u64, u64>,
}

impl Written {
    /// Marks `[from, to)` as written.
    fn mark(&mut self, from: u64, to: u64) {
        if from >= to {
            return;
        }
        let (mut from, mut to) = (from, to);
        // The range starting at or before `from` that reaches it, then every one starting
        // inside the new range (or adjacent to its end).
        if let Some((&s, &e)) = self.ranges.range(..=from).next_back() {
            if e >= from {
                from = s;
                to = to.max(e);
                self.ranges.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.ranges.range(from..=to).next() {
            to = to.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(from, to);
        while self.ranges.len() > RANGES_MAX {
            self.merge_closest();
        }
    }

    fn merge_closest(&mut self) {
        let mut best: Option<(u64, u64)> = None; // (gap, start of the first range)
        let mut prev: Option<(u64, u64)> = None;
        for (&s, &e) in &self.ranges {
            if let Some((ps, pe)) = prev {
                if best.is_none_or(|(gap, _)| s - pe < gap) {
                    best = Some((s - pe, ps));
                }
            }
            prev = Some((s, e));
        }
        if let Some((gap, s)) = best {
            let e = self.ranges[&s];
            self.mark(s, e + gap);
        }
    }

    /// Whether all of `[from, to)` lies in one written range.
    fn covers(&self, from: u64, to: u64) -> bool {
        self.ranges.range(..=from).next_back().is_some_and(|(_, &e)| e >= to)
    }

    /// The holes (unwritten ranges) within `[from, to)`, in order.
    fn holes(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if from >= to {
            return out;
        }
        let mut at = from;
        if let Some((_, &e)) = self.ranges.range(..=from).next_back() {
            at = at.max(e);
        }
        for (&s, &e) in self.ranges.range(from..to) {
            if s > at {
                out.push((at, s.min(to)));
            }
            at = at.max(e);
        }
        if at < to {
            out.push((at, to));
        }
        out
    }

    /// The file was cut to `len`: nothing past it is written any more.
    fn truncate(&mut self, len: u64) {
        let beyond: Vec<u64> = self.ranges.range(len..).map(|(&s, _)| s).collect();
        for s in beyond {
            self.ranges.remove(&s);
        }
        if let Some((&s, &e)) = self.ranges.range(..len).next_back() {
            if e > len {
                self.ranges.insert(s, len);
            }
        }
    }
}

impl ZeroAhead {
    /// Opens (creating if missing) the database file at `path`; `ahead` bytes are zeroed past
    /// small writes into holes (`ahead` > 0).
    pub(crate) fn open(path: &Path, ahead: u64) -> io::Result<Self> {
        assert!(ahead > 0, "zero-ahead backend without a range");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let len = file.metadata()?.len();
        let inner = FileBackend::new(file).map_err(io::Error::other)?;
        let mut written = Written { len, ranges: BTreeMap::new() };
        written.mark(0, len);
        Ok(Self { inner, ahead, state: Mutex::new(written) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Written> {
        // A panic elsewhere cannot leave the ranges wrong: each change is one insert/remove set
        // that only ever widens what counts as written.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes zeros over `[from, to)`; returns how far it got.
    fn zero(&self, from: u64, to: u64) -> u64 {
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            if self.inner.write(at, &ZEROS[..n]).is_err() {
                break;
            }
            at += n as u64;
        }
        at
    }
}

impl StorageBackend for ZeroAhead {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut w = self.state();
        self.inner.set_len(len)?;
        w.truncate(len);
        w.len = len;
        Ok(())
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut w = self.state();
        let end = offset + data.len() as u64;
        if (data.len() as u64) < self.ahead / 4 && !w.covers(offset, end) {
            // A small write into a hole: zero the holes up to `ahead` past it first.
            let fill_end = (end + self.ahead).min(w.len);
            for (from, to) in w.holes(end, fill_end) {
                let reached = self.zero(from, to);
                w.mark(from, reached);
                if reached < to {
                    break;
                }
            }
        }
        // Marked even if the write fails: part of it may be on the file.
        let written = self.inner.write(offset, data);
        w.mark(offset, end);
        if written.is_ok() {
            // A write past the end makes the file longer (a journal's replay can write there
            // before the record's length change reaches this backend).
            w.len = w.len.max(end);
        }
        written
    }
    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use rand::{Rng, SeedableRng};

    use super::*;

    const AHEAD: u64 = 256 * 1024;

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// A small write into a hole makes the file system allocate `ahead` bytes past it, so the
    /// next small writes land on written blocks; a large write does not trigger it.
    #[test]
    fn a_small_write_into_a_hole_zeroes_ahead_and_a_large_one_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let b = ZeroAhead::open(&path, AHEAD).expect("open");
        b.set_len(64 << 20).expect("grow");
        assert!(allocated(&path) < 64 * 1024, "a new file is a hole");
        b.write(0, &[7u8; 4096]).expect("write");
        let after_small = allocated(&path);
        assert!(after_small >= 4096 + AHEAD, "zeros ahead of a small write: {after_small} B allocated");
        assert_eq!(b.len().expect("len"), 64 << 20, "the length stays redb's");
        // A large write past the zeroed part: no zeros ahead of it.
        let big = vec![9u8; AHEAD as usize];
        b.write(32 << 20, &big).expect("write");
        let grown = allocated(&path) - after_small;
        assert!(grown < 2 * AHEAD, "a large write allocates about its own bytes: {grown} B");
        let mut back = vec![0u8; 4096];
        b.read(0, &mut back).expect("read");
        assert_eq!(back, vec![7u8; 4096]);
    }

    /// A small write wholly past the end (as a journal replay may make) extends the file like a
    /// plain file's write; it panicked before (an inverted range when looking for holes), which
    /// stopped a gateway at its start after a SIGKILL.
    #[test]
    fn a_small_write_past_the_end_extends_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let b = ZeroAhead::open(&path, 64 * 1024).expect("open");
        b.set_len(8192).expect("set_len");
        b.write(0, &[1; 4096]).expect("write");
        b.write(100_000, &[7; 4096]).expect("write past the end");
        assert_eq!(b.len().expect("len"), 104_096);
        let mut page = vec![0u8; 4096];
        b.read(100_000, &mut page).expect("read");
        assert_eq!(page, vec![7; 4096]);
        // And a small write into the hole before it zero-fills ahead without touching it.
        b.write(12_288, &[1; 512]).expect("write in the hole");
        b.read(100_000, &mut page).expect("read");
        assert_eq!(page, vec![7; 4096]);
    }

    /// Whatever redb writes, grows and shrinks, the file reads back exactly as a plain file
    /// would: the zeros never cover written data (the module's invariant).
    #[test]
    fn random_writes_and_length_changes_read_back_as_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let b = ZeroAhead::open(&path, 64 * 1024).expect("open");
        let mut model: Vec<u8> = Vec::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        // Where the last write ended: redb's new pages mostly follow each other.
        let mut frontier = 0usize;
        for step in 0..3_000u32 {
            let kind = rng.random_range(0..20u32);
            if kind == 0 || model.is_empty() {
                let len = rng.random_range(0..4usize << 20);
                b.set_len(len as u64).expect("set_len");
                model.resize(len, 0);
                frontier = frontier.min(len);
                continue;
            }
            let size = match kind {
                1 => rng.random_range(1..200_000),
                _ => rng.random_range(1..12_000),
            }
            .min(model.len());
            let offset = if kind < 12 {
                // Next to the last write, a little past it.
                (frontier + rng.random_range(0..8192)).min(model.len() - size)
            } else {
                rng.random_range(0..=(model.len() - size))
            };
            let byte = (step % 251) as u8 + 1;
            b.write(offset as u64, &vec![byte; size]).expect("write");
            model[offset..offset + size].fill(byte);
            frontier = offset + size;
            if step % 100 == 0 {
                let mut back = vec![0u8; model.len()];
                b.read(0, &mut back).expect("read");
                assert!(back == model, "the file differs from what was written (step {step})");
            }
        }
        assert_eq!(b.len().expect("len"), model.len() as u64);
        let mut back = vec![0u8; model.len()];
        b.read(0, &mut back).expect("read");
        assert!(back == model, "the file differs from what was written");
    }

    /// The written ranges stay bounded, and merging only ever widens them: every range marked
    /// is still covered, and a hole is only ever reported where nothing was marked.
    #[test]
    fn written_ranges_stay_bounded_and_cover_every_write() {
        let mut w = Written { len: 1 << 40, ranges: BTreeMap::new() };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut marked = Vec::new();
        for _ in 0..5_000 {
            let from = rng.random_range(0..1u64 << 36);
            let to = from + rng.random_range(1..65_536);
            w.mark(from, to);
            marked.push((from, to));
        }
        assert!(w.ranges.len() <= RANGES_MAX);
        for &(from, to) in &marked {
            assert!(w.covers(from, to), "{from}..{to} lost");
            assert!(w.holes(from, to).is_empty());
        }
        let mut prev_end = None;
        for (&s, &e) in &w.ranges {
            assert!(s < e);
            assert!(prev_end.is_none_or(|p| p < s), "ranges overlap or touch");
            prev_end = Some(e);
        }
        let mut w = Written { len: 100, ranges: BTreeMap::new() };
        w.mark(10, 20);
        w.mark(30, 40);
        assert_eq!(w.holes(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(w.holes(15, 35), vec![(20, 30)]);
        w.truncate(35);
        assert_eq!(w.holes(0, 50), vec![(0, 10), (20, 30), (35, 50)]);
    }

    /// A database opened over the backend works, and reopened with redb's own backend reads the
    /// same (the file is an ordinary redb file).
    #[test]
    fn redb_on_the_backend_reopens_with_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
        {
            let db = redb::Database::builder()
                .create_with_backend(ZeroAhead::open(&path, AHEAD).expect("open"))
                .expect("create");
            for i in 0..200u64 {
                let txn = db.begin_write().expect("begin");
                txn.open_table(table).expect("table").insert(i, &[i as u8; 300][..]).expect("insert");
                txn.commit().expect("commit");
            }
        }
        let db = redb::Database::create(&path).expect("reopen");
        let txn = redb::ReadableDatabase::begin_read(&db).expect("read");
        let t = txn.open_table(table).expect("table");
        for i in 0..200u64 {
            let v = redb::ReadableTable::get(&t, i).expect("get").expect("present");
            assert_eq!(v.value(), &[i as u8; 300][..]);
        }
    }
}
