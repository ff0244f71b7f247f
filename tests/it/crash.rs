//! Crash test: a child appends under concurrent load and prints every acknowledged offset; it is
//! SIGKILLed at random moments; after each kill the store must hold every acknowledged record
//! exactly once, in order, at its acknowledged offset, with contiguous offsets.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use rand::Rng;
use tributary_broker::{StorageConfig, Store};

use crate::support::read_all;

const ROUNDS: u32 = 24;
const TOPIC: &str = "crash";
const PARTITIONS: i32 = 3;

#[test]
fn every_acknowledged_append_survives_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rng();
    // value -> (partition, offset) of every acknowledged record, over all rounds.
    let mut acked: HashMap<String, (i32, i64)> = HashMap::new();
    let mut repairs = 0u32;
    let mut max_recovery = std::time::Duration::ZERO;
    for round in 0..ROUNDS {
        let kill_after = rng.random_range(1..=600);
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-appender"))
            .args(["--data-dir", dir.path().to_str().expect("utf-8 path"), "--round", &round.to_string()])
            .args(["--tasks", &rng.random_range(4..=64).to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn crash-appender");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut acks_seen = 0;
        let mut killed = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split(' ');
            if parts.next() != Some("ack") {
                continue;
            }
            let (Some(p), Some(base), Some(last), Some(values)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue; // a line cut by the kill
            };
            let (Ok(p), Ok(base), Ok(last)) = (p.parse::<i32>(), base.parse::<i64>(), last.parse::<i64>()) else {
                continue;
            };
            let values: Vec<&str> = values.split(',').collect();
            if values.len() as i64 != last - base + 1 {
                continue; // cut line
            }
            for (i, v) in values.into_iter().enumerate() {
                assert!(acked.insert(v.to_string(), (p, base + i as i64)).is_none(), "{v} acknowledged twice");
            }
            acks_seen += 1;
            if acks_seen == kill_after && !killed {
                child.kill().expect("SIGKILL");
                killed = true;
            }
        }
        assert!(killed, "round {round}: child exited before {kill_after} acks");
        child.wait().expect("reap child");

        // Reopen (recovering from the kill) and check every acknowledged record.
        let cfg =
            StorageConfig { data_dir: dir.path().to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() };
        let (store, report) = Store::open(cfg).expect("reopen after SIGKILL");
        repairs += u32::from(report.repaired);
        max_recovery = max_recovery.max(report.duration);
        let mut found: HashMap<String, (i32, i64)> = HashMap::new();
        for p in 0..PARTITIONS {
            let records = read_all(&store, TOPIC, p);
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.offset, i as i64, "partition {p}: offsets are contiguous from 0");
                let v = String::from_utf8(r.value.clone().expect("value").to_vec()).expect("utf-8");
                assert!(found.insert(v.clone(), (p, r.offset)).is_none(), "{v} stored twice");
            }
            // Each task's records appear in the order it appended them.
            let mut last_seq: HashMap<(String, String), u64> = HashMap::new();
            for r in &records {
                let v = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
                let f: Vec<&str> = v.split('-').collect();
                let seq: u64 = f[2][1..].parse().expect("seq");
                let k = (f[0].to_string(), f[1].to_string());
                if let Some(prev) = last_seq.insert(k, seq) {
                    assert!(seq >= prev, "{v} stored after a later append of its task");
                }
            }
        }
        for (v, at) in &acked {
            assert_eq!(found.get(v), Some(at), "acknowledged {v} at {at:?} is missing or moved");
        }
        store.close_blocking().expect("close");
    }
    assert!(acked.len() > 1000, "only {} records acknowledged", acked.len());
    eprintln!(
        "crash test: {ROUNDS} kills, {} acknowledged records all present; {repairs} opens repaired, slowest recovery {max_recovery:?}",
        acked.len()
    );
}
