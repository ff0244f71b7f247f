//! `kafka-vs`: Tributary's Kafka listener beside one Apache Kafka broker on the same machine and
//! disk, driven by the same client, Kafka's own `kafka-producer-perf-test` (then
//! `kafka-consumer-perf-test`), `acks=all`. Kafka runs twice per case: with its defaults
//! (acknowledged from the page cache) and on a topic with `flush.messages=1` (an fsync per
//! append, durable on one node like Tributary, which acknowledges after its fsync). Prints a
//! markdown table: records/s, MB/s, p50/p99 latency, broker CPU seconds and RSS. The machine's
//! fsync rate and write bandwidth are measured in the same run.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tributary_tests::kafka_cluster::{KafkaCluster, KafkaJars, KafkaOptions};
use tributary_tests::{cpu_seconds, fsync_rate, sequential_write, status_kib, BenchGateway, MIB};

#[derive(Debug, Parser)]
#[command(about = "Tributary vs Apache Kafka with kafka-producer-perf-test / kafka-consumer-perf-test")]
struct Args {
    /// Directory on the disk under test (both brokers' data go there).
    #[arg(long)]
    dir: PathBuf,
    /// The gateway binary (a release build: `cargo build --release -p tributary-gateway`).
    #[arg(long)]
    gateway: PathBuf,
    /// Records per run of 100 bytes (runs of 1 KiB send a quarter as many).
    #[arg(long, default_value_t = 300_000)]
    records: u64,
    /// Heap of the Kafka broker.
    #[arg(long, default_value_t = 512)]
    kafka_heap_mb: u32,
}

#[derive(Debug, Default)]
struct Run {
    records_s: f64,
    mb_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    consume_records_s: f64,
    cpu_s: f64,
    rss_mib: f64,
}

/// `N records sent, R records/sec (M MB/sec), A ms avg latency, X ms max latency, P ms 50th, Q ms 95th, S ms 99th, ...`
fn parse_producer(out: &str) -> anyhow::Result<(f64, f64, f64, f64)> {
    let line = out.lines().rev().find(|l| l.contains("records sent")).context("no summary line")?;
    let nums: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|s| !s.is_empty() && *s != ".")
        .filter_map(|s| s.parse().ok())
        .collect();
    // 0 records, 1 records/s, 2 MB/s, 3 avg, 4 max, 5 p50, 6 p95, 7 p99, ...
    if nums.len() < 8 {
        bail!("unexpected summary: {line}");
    }
    Ok((nums[1], nums[2], nums[5], nums[7]))
}

/// The CSV line of kafka-consumer-perf-test: column 6 is nMsg.sec.
fn parse_consumer(out: &str) -> anyhow::Result<f64> {
    let line = out.lines().last().context("no output")?;
    let col = line.split(',').nth(5).context("no nMsg.sec column")?;
    Ok(col.trim().parse()?)
}

fn tool(jars: &KafkaJars, heap: u32, class: &str, args: &[String]) -> anyhow::Result<String> {
    let out =
        jars.java(heap).arg(class).args(args).stdin(Stdio::null()).output().with_context(|| format!("run {class}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{class}: {}\n{text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(text)
}

/// One run: a new topic with `partitions` and `configs`, `records` records of `size` bytes.
#[derive(Debug)]
struct Case<'a> {
    topic: String,
    partitions: u32,
    size: usize,
    records: u64,
    configs: &'a [&'a str],
}

/// Produces then consumes `case` on the broker at `bootstrap` (process `pid`).
fn run_case(jars: &KafkaJars, bootstrap: &str, pid: &str, case: &Case<'_>) -> anyhow::Result<Run> {
    let Case { topic, partitions, size, records, configs: topic_configs } = case;
    let topic = topic.as_str();
    let mut create: Vec<String> = ["--bootstrap-server", bootstrap, "--create", "--topic", topic, "--partitions"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    create.push(partitions.to_string());
    for c in topic_configs.iter() {
        create.push("--config".into());
        create.push(c.to_string());
    }
    tool(jars, 128, "org.apache.kafka.tools.TopicCommand", &create)?;
    let cpu0 = cpu_seconds(pid);
    let produced = tool(
        jars,
        512,
        "org.apache.kafka.tools.ProducerPerformance",
        &[
            "--topic".into(),
            topic.into(),
            "--num-records".into(),
            records.to_string(),
            "--record-size".into(),
            size.to_string(),
            "--throughput".into(),
            "-1".into(),
            "--producer-props".into(),
            format!("bootstrap.servers={bootstrap}"),
            "acks=all".into(),
        ],
    )?;
    let cpu = cpu_seconds(pid) - cpu0;
    let rss_mib = status_kib(pid, "VmRSS:") as f64 / 1024.0;
    let (records_s, mb_s, p50_ms, p99_ms) = parse_producer(&produced)?;
    let consumed = tool(
        jars,
        512,
        "org.apache.kafka.tools.ConsumerPerformance",
        &[
            "--bootstrap-server".into(),
            bootstrap.into(),
            "--topic".into(),
            topic.into(),
            "--messages".into(),
            records.to_string(),
            "--timeout".into(),
            "60000".into(),
        ],
    )?;
    let consume_records_s = parse_consumer(&consumed)?;
    Ok(Run { records_s, mb_s, p50_ms, p99_ms, consume_records_s, cpu_s: cpu, rss_mib })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let jars = KafkaJars::locate()?;
    let fsyncs = fsync_rate(&args.dir, Duration::from_secs(3))?;
    let write = sequential_write(&args.dir, 512 << 20)? / MIB;
    println!("machine: {fsyncs:.0} fsync/s (4 KiB), {write:.0} MiB/s sequential write + fsync, {} cores", num_cpus());

    let cases: Vec<(u32, usize)> = vec![(1, 100), (6, 100), (1, 1024), (6, 1024)];
    let mut rows = Vec::new();
    {
        let gw_dir = tempfile::tempdir_in(&args.dir)?;
        let gw = BenchGateway::start(Some(&args.gateway), gw_dir.path(), "", "")?;
        for (p, size) in &cases {
            let n = if *size > 100 { args.records / 4 } else { args.records };
            let case =
                Case { topic: format!("trib-{p}-{size}"), partitions: *p, size: *size, records: n, configs: &[] };
            let run = run_case(&jars, &gw.kafka, &gw.pid, &case)?;
            rows.push(("Tributary (ack after fsync)", *p, *size, run));
        }
    }
    let opts = KafkaOptions {
        heap_mb: args.kafka_heap_mb,
        light_jvm: false,
        parent_dir: Some(args.dir.clone()),
        ..KafkaOptions::default()
    };
    let kafka = KafkaCluster::start(opts)?;
    let pid = kafka.pid(1).context("kafka pid")?.to_string();
    for (label, configs) in
        [("Kafka, defaults (page cache)", vec![]), ("Kafka, flush.messages=1", vec!["flush.messages=1"])]
    {
        for (p, size) in &cases {
            let n = if *size > 100 { args.records / 4 } else { args.records };
            let topic = format!("kafka-{}-{p}-{size}", configs.len());
            let case = Case { topic, partitions: *p, size: *size, records: n, configs: &configs };
            let run = run_case(&jars, &kafka.bootstrap(), &pid, &case)?;
            rows.push((label, *p, *size, run));
        }
    }
    kafka.stop()?;

    println!("| broker | partitions | record | produce records/s | MB/s | p50 ms | p99 ms | consume records/s | broker CPU s (produce) | broker RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (label, p, size, r) in &rows {
        println!(
            "| {label} | {p} | {size} B | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |",
            r.records_s, r.mb_s, r.p50_ms, r.p99_ms, r.consume_records_s, r.cpu_s, r.rss_mib
        );
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
