//! A simulated disk for tests, as a redb [`StorageBackend`] (open a store on it with
//! [`Store::open_with_backend`](crate::Store::open_with_backend) and [`SimDisk::opener`]):
//! - **faults**: writes can be made to fail, all of them or those that would grow the file past a
//!   length (what a full file system or `RLIMIT_FSIZE` does), and made to work again;
//! - **power cuts**: with [`SimDisk::recording`] every write, length change and `sync_data` is
//!   kept in order, with marks the test adds (e.g. "append 17 acknowledged"); [`Replay`] walks that
//!   trace and builds, at any point of it, the image a power cut would leave: the bytes as of the
//!   last `sync_data` plus a random subset of the writes since, the last of them torn at sector
//!   granularity, as real disks do.
//!
//! Built for the broker's own tests and, with the `sim-disk` feature, for the end-to-end suite;
//! the gateway as built for release and packages (`-p tributary-gateway`) does not contain it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;
use redb::StorageBackend;

use crate::BackendOpener;

/// The unit a disk writes atomically: a power cut keeps or loses each sector of a write whole.
pub const SECTOR_BYTES: usize = 512;

/// One step of a recorded trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    SetLen(u64),
    /// `sync_data` returned: everything before it is durable.
    Sync,
    /// A test's own marker, in order with the disk's operations.
    Mark(u64),
}

/// Which writes fail (with an error like the kernel's for the same cause).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// Every write, length change and sync fails (EIO).
    All,
    /// Writes and length changes past this many bytes fail (EFBIG, like `RLIMIT_FSIZE`); the
    /// rest of the file can still be rewritten.
    Beyond(u64),
}

#[derive(Debug, Default)]
struct State {
    data: Vec<u8>,
    fault: Option<WriteFault>,
    trace: Option<Vec<Event>>,
    failed_writes: u64,
    /// With [`SimDisk::recording_clocked`]: the clock shared with other disks, and each trace
    /// event's reading of it, so one instant can be cut across several files.
    clock: Option<Arc<AtomicU64>>,
    stamps: Vec<u64>,
    /// How long a `sync_data` takes (a slow disk), outside the lock.
    sync_delay: std::time::Duration,
}

impl State {
    fn record(&mut self, e: Event) {
        if let Some(t) = self.trace.as_mut() {
            t.push(e);
            if let Some(c) = &self.clock {
                self.stamps.push(c.fetch_add(1, Ordering::SeqCst));
            }
        }
    }
}

/// The disk; clones share it (a store reopening the database sees the same bytes).
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    gate: Arc<Gate>,
}

/// What a closed [`Gate`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// `sync_data` calls (the writes before them are done).
    Syncs,
    /// Writes (and the syncs after them).
    Writes,
}

/// Holds disk operations while closed (`SimDisk::hold`): a test sees what happens while a
/// commit waits for the disk, without timing anything.
#[derive(Debug, Default)]
struct Gate {
    /// (what is held, operations waiting at it)
    state: Mutex<(Option<Held>, usize)>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, (Option<Held>, usize)> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pass(&self, op: Held) {
        let mut g = self.lock();
        let holds = |h: Option<Held>| h == Some(op) || (op == Held::Syncs && h == Some(Held::Writes));
        if !holds(g.0) {
            return;
        }
        g.1 += 1;
        self.changed.notify_all();
        while holds(g.0) {
            g = self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.1 -= 1;
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty disk that records its trace for [`Replay`].
    pub fn recording() -> Self {
        let disk = Self::default();
        disk.lock().trace = Some(Vec::new());
        disk
    }

    /// An empty disk that records its trace, each event stamped from `clock` (shared with the
    /// other disks of one simulated machine: [`SimDisk::events_before`] then cuts every disk's
    /// trace at one instant).
    pub fn recording_clocked(clock: Arc<AtomicU64>) -> Self {
        let disk = Self::recording();
        disk.lock().clock = Some(clock);
        disk
    }

    /// How many of the recorded trace's events were stamped before `instant` (a reading of the
    /// shared clock): `trace()[..n]` is this disk's history up to that instant.
    pub fn events_before(&self, instant: u64) -> usize {
        self.lock().stamps.partition_point(|&t| t < instant)
    }

    /// A disk holding `image` (e.g. what a power cut left).
    pub fn from_image(image: Vec<u8>) -> Self {
        let disk = Self::default();
        disk.lock().data = image;
        disk
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread poisons the lock; the data is still what the test wants to see.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What `Store::open_with_backend` takes: every (re)open gets this same disk.
    pub fn opener(&self) -> BackendOpener {
        let disk = self.clone();
        Arc::new(move || Ok(Box::new(disk.clone()) as Box<dyn StorageBackend>))
    }

    /// Makes writes fail (`Some`) or work again (`None`).
    pub fn set_fault(&self, fault: Option<WriteFault>) {
        self.lock().fault = fault;
    }

    /// Makes every later `sync_data` take `delay` (after it is recorded: writes that come in
    /// meanwhile are not covered by it), as a slow disk's flush does.
    pub fn set_sync_delay(&self, delay: std::time::Duration) {
        self.lock().sync_delay = delay;
    }

    /// Makes every later operation of the kind wait (before it checks for a fault) until
    /// [`SimDisk::release`].
    pub fn hold(&self, what: Held) {
        self.gate.lock().0 = Some(what);
    }

    /// Lets held and later operations go on.
    pub fn release(&self) {
        self.gate.lock().0 = None;
        self.gate.changed.notify_all();
    }

    /// Waits until an operation is held, at most `timeout`; returns whether one is.
    pub fn wait_for_held(&self, timeout: std::time::Duration) -> bool {
        let g = self.gate.lock();
        let (g, _) = self
            .gate
            .changed
            .wait_timeout_while(g, timeout, |g| g.1 == 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.1 > 0
    }

    /// Writes, length changes and syncs refused so far.
    pub fn failed_writes(&self) -> u64 {
        self.lock().failed_writes
    }

    /// The current bytes (what a process crash leaves: the page cache survives it).
    pub fn image(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    pub fn len_bytes(&self) -> u64 {
        self.lock().data.len() as u64
    }

    /// Adds `mark` to the trace; returns its position.
    pub fn mark(&self, mark: u64) -> usize {
        let mut s = self.lock();
        if s.trace.is_none() {
            s.trace = Some(Vec::new());
        }
        s.record(Event::Mark(mark));
        s.trace.as_ref().map_or(0, |t| t.len() - 1)
    }

    /// The recorded trace so far.
    pub fn trace(&self) -> Vec<Event> {
        self.lock().trace.clone().unwrap_or_default()
    }

    fn check(s: &mut State, end: u64) -> io::Result<()> {
        let refused = match s.fault {
            Some(WriteFault::All) => Some(io::Error::other("simulated I/O error")),
            Some(WriteFault::Beyond(limit)) if end > limit => {
                Some(io::Error::from_raw_os_error(27)) // EFBIG: File too large
            }
            _ => None,
        };
        match refused {
            Some(e) => {
                s.failed_writes += 1;
                Err(e)
            }
            None => Ok(()),
        }
    }
}

impl StorageBackend for SimDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().data.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let s = self.lock();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = start
            .checked_add(out.len())
            .and_then(|end| s.data.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the disk"))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        if len > s.data.len() as u64 {
            Self::check(&mut s, len)?;
        }
        s.data.resize(usize::try_from(len).map_err(io::Error::other)?, 0);
        s.record(Event::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.gate.pass(Held::Syncs);
        let mut s = self.lock();
        if s.fault == Some(WriteFault::All) {
            Self::check(&mut s, 0)?;
        }
        s.record(Event::Sync);
        let delay = s.sync_delay;
        drop(s);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.gate.pass(Held::Writes);
        let mut s = self.lock();
        let end = offset + data.len() as u64;
        Self::check(&mut s, end)?;
        apply_write(&mut s.data, offset, data);
        s.record(Event::Write { offset, data: data.to_vec() });
        Ok(())
    }
}

fn apply_write(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    if image.len() < start + data.len() {
        image.resize(start + data.len(), 0);
    }
    image[start..start + data.len()].copy_from_slice(data);
}

/// Walks a recorded trace, keeping the durable image (as of the last `Sync`) and the writes since.
#[derive(Debug)]
pub struct Replay<'t> {
    trace: &'t [Event],
    pos: usize,
    synced: Vec<u8>,
    /// Events since the last `Sync` (writes and length changes).
    pending: Vec<&'t Event>,
}

impl<'t> Replay<'t> {
    pub fn new(trace: &'t [Event]) -> Self {
        Self { trace, pos: 0, synced: Vec::new(), pending: Vec::new() }
    }

    /// Position in the trace (events applied so far).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Applies events up to (not including) `to`; returns the marks passed.
    pub fn advance(&mut self, to: usize) -> Vec<u64> {
        let mut marks = Vec::new();
        while self.pos < to.min(self.trace.len()) {
            match &self.trace[self.pos] {
                Event::Sync => {
                    for e in self.pending.drain(..) {
                        apply(&mut self.synced, e, None);
                    }
                }
                Event::Mark(m) => marks.push(*m),
                e => self.pending.push(e),
            }
            self.pos += 1;
        }
        marks
    }

    /// Writes since the last sync (what a power cut now may lose).
    pub fn unsynced(&self) -> usize {
        self.pending.len()
    }

    /// The image a power cut at the current position leaves: the synced bytes, then either
    /// none, all, or a random subset of the writes since (in order), the last one that lands
    /// torn after a random number of whole sectors.
    pub fn power_cut(&self, rng: &mut impl Rng) -> Vec<u8> {
        let mut image = self.synced.clone();
        let landing: Vec<&Event> = match rng.random_range(0..4) {
            0 => Vec::new(),
            1 => self.pending.clone(),
            _ => self.pending.iter().copied().filter(|_| rng.random_bool(0.5)).collect(),
        };
        let last = landing.len().checked_sub(1);
        for (i, e) in landing.into_iter().enumerate() {
            let torn = (Some(i) == last && rng.random_bool(0.5)).then(|| rng.random_range(0..=usize::MAX));
            apply(&mut image, e, torn);
        }
        image
    }
}

/// Applies one event; `torn = Some(n)`: only the first `n % sectors` whole sectors of a write land.
fn apply(image: &mut Vec<u8>, e: &Event, torn: Option<usize>) {
    match e {
        Event::Write { offset, data } => {
            let keep = match torn {
                Some(n) => {
                    let sectors = data.len().div_ceil(SECTOR_BYTES);
                    ((n % sectors.max(1)) * SECTOR_BYTES).min(data.len())
                }
                None => data.len(),
            };
            apply_write(image, *offset, &data[..keep]);
        }
        Event::SetLen(len) => image.resize(*len as usize, 0),
        Event::Sync | Event::Mark(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_cut_keeps_synced_writes_and_a_subset_of_the_rest() {
        let disk = SimDisk::recording();
        disk.write(0, &[1; 1024]).expect("write");
        disk.sync_data().expect("sync");
        let m = disk.mark(7);
        disk.write(0, &[2; 1024]).expect("write");
        let trace = disk.trace();
        let mut replay = Replay::new(&trace);
        assert_eq!(replay.advance(m + 1), vec![7]);
        assert_eq!(replay.unsynced(), 0);
        let mut rng = rand::rng();
        assert_eq!(replay.power_cut(&mut rng), vec![1; 1024], "only the synced write");
        replay.advance(trace.len());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let image = replay.power_cut(&mut rng);
            assert_eq!(image.len(), 1024);
            // Whole sectors only: each sector is all old or all new.
            for sector in image.chunks(SECTOR_BYTES) {
                assert!(sector.iter().all(|&b| b == sector[0]), "a sector is never torn");
            }
            seen.insert(image.iter().filter(|&&b| b == 2).count());
        }
        assert!(seen.contains(&0) && seen.contains(&1024) && seen.contains(&512), "{seen:?}");
    }

    #[test]
    fn faults_refuse_writes_until_cleared() {
        let disk = SimDisk::new();
        disk.write(0, &[1; 100]).expect("write");
        disk.set_fault(Some(WriteFault::Beyond(100)));
        disk.write(0, &[2; 100]).expect("rewriting within the limit works");
        assert_eq!(disk.write(50, &[2; 100]).expect_err("past the limit").raw_os_error(), Some(27));
        assert!(disk.set_len(200).is_err());
        disk.set_fault(Some(WriteFault::All));
        assert!(disk.write(0, &[3; 10]).is_err() && disk.sync_data().is_err());
        assert_eq!(disk.failed_writes(), 4);
        disk.set_fault(None);
        disk.write(100, &[4; 10]).expect("works again");
        assert_eq!(disk.len_bytes(), 110);
    }
}
