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

/// The gateway started as a child process for a benchmark: its own data directory, free ports,
/// warnings-only logging. Killed when dropped.
#[derive(Debug)]
pub struct BenchGateway {
    child: std::process::Child,
    /// The child's pid, for `/proc` readings.
    pub pid: String,
    /// `host:port` of the Kafka and MQTT listeners.
    pub kafka: String,
    pub mqtt: String,
}

impl BenchGateway {
    /// Starts `binary` (default: `tributary-under-test` next to the running program) on a config
    /// with data in `dir`, `storage_extra` lines added to `[storage]` and `tables` (further TOML
    /// tables such as `[topic_defaults]`) appended.
    pub fn start(binary: Option<&Path>, dir: &Path, storage_extra: &str, tables: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        use std::io::BufRead;
        let binary = match binary {
            Some(b) => b.to_path_buf(),
            None => std::env::current_exe()?.with_file_name("tributary-under-test"),
        };
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[storage]\ndata_dir = {:?}\nmax_bytes = {}\n{storage_extra}[kafka]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n{tables}[log]\nlevel = \"warn,tributary_gateway=info\"\n",
                dir.join("data").to_str().context("utf-8 path")?,
                16u64 << 30,
            ),
        )?;
        let mut child = std::process::Command::new(&binary)
            .args(["serve", "--config", config.to_str().context("utf-8 path")?])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id().to_string();
        let mut lines = std::io::BufReader::new(child.stderr.take().context("stderr")?).lines();
        let ready = loop {
            let Some(line) = lines.next() else { anyhow::bail!("gateway exited before it was ready") };
            let line = line?;
            if line.contains("tributary gateway ready") {
                break line;
            }
        };
        let field = |name: &str| -> anyhow::Result<String> {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
                .with_context(|| format!("no {name} in the ready line"))
        };
        let (kafka, mqtt) = (field("kafka=")?, field("mqtt=")?);
        // Keep draining its log so it never blocks on a full pipe; show what it says.
        std::thread::spawn(move || lines.for_each(|l| eprintln!("gateway: {}", l.unwrap_or_default())));
        Ok(Self { child, pid, kafka, mqtt })
    }

    /// Peak resident memory so far (KiB).
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(&self.pid, "VmHWM:")
    }
}

impl Drop for BenchGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
