//! Helpers shared by the benchmark binaries: the machine's own limits (fsync rate, sequential
//! write bandwidth) and memory readings of a process, so every benchmark reports its figures
//! against the same yardsticks.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

pub const MIB: f64 = 1024.0 * 1024.0;

/// 4 KiB write + fdatasync per round, for `for_time`: the rate a durable commit cannot beat.
pub fn fsync_rate(dir: &Path, for_time: Duration) -> std::io::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    let block = [0x5au8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < for_time {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    std::fs::remove_file(&path)?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Bytes per second of writing `bytes` in 1 MiB chunks followed by fsync.
pub fn sequential_write(dir: &Path, bytes: usize) -> std::io::Result<f64> {
    let path = dir.join("seq-probe");
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    let chunk = vec![0xa5u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..bytes / chunk.len() {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    let rate = bytes as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM` = peak RSS, `VmRSS` = current); 0 if unknown.
pub fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}
