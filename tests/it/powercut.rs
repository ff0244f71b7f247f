//! Power cuts, not only process kills (issue 13 item 18). A SIGKILL keeps the page cache, so it
//! cannot show that what was acknowledged had reached the disk. Here the store runs on a
//! simulated disk (`storage::simdisk`) that records every write and `sync_data`; for thousands of
//! random moments of a seeded workload the test builds what a power cut there would leave (the
//! synced bytes plus a random subset of the later writes, the last one torn at sector
//! granularity), reopens the store on it and checks every acknowledged record, offset, committed
//! offset (`spaces::GROUP_OFFSETS`), session (`MQTT_SESSIONS`) and retained message
//! (`MQTT_RETAINED`), for `fsync` and `relaxed` topics:
//! - fsync: everything acknowledged is there; the one operation in flight at the cut is there
//!   whole or not at all;
//! - relaxed: each partition keeps a prefix of its acknowledged records (the lost ones are a
//!   suffix), a retained message written with a record is there exactly when the record is, and
//!   the next append gets an offset above every acknowledged one.
//!
//! The same runs again with the commit journal under redb (`storage::journal`, the gateway's
//! default on a real file): the database file and the journal are two simulated disks on one
//! clock, and a cut takes each at the same instant (each its own synced bytes plus a random
//! subset of its later writes).
//!
//! The seed is printed; `TRIBUTARY_TEST_SEED` replays a run. `TRIBUTARY_POWER_CUTS` sets how many
//! cuts (default 2,000, 1,000 with the journal).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tributary_broker::spaces;
use tributary_broker::storage::batch::NewRecord;
use tributary_broker::storage::journal::{Journaled, RING_BYTES_MIN};
use tributary_broker::storage::simdisk::{Event, Replay, SimDisk};
use tributary_broker::storage::BackendOpener;
use tributary_broker::storage::KvSpace;
use tributary_broker::{Durability, StorageConfig, Store, TopicConfig};

use crate::support::{read_all, seeded_rng};

const PARTITIONS: i32 = 2;
const OPS_PER_WORKLOAD: usize = 120;
const CUTS_PER_WORKLOAD: usize = 250;

/// What one acknowledged (or in-flight) operation changed.
#[derive(Debug, Clone)]
enum Effect {
    /// Records at consecutive offsets from `base`, and a retained message written with them.
    Append {
        topic: &'static str,
        partition: i32,
        base: i64,
        values: Vec<Bytes>,
        retained: Option<(Vec<u8>, Vec<u8>)>,
    },
    Kv {
        space: KvSpace,
        key: Vec<u8>,
        value: Vec<u8>,
    },
}

/// An operation of the workload, before the store answered it.
#[derive(Debug, Clone)]
enum Op {
    Append { topic: &'static str, partition: i32, values: Vec<Bytes>, retained: Option<(Vec<u8>, Vec<u8>)> },
    Kv { space: KvSpace, key: Vec<u8>, value: Vec<u8> },
}

/// `quick_repair`: redb's two-phase commit with the allocator state saved (the option the
/// gateway offers); off (the default) is a one-phase commit whose checksums detect a torn one.
pub(crate) fn config(dir: &std::path::Path, quick_repair: bool) -> StorageConfig {
    StorageConfig {
        quick_repair,
        data_dir: dir.to_path_buf(),
        disk_free_bytes_min: 0,
        // The smallest page cache: dirty pages are also written before a commit.
        cache_size_bytes: 1 << 20,
        // No time-driven rounds: only the workload writes, so the trace is its own.
        retention_check_interval_ms: 3_600_000,
        relaxed_flush_interval_ms: 3_600_000,
        ..StorageConfig::default()
    }
}

fn next_op(rng: &mut impl Rng, w: u64, i: usize) -> Op {
    let value = |rng: &mut dyn rand::RngCore, j: usize| {
        let pad = if rng.random_bool(0.1) { rng.random_range(2000..6000) } else { rng.random_range(0..200) };
        Bytes::from(format!("w{w}-op{i}-{j}-{}", "x".repeat(pad)))
    };
    let topic = if rng.random_bool(0.5) { "f" } else { "r" };
    let partition = rng.random_range(0..PARTITIONS);
    match rng.random_range(0..10) {
        0..=5 => {
            let n = rng.random_range(1..=4);
            Op::Append { topic, partition, values: (0..n).map(|j| value(rng, j)).collect(), retained: None }
        }
        6 => {
            let retained = (format!("ret/{w}/{i}").into_bytes(), format!("retained-{i}").into_bytes());
            Op::Append { topic, partition, values: vec![value(rng, 0)], retained: Some(retained) }
        }
        7 => Op::Kv {
            space: spaces::GROUP_OFFSETS,
            key: format!("g/{}", rng.random_range(0..4)).into_bytes(),
            value: i.to_be_bytes().to_vec(),
        },
        _ => {
            let len = if rng.random_bool(0.2) { rng.random_range(4000..9000) } else { rng.random_range(1..300) };
            let mut value = i.to_be_bytes().to_vec();
            value.resize(len.max(8), b's');
            Op::Kv { space: spaces::MQTT_SESSIONS, key: format!("s/{}", rng.random_range(0..4)).into_bytes(), value }
        }
    }
}

/// The database's disk and, with the journal, the journal's: both stamped from one clock.
struct Disks {
    db: SimDisk,
    journal: Option<SimDisk>,
}

impl Disks {
    fn opener(&self) -> BackendOpener {
        match &self.journal {
            None => self.db.opener(),
            // The smallest ring, so a workload wraps it and checkpoints several times.
            Some(journal) => Journaled::opener(self.db.opener(), journal.opener(), RING_BYTES_MIN),
        }
    }
}

/// A recorded workload: the disks, and each operation with the clock's reading just after its
/// acknowledgement (every disk event of the operation is stamped before it).
struct Recorded {
    disks: Disks,
    end: u64,
    done: Vec<(u64, Effect)>,
}

/// Runs one seeded workload on recording disks.
async fn record(seed: u64, dir: &std::path::Path, quick_repair: bool, journaled: bool) -> Recorded {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let clock = Arc::new(AtomicU64::new(0));
    let disks = Disks {
        db: SimDisk::recording_clocked(clock.clone()),
        journal: journaled.then(|| SimDisk::recording_clocked(clock.clone())),
    };
    let (store, _) = Store::open_with_backend(config(dir, quick_repair), disks.opener()).expect("open");
    let relaxed = TopicConfig { durability: Durability::Relaxed, ..TopicConfig::default() };
    store.create_topic("f", PARTITIONS as u32, TopicConfig::default()).await.expect("create f");
    store.create_topic("r", PARTITIONS as u32, relaxed).await.expect("create r");
    let mut done = Vec::new();
    for i in 0..OPS_PER_WORKLOAD {
        let effect = match next_op(&mut rng, seed, i) {
            Op::Append { topic, partition, values, retained } => {
                let records: Vec<NewRecord> = values.iter().map(|v| NewRecord::new(None::<Bytes>, v.clone())).collect();
                let kv = retained.iter().map(|(k, v)| (spaces::MQTT_RETAINED, k.clone(), Some(v.clone()))).collect();
                let pending = store.enqueue_records_with(topic, partition, records, kv).await.expect("queue");
                let o = pending.wait().await.expect("append");
                Effect::Append { topic, partition, base: o.base_offset, values, retained }
            }
            Op::Kv { space, key, value } => {
                store.kv_put(space, key.clone(), Some(value.clone())).await.expect("kv");
                Effect::Kv { space, key, value }
            }
        };
        done.push((clock.fetch_add(1, Ordering::SeqCst), effect));
    }
    store.close().await.expect("close");
    Recorded { disks, end: clock.load(Ordering::SeqCst), done }
}

/// What must hold in `store`, reopened after a cut where `acked` were acknowledged and
/// `in_flight` may or may not have happened.
fn check(store: &Store, acked: &[Effect], in_flight: Option<&Effect>, what: &str) -> HashMap<(&'static str, i32), i64> {
    let mut max_acked: HashMap<(&'static str, i32), i64> = HashMap::new();
    for topic in ["f", "r"] {
        for p in 0..PARTITIONS {
            let stored: Vec<(i64, Bytes)> =
                read_all(store, topic, p).into_iter().map(|r| (r.offset, r.value.unwrap_or_default())).collect();
            let appends =
                |e: &&Effect| matches!(e, Effect::Append { topic: t, partition, .. } if *t == topic && *partition == p);
            let expected: Vec<(i64, Bytes)> = acked
                .iter()
                .filter(appends)
                .flat_map(|e| match e {
                    Effect::Append { base, values, .. } => {
                        values.iter().enumerate().map(|(j, v)| (base + j as i64, v.clone())).collect::<Vec<_>>()
                    }
                    Effect::Kv { .. } => Vec::new(),
                })
                .collect();
            if let Some((last, _)) = expected.last() {
                max_acked.insert((topic, p), *last);
            }
            let extra: Vec<(i64, Bytes)> = match in_flight.filter(appends) {
                Some(Effect::Append { base, values, .. }) => {
                    values.iter().enumerate().map(|(j, v)| (base + j as i64, v.clone())).collect()
                }
                _ => Vec::new(),
            };
            let kept = stored.iter().zip(&expected).take_while(|(s, e)| s == e).count();
            if topic == "f" {
                assert_eq!(kept, expected.len(), "{what}: fsync {topic}-{p} lost acknowledged records");
            }
            // The rest of what is stored is the in-flight append, whole (only after every
            // acknowledged record), or nothing.
            let rest = &stored[kept..];
            assert!(
                rest.is_empty() || (kept == expected.len() && rest == extra.as_slice()),
                "{what}: {topic}-{p} holds {} acknowledged of {} then {} records that are not the in-flight append",
                kept,
                expected.len(),
                rest.len()
            );
        }
    }
    // Retained messages go with their record.
    let present = |topic: &str, partition: i32, base: i64, value: &Bytes| {
        store
            .read_records(topic, partition, base, 1)
            .ok()
            .and_then(|r| r.into_iter().find(|r| r.offset == base))
            .and_then(|r| r.value)
            == Some(value.clone())
    };
    for (e, flying) in acked.iter().map(|e| (e, false)).chain(in_flight.map(|e| (e, true))) {
        if let Effect::Append { topic, partition, base, values, retained: Some((key, value)) } = e {
            let stored = store.kv_get(spaces::MQTT_RETAINED, key).expect("kv get");
            let record = present(topic, *partition, *base, &values[0]);
            if *topic == "f" && !flying {
                assert!(record, "{what}: acknowledged fsync record with a retained message lost");
            }
            assert_eq!(
                stored.as_ref() == Some(value),
                record,
                "{what}: retained {key:?} without its record (or the reverse)"
            );
        }
    }
    // Committed offsets and sessions: the last acknowledged value, or the in-flight one.
    let mut last: HashMap<(KvSpace, Vec<u8>), Vec<u8>> = HashMap::new();
    for e in acked {
        if let Effect::Kv { space, key, value } = e {
            last.insert((*space, key.clone()), value.clone());
        }
    }
    for space in [spaces::GROUP_OFFSETS, spaces::MQTT_SESSIONS] {
        for k in 0..4 {
            let key = format!("{}/{k}", if space == spaces::GROUP_OFFSETS { "g" } else { "s" }).into_bytes();
            let stored = store.kv_get(space, &key).expect("kv get");
            let acked_value = last.get(&(space, key.clone())).cloned();
            let flying = match in_flight {
                Some(Effect::Kv { space: s, key: k, value }) if *s == space && *k == key => Some(value.clone()),
                _ => None,
            };
            assert!(
                stored == acked_value || (flying.is_some() && stored == flying),
                "{what}: {space:?} {:?} holds {:?}, acknowledged {:?}",
                String::from_utf8_lossy(&key),
                stored.map(|v| v.len()),
                acked_value.map(|v| v.len())
            );
        }
    }
    max_acked
}

#[test]
fn every_acknowledged_write_survives_a_power_cut_at_any_moment() {
    power_cuts("every_acknowledged_write_survives_a_power_cut_at_any_moment", false, 2_000);
}

#[test]
fn every_acknowledged_write_survives_a_power_cut_at_any_moment_with_the_commit_journal() {
    power_cuts("every_acknowledged_write_survives_a_power_cut_at_any_moment_with_the_commit_journal", true, 1_000);
}

fn power_cuts(name: &str, journaled: bool, default_cuts: usize) {
    let cuts_wanted: usize =
        std::env::var("TRIBUTARY_POWER_CUTS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_cuts);
    let mut rng = seeded_rng(name);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    let (mut cuts, mut torn_opens, mut relaxed_lost, mut checkpoints) = (0usize, 0usize, 0usize, 0usize);
    let mut workloads = 0u64;
    while cuts < cuts_wanted {
        let seed: u64 = rng.random();
        let quick_repair = workloads % 2 == 1;
        workloads += 1;
        let Recorded { disks, end, done } = rt.block_on(record(seed, dir.path(), quick_repair, journaled));
        let db_trace = disks.db.trace();
        let journal_trace = disks.journal.as_ref().map(SimDisk::trace).unwrap_or_default();
        // With the journal, every sync of the database file is a checkpoint.
        checkpoints += if journaled { db_trace.iter().filter(|e| **e == Event::Sync).count() } else { 0 };
        let mut instants: Vec<u64> =
            (0..CUTS_PER_WORKLOAD.min(cuts_wanted - cuts)).map(|_| rng.random_range(0..=end)).collect();
        instants.sort_unstable();
        let (mut db_replay, mut journal_replay) = (Replay::new(&db_trace), Replay::new(&journal_trace));
        for at in instants {
            db_replay.advance(disks.db.events_before(at));
            if let Some(j) = &disks.journal {
                journal_replay.advance(j.events_before(at));
            }
            let cut = Disks {
                db: SimDisk::from_image(db_replay.power_cut(&mut rng)),
                journal: disks.journal.as_ref().map(|_| SimDisk::from_image(journal_replay.power_cut(&mut rng))),
            };
            let acked: Vec<Effect> = done.iter().filter(|(mark, _)| *mark < at).map(|(_, e)| e.clone()).collect();
            let in_flight = done.iter().find(|(mark, _)| *mark >= at).map(|(_, e)| e);
            let unsynced = db_replay.unsynced() + journal_replay.unsynced();
            let what = format!(
                "workload {seed} (quick_repair {quick_repair}, journal {journaled}) cut at {at}/{end} ({unsynced} unsynced writes)"
            );
            torn_opens += usize::from(unsynced > 0);
            let opened = Store::open_with_backend(config(dir.path(), quick_repair), cut.opener());
            let store = match opened {
                Ok((store, _)) => store,
                // Before the first commit there is no database yet: nothing was acknowledged.
                Err(_) if acked.is_empty() => {
                    cuts += 1;
                    continue;
                }
                Err(e) => panic!("{what}: the store does not open: {e}"),
            };
            if store.topic("f").is_none() || store.topic("r").is_none() {
                // Cut while the topics were being created: nothing was acknowledged yet.
                assert!(acked.is_empty(), "{what}: a topic is missing");
                store.close_blocking().expect("close");
                cuts += 1;
                continue;
            }
            let max_acked = check(&store, &acked, in_flight, &what);
            // No offset is handed out twice: the next append of every relaxed partition goes
            // above every acknowledged offset.
            for p in 0..PARTITIONS {
                let kept = read_all(&store, "r", p).last().map_or(-1, |r| r.offset);
                let top = max_acked.get(&("r", p)).copied().unwrap_or(-1);
                relaxed_lost += usize::from(kept < top);
                let o = rt
                    .block_on(store.append_records("r", p, vec![NewRecord::new(None::<Bytes>, "after the cut")]))
                    .unwrap_or_else(|e| panic!("{what}: append after the cut: {e}"));
                assert!(
                    o.base_offset > top,
                    "{what}: r-{p} handed out offset {} again (acknowledged up to {top})",
                    o.base_offset
                );
            }
            store.close_blocking().expect("close");
            cuts += 1;
        }
    }
    eprintln!(
        "power cuts (journal {journaled}): {cuts} cuts in {workloads} workloads ({torn_opens} with unsynced writes, {relaxed_lost} relaxed partitions lost acknowledged records, {checkpoints} journal checkpoints) in {:?}",
        started.elapsed()
    );
    assert!(!journaled || checkpoints >= workloads as usize, "the journal's ring was never checkpointed");
    assert!(relaxed_lost > 0, "no cut lost a relaxed record: the relaxed checks proved nothing");
}
