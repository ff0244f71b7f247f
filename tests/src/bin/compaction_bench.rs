//! Compaction benchmark (issue 17): a simulated day of smart-meter readings (10,000 meters, one
//! reading each every 15 minutes, record timestamps over the day) appended at a steady rate by
//! concurrent appenders, each waiting for durability, in the same run to two stores: one whose
//! topic is compacted (`cleanup.policy=compact`, compaction lags scaled to the simulated clock)
//! and one without compaction. Prints the produce latency (p50/p99/max) with and without
//! compaction running, the disk use through the day, and the compaction throughput when the
//! uncompacted store's day is compacted afterwards with nothing else running.
//!
//! `cargo run --release -p tributary-tests --bin compaction-bench -- [--dir DIR] [--day-seconds N]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tributary_broker::config::CleanupPolicy;
use tributary_broker::{Codec, StorageConfig, Store, StoreStats, TopicConfig};
use tributary_tests::workload::{fleets, ingest_at, Ingest, TOPIC};
use tributary_tests::{fsync_rate, status_kib, MIB};

#[derive(Debug, Parser)]
struct Args {
    /// Directory on the disk to measure (a temporary directory is made inside it).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Meters (keys).
    #[arg(long, default_value_t = 10_000)]
    meters: usize,
    /// Minutes between two readings of a meter (simulated time).
    #[arg(long, default_value_t = 15)]
    interval_min: u64,
    /// Real seconds one simulated day takes (sets the append rate).
    #[arg(long, default_value_t = 60)]
    day_seconds: u64,
    /// `min.compaction.lag.ms` and `max.compaction.lag.ms` of the compacted topic, in simulated
    /// minutes (scaled to real time by the day's compression).
    #[arg(long, default_value_t = 60)]
    min_lag_min: u64,
    #[arg(long, default_value_t = 360)]
    max_lag_min: u64,
    /// Concurrent appenders, and records per append.
    #[arg(long, default_value_t = 16)]
    appenders: usize,
    #[arg(long, default_value_t = 10)]
    per_append: usize,
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// `storage.compaction_bytes_per_commit_max` in KiB (default: the store's, 4 MiB): what
    /// one compaction step in a commit may read.
    #[arg(long)]
    compaction_step_kib: Option<u64>,
}

/// The simulated day: 2026-12-01 00:00 UTC.
const DAY_START_MS: i64 = 1_796_083_200_000;

/// A store of its own in `dir`, compaction looking for work every 200 ms.
async fn open(dir: &Path, args: &Args) -> anyhow::Result<Store> {
    let d = StorageConfig::default();
    let cfg = StorageConfig {
        data_dir: dir.to_path_buf(),
        max_bytes: 16 << 30,
        retention_check_interval_ms: 200,
        compaction_bytes_per_commit_max: args
            .compaction_step_kib
            .map_or(d.compaction_bytes_per_commit_max, |k| k << 10),
        ..d
    };
    let (store, _) = tokio::task::spawn_blocking(move || Store::open(cfg)).await?.context("open store")?;
    Ok(store)
}

/// One simulated day into `store`: per-hour (records so far, logical MiB, disk MiB) and the
/// appends' latencies.
async fn day(store: &Store, args: &Args) -> anyhow::Result<(Vec<(u64, f64, f64)>, Ingest)> {
    let per_day = args.meters as u64 * (24 * 60 / args.interval_min);
    let rate = per_day as f64 / args.day_seconds as f64;
    let mut fl = fleets(args.meters, args.appenders, DAY_START_MS, args.interval_min as i64 * 60_000);
    let mut hours = Vec::new();
    let mut all = Ingest::default();
    let start = Instant::now();
    for h in 0..24u64 {
        let n = per_day * (h + 1) / 24 - per_day * h / 24;
        let part = ingest_at(store, &mut fl, n, args.per_append, args.partitions, Some(rate)).await?;
        all.records += part.records;
        all.value_bytes += part.value_bytes;
        all.key_bytes += part.key_bytes;
        all.commits += part.commits;
        all.commit_micros += part.commit_micros;
        all.latencies_us.extend(part.latencies_us);
        let logical = store.stats().logical_bytes as f64 / MIB;
        hours.push((all.records, logical, store.disk_usage_bytes()? as f64 / MIB));
    }
    all.secs = start.elapsed().as_secs_f64();
    Ok((hours, all))
}

fn delta(after: &StoreStats, before: &StoreStats) -> (u64, u64, u64) {
    (
        after.compaction_removed_records - before.compaction_removed_records,
        after.compaction_reclaimed_bytes - before.compaction_reclaimed_bytes,
        after.compaction_passes - before.compaction_passes,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let fsyncs = fsync_rate(tmp.path(), Duration::from_secs(3))?;
    // Simulated time runs this many times faster than real time.
    let speed = 86_400.0 / args.day_seconds as f64;
    let lag_ms = |min: u64| (min as f64 * 60_000.0 / speed) as u64;
    let base = TopicConfig { compression: Codec::Lz4, retention_ms: None, ..TopicConfig::default() };
    let compacted = TopicConfig {
        cleanup_policy: CleanupPolicy::Compact,
        min_compaction_lag_ms: lag_ms(args.min_lag_min),
        max_compaction_lag_ms: lag_ms(args.max_lag_min),
        ..base.clone()
    };

    // Without compaction, then with it: the same readings at the same rate.
    let off_store = open(&tmp.path().join("off"), &args).await?;
    off_store.create_topic(TOPIC, args.partitions, base.clone()).await?;
    eprintln!("day without compaction...");
    let (off_hours, off) = day(&off_store, &args).await?;
    let on_store = open(&tmp.path().join("on"), &args).await?;
    on_store.create_topic(TOPIC, args.partitions, compacted.clone()).await?;
    eprintln!("day with compaction...");
    let before = on_store.stats();
    let (on_hours, on) = day(&on_store, &args).await?;
    let on_stats = on_store.stats();
    let (on_removed, on_reclaimed, on_passes) = delta(&on_stats, &before);
    let on_logical = on_stats.logical_bytes;
    let on_disk = on_store.disk_usage_bytes()?;
    on_store.close().await?;

    // Compaction alone: the uncompacted day, compacted with no lag and any dirty ratio.
    eprintln!("compacting the uncompacted day...");
    let records_before = off.records;
    let logical_before = off_store.stats().logical_bytes;
    let disk_before = off_store.disk_usage_bytes()?;
    let s0 = off_store.stats();
    let clean_now = TopicConfig { min_compaction_lag_ms: 0, min_cleanable_dirty_ratio_ppm: 0, ..compacted.clone() };
    let start = Instant::now();
    off_store.alter_topic_config(TOPIC, clean_now).await?;
    let deadline = start + Duration::from_secs(1800);
    loop {
        let s = off_store.stats();
        // Done when every partition had a pass and what is left dirty is at most the active
        // tails (the newest batch of each partition, never compacted).
        let passes = s.compaction_passes - s0.compaction_passes;
        let tails = u64::from(args.partitions) * u64::from(StorageConfig::default().batch_size_bytes_max);
        if passes >= u64::from(args.partitions) && s.compaction_dirty_bytes <= tails {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "compaction did not finish: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let clean_secs = start.elapsed().as_secs_f64();
    let s1 = off_store.stats();
    let (removed, reclaimed, passes) = delta(&s1, &s0);
    let disk_after = off_store.disk_usage_bytes()?;
    off_store.close().await?;

    let per_day = args.meters as u64 * (24 * 60 / args.interval_min);
    println!("| measurement | result |");
    println!("|---|---|");
    println!("| machine: fsync rate (4 KiB write + fdatasync) | {fsyncs:.0} /s |");
    println!(
        "| workload | {} meters, a reading every {} min: {per_day} records over a simulated day in {} s ({:.0} records/s), {} appenders x {} records per append, {} partitions, lz4; {:.1} MiB of keys and values |",
        args.meters,
        args.interval_min,
        args.day_seconds,
        per_day as f64 / args.day_seconds as f64,
        args.appenders,
        args.per_append,
        args.partitions,
        (off.key_bytes + off.value_bytes) as f64 / MIB
    );
    println!(
        "| compaction settings (simulated / real) | min.compaction.lag {} min / {} ms, max.compaction.lag {} min / {} ms, min.cleanable.dirty.ratio 0.5, {} KiB per commit |",
        args.min_lag_min,
        compacted.min_compaction_lag_ms,
        args.max_lag_min,
        compacted.max_compaction_lag_ms,
        args.compaction_step_kib.unwrap_or(StorageConfig::default().compaction_bytes_per_commit_max >> 10)
    );
    for (label, i) in [("produce without compaction", &off), ("produce with compaction running", &on)] {
        println!(
            "| {label} | **p50 {:.2} ms, p99 {:.2} ms**, max {:.2} ms; {:.0} records/s; {} |",
            i.latency_ms(0.5),
            i.latency_ms(0.99),
            i.latency_ms(1.0),
            i.records as f64 / i.secs,
            i.commits()
        );
    }
    println!(
        "| compaction during the day | {on_passes} passes, {on_removed} superseded records removed, {:.1} MiB reclaimed |",
        on_reclaimed as f64 / MIB
    );
    println!(
        "| end of day: logical bytes, disk use | compacted: {:.1} MiB in the log, {:.1} MiB of disk; without compaction: {:.1} MiB, {:.1} MiB |",
        on_logical as f64 / MIB,
        on_disk as f64 / MIB,
        logical_before as f64 / MIB,
        disk_before as f64 / MIB
    );
    println!(
        "| compaction alone (the uncompacted day, lag 0) | **{:.0} records/s** ({records_before} records in {clean_secs:.1} s, {passes} passes), {removed} removed, {:.1} MiB reclaimed; disk {:.1} -> {:.1} MiB (redb reuses freed pages, the file does not shrink) |",
        records_before as f64 / clean_secs,
        reclaimed as f64 / MIB,
        disk_before as f64 / MIB,
        disk_after as f64 / MIB
    );
    println!("| peak RSS of the benchmark process | {:.1} MiB |", status_kib("self", "VmHWM:") as f64 / 1024.0);
    println!();
    println!("| simulated hour | records | compacted: log MiB | compacted: disk MiB | without: log MiB | without: disk MiB |");
    println!("|---|---|---|---|---|---|");
    for (h, (on_h, off_h)) in on_hours.iter().zip(&off_hours).enumerate() {
        if h % 3 == 2 || h == 0 {
            println!(
                "| {:02}:00 | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                h + 1,
                on_h.0,
                on_h.1,
                on_h.2,
                off_h.1,
                off_h.2
            );
        }
    }
    Ok(())
}
