//! Kafka benchmark: the gateway runs as a child process (release build, its own data directory);
//! a librdkafka producer writes `--records` records of `--value-bytes` bytes with acks=all, then
//! a librdkafka consumer reads them all back. Reports records/s and MB/s of both phases, the
//! gateway's peak RSS, and the machine's own disk limits measured in the same run, as a Markdown
//! table for BENCHMARKS.md.
//!
//! `cargo build --release -p tributary-tests && target/release/kafka-bench [--dir DIR]`

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tributary_tests::{cpu_seconds, fsync_rate, rdkafka_bench, sequential_write, status_kib, BenchGateway, MIB};

#[derive(Debug, Parser)]
struct Args {
    /// Directory on the disk to measure (a temporary directory is made inside it).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    #[arg(long, default_value_t = 3_000_000)]
    records: u64,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// librdkafka compression.type for the producer.
    #[arg(long, default_value = "none")]
    compression: String,
    /// The gateway's redb page cache (storage.cache_size_bytes) in MiB; default: the gateway's.
    #[arg(long)]
    cache_mib: Option<u64>,
    /// The gateway binary (default: `tributary-under-test` next to this program).
    #[arg(long)]
    gateway: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let fsyncs = fsync_rate(tmp.path(), Duration::from_secs(3))?;
    let seq_bw = sequential_write(tmp.path(), 512 << 20)?;
    eprintln!("machine: {fsyncs:.0} fsync/s, sequential write {:.0} MiB/s", seq_bw / MIB);

    let gw = BenchGateway::start(
        args.gateway.as_deref(),
        tmp.path(),
        &args.cache_mib.map_or_else(String::new, |m| format!("cache_size_bytes = {}\n", m << 20)),
        &format!("[topic_defaults]\npartitions = {}\nretention_ms = 86400000\n", args.partitions),
    )?;
    let (addr, pid) = (gw.kafka.clone(), gw.pid.clone());
    let result = run(&args, &addr, &pid);
    let peak_kib = gw.peak_rss_kib();
    drop(gw);
    let Phases { produce_secs, consume_secs, consumed_bytes, produce_note, consume_note } = result?;

    let n = args.records as f64;
    let payload_mb = n * args.value_bytes as f64 / 1e6;
    println!("| measurement | result |");
    println!("|---|---|");
    println!("| machine: fsync rate (4 KiB write + fdatasync) | {fsyncs:.0} /s |");
    println!("| machine: sequential write (512 MiB + fsync) | {:.0} MiB/s |", seq_bw / MIB);
    println!(
        "| produce: {} x {} B records, acks=all, compression {}, {} partition(s), 1 librdkafka producer | **{:.0} records/s**, {:.1} MB/s of values ({:.0}% of sequential write bandwidth); {produce_note} |",
        args.records,
        args.value_bytes,
        args.compression,
        args.partitions,
        n / produce_secs,
        payload_mb / produce_secs,
        payload_mb * 1e6 / produce_secs / seq_bw * 100.0
    );
    println!(
        "| consume: the same records, 1 librdkafka consumer from the beginning | **{:.0} records/s**, {:.1} MB/s of values; {consume_note} |",
        n / consume_secs,
        consumed_bytes as f64 / 1e6 / consume_secs
    );
    println!("| gateway peak RSS (VmHWM) over the run | **{:.1} MiB** |", peak_kib as f64 / 1024.0);
    Ok(())
}

struct Phases {
    produce_secs: f64,
    consume_secs: f64,
    consumed_bytes: u64,
    produce_note: String,
    consume_note: String,
}

fn run(args: &Args, addr: &str, pid: &str) -> anyhow::Result<Phases> {
    let topic = "bench";
    let mut rss_max_kib = 0u64;
    let cpu0 = cpu_seconds(pid);
    let produced =
        rdkafka_bench::produce(addr, topic, args.records, args.value_bytes, &args.compression, None, || {
            rss_max_kib = rss_max_kib.max(status_kib(pid, "VmRSS:"));
        })?;
    let produce_cpu = cpu_seconds(pid) - cpu0;
    let produce_rss = std::mem::take(&mut rss_max_kib);
    let cpu0 = cpu_seconds(pid);
    // The warm-up record is in the topic too.
    let consumed = rdkafka_bench::consume(addr, topic, args.partitions, args.records + 1, || {
        rss_max_kib = rss_max_kib.max(status_kib(pid, "VmRSS:"));
    })?;
    let consume_cpu = cpu_seconds(pid) - cpu0;
    let (produce_secs, consume_secs) = (produced.secs, consumed.secs);
    Ok(Phases {
        produce_secs,
        consume_secs,
        consumed_bytes: consumed.bytes,
        produce_note: format!(
            "gateway CPU {:.0}% of one core, RSS sampled up to {:.1} MiB",
            produce_cpu / produce_secs * 100.0,
            produce_rss as f64 / 1024.0
        ),
        consume_note: format!(
            "gateway CPU {:.0}% of one core, RSS sampled up to {:.1} MiB",
            consume_cpu / consume_secs * 100.0,
            rss_max_kib as f64 / 1024.0
        ),
    })
}
