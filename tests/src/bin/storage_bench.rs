//! Storage benchmark: measures this machine's fsync rate and sequential write bandwidth, then the
//! store's (a) durable single-record appends from 256 concurrent appenders, (b) ready batches of
//! 1,000 x 100-byte records, (c) sequential reads; prints a Markdown table for BENCHMARKS.md.
//!
//! `cargo run --release -p tributary-tests --bin storage-bench -- [--dir DIR] [--seconds N]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use tributary_broker::storage::batch::{encode_batch, BatchHeader, NewRecord};
use tributary_broker::{Codec, StorageConfig, Store, TimestampKind, TopicConfig};
use tributary_tests::{fsync_rate, sequential_write, status_kib, MIB};

#[derive(Debug, Parser)]
struct Args {
    /// Directory on the disk to measure (a temporary directory is made inside it).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Seconds per append phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent appenders in phase (a).
    #[arg(long, default_value_t = 256)]
    appenders: usize,
    /// Concurrent appenders in phase (b) (a Kafka producer keeps up to 5 batches in flight per
    /// connection, so 32 is a handful of producers).
    #[arg(long, default_value_t = 32)]
    batch_appenders: usize,
    /// `storage.zero_ahead_bytes` (default: the store's; 0 turns the zeros ahead off).
    #[arg(long)]
    zero_ahead_bytes: Option<u64>,
    /// `storage.journal_bytes` (default: the store's; 0 turns the commit journal off).
    #[arg(long)]
    journal_bytes: Option<u64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let phase = Duration::from_secs(args.seconds);

    let fsyncs = fsync_rate(tmp.path(), Duration::from_secs(3))?;
    let seq_bw = sequential_write(tmp.path(), 512 << 20)?;
    eprintln!("machine: {fsyncs:.0} fsync/s, sequential write {:.0} MiB/s", seq_bw / MIB);

    let defaults = StorageConfig::default();
    let cfg = StorageConfig {
        data_dir: tmp.path().join("store"),
        max_bytes: 64 << 30,
        zero_ahead_bytes: args.zero_ahead_bytes.unwrap_or(defaults.zero_ahead_bytes),
        journal_bytes: args.journal_bytes.unwrap_or(defaults.journal_bytes),
        ..defaults
    };
    println!("storage.zero_ahead_bytes = {}, storage.journal_bytes = {}", cfg.zero_ahead_bytes, cfg.journal_bytes);
    let (store, _) = Store::open(cfg).context("open store")?;
    let topic = TopicConfig { retention_ms: None, ..TopicConfig::default() };
    store.create_topic("single", 4, topic.clone()).await?;
    store.create_topic("batches", 4, TopicConfig { compression: Codec::None, ..topic }).await?;

    // (a) 256 concurrent appenders, one 100-byte record each time, each waiting for durability.
    let before = store.stats();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.appenders {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let value = Bytes::from(vec![b'x'; 100]);
            while start.elapsed() < phase {
                let key = Bytes::from(format!("meter-{i:05}"));
                s.append_records("single", (i % 4) as i32, vec![NewRecord::new(Some(key), value.clone())]).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut a_records = 0u64;
    for t in tasks {
        a_records += t.await??;
    }
    let a_secs = start.elapsed().as_secs_f64();
    let after = store.stats();
    let a_commits = after.commits - before.commits;
    let a_commit_ms = (after.commit_micros_total - before.commit_micros_total) as f64 / a_commits as f64 / 1000.0;

    // (b) ready client batches of 1,000 x 100-byte records (uncompressed), 8 appenders.
    let records: Vec<NewRecord> =
        (0..1000).map(|_| NewRecord::new(None::<Bytes>, Bytes::from(vec![b'y'; 100]))).collect();
    let stamped: Vec<_> = records.iter().map(|r| (r, 1_700_000_000_000)).collect();
    let mut one = Vec::new();
    encode_batch(&stamped, 0, Codec::None, TimestampKind::CreateTime, 0, &mut one)?;
    let batch = Bytes::from(one);
    let before = store.stats();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.batch_appenders {
        let s = store.clone();
        let b = batch.clone();
        let i = (i % 4) as i32;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < phase {
                s.append_batch("batches", i, b.clone()).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut b_batches = 0u64;
    for t in tasks {
        b_batches += t.await??;
    }
    let b_secs = start.elapsed().as_secs_f64();
    let after = store.stats();
    let b_bytes = b_batches * batch.len() as u64;
    let b_commits = after.commits - before.commits;

    // (c) sequential read of everything appended, whole batches as a Kafka fetch returns them.
    let start = Instant::now();
    let mut c_records = 0u64;
    let mut c_bytes = 0u64;
    for t in ["single", "batches"] {
        for p in 0..4 {
            let wm = store.watermarks(t, p)?;
            let mut off = wm.log_start_offset;
            while off < wm.high_watermark {
                let f = store.fetch(t, p, off, 1 << 20)?;
                let mut rest = &f.data[..];
                while !rest.is_empty() {
                    let h = BatchHeader::parse(rest)?;
                    c_records += h.record_count as u64;
                    rest = &rest[h.total_len()..];
                }
                c_bytes += f.data.len() as u64;
                off = f.next_offset;
            }
        }
    }
    let c_secs = start.elapsed().as_secs_f64();
    let disk = store.disk_usage_bytes()?;
    store.close().await?;

    println!("| measurement | result |");
    println!("|---|---|");
    println!("| machine: fsync rate (4 KiB write + fdatasync) | {fsyncs:.0} /s |");
    println!("| machine: sequential write (512 MiB + fsync) | {:.0} MiB/s |", seq_bw / MIB);
    println!(
        "| (a) {} appenders x single 100 B records, durable | **{:.0} records/s**; {a_commits} commits, {:.1} records/commit, {a_commit_ms:.2} ms/commit; {:.0} commits/s = {:.0}% of the fsync rate |",
        args.appenders,
        a_records as f64 / a_secs,
        a_records as f64 / a_commits as f64,
        a_commits as f64 / a_secs,
        a_commits as f64 / a_secs / fsyncs * 100.0
    );
    println!(
        "| (b) ready batches 1,000 x 100 B (uncompressed, {} B each), {} appenders | **{:.0} MiB/s = {:.0}% of sequential bandwidth**; {:.0} records/s; {:.1} batches/commit |",
        batch.len(),
        args.batch_appenders,
        b_bytes as f64 / b_secs / MIB,
        b_bytes as f64 / b_secs / seq_bw * 100.0,
        b_batches as f64 * 1000.0 / b_secs,
        b_batches as f64 / b_commits.max(1) as f64
    );
    println!(
        "| (c) sequential read (fetch whole batches, 1 MiB per fetch) | **{:.0} records/s**, {:.0} MiB/s |",
        c_records as f64 / c_secs,
        c_bytes as f64 / c_secs / MIB
    );
    println!(
        "| database file real disk use after the run | {:.0} MiB for {:.0} MiB appended |",
        disk as f64 / MIB,
        (after.appended_bytes) as f64 / MIB
    );
    println!("| peak RSS of the benchmark process | {:.1} MiB |", status_kib("self", "VmHWM:") as f64 / 1024.0);
    Ok(())
}
