//! `kafka-vs`: Tributary's Kafka listener beside one Apache Kafka broker on the same machine and
//! disk, driven by the same two clients: Kafka's own `kafka-producer-perf-test` /
//! `kafka-consumer-perf-test` (the Java client) and a librdkafka producer / consumer
//! (`tributary_tests::rdkafka_bench`), `acks=all`. Kafka runs twice per case: with its defaults
//! (acknowledged from the page cache) and on a topic with `flush.messages=1` (an fsync per
//! append, durable on one node like Tributary, which acknowledges after its fsync). Each client
//! produces once as fast as it goes (records/s; its latencies there are its own queue) and once at
//! a fixed offered rate (ack latency p50/p99: perf-test's send-to-callback, librdkafka's
//! send-to-delivery-report, per record), then reads the full-speed topic back. Prints a markdown
//! table with broker CPU seconds and RSS; the machine's fsync rate and write bandwidth are
//! measured in the same run.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tributary_tests::kafka_cluster::{KafkaCluster, KafkaJars, KafkaOptions};
use tributary_tests::rdkafka_bench::{self, CONSUMER_SETTINGS, PRODUCER_SETTINGS};
use tributary_tests::{cpu_seconds, fsync_rate, sequential_write, status_kib, BenchGateway, MIB};

#[derive(Debug, Parser)]
#[command(about = "Tributary vs Apache Kafka with Kafka's perf tools and librdkafka")]
struct Args {
    /// Directory on the disk under test (both brokers' data go there).
    #[arg(long)]
    dir: PathBuf,
    /// The gateway binary (a release build: `cargo build --release -p tributary-gateway`).
    #[arg(long)]
    gateway: PathBuf,
    /// Records per full-speed run of 100 bytes (runs of 1 KiB send a quarter as many).
    #[arg(long, default_value_t = 300_000)]
    records: u64,
    /// Fixed offered rate of the latency runs with 100-byte records (records/s): below what every
    /// broker here sustains, Kafka with `flush.messages=1` included.
    #[arg(long, default_value_t = 5_000.0)]
    rate_100: f64,
    /// Fixed offered rate of the latency runs with 1 KiB records (records/s).
    #[arg(long, default_value_t = 1_000.0)]
    rate_1k: f64,
    /// Length of each fixed-rate run.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Heap of the Kafka broker.
    #[arg(long, default_value_t = 512)]
    kafka_heap_mb: u32,
    /// The brokers to run (a subset to look into one side; the table's ratios need both).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tributary,kafka")]
    brokers: Vec<Side>,
    /// The clients to run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "perf-test,librdkafka")]
    clients: Vec<Client>,
}

/// A broker of the comparison: the gateway, or Apache Kafka (run with its defaults and with
/// `flush.messages=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Side {
    Tributary,
    Kafka,
}

/// The client that drove a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Client {
    PerfTest,
    Librdkafka,
}

impl Client {
    fn label(self) -> &'static str {
        match self {
            Client::PerfTest => "perf-test (Java)",
            Client::Librdkafka => "librdkafka",
        }
    }
}

#[derive(Debug, Default)]
struct Run {
    records_s: f64,
    mb_s: f64,
    /// Latencies at full speed (the client's queue, mostly).
    p50_ms: f64,
    p99_ms: f64,
    /// The fixed-rate run: achieved records/s and ack latency.
    rate_records_s: f64,
    rate_p50_ms: f64,
    rate_p99_ms: f64,
    consume_records_s: f64,
    /// perf-test: its rate after the group join (`fetch.nMsg.sec`); librdkafka: none (assigned).
    consume_fetch_records_s: Option<f64>,
    cpu_produce_s: f64,
    cpu_consume_s: f64,
    rss_mib: f64,
}

/// `N records sent, R records/sec (M MB/sec), A ms avg latency, X ms max latency, P ms 50th, Q ms
/// 95th, S ms 99th, T ms 99.9th.`: records/s, MB/s, p50 ms and p99 ms, each found by its label
/// (the labels hold digits too: "50th", "99.9th").
fn parse_producer(out: &str) -> anyhow::Result<(f64, f64, f64, f64)> {
    let line = out.lines().rev().find(|l| l.contains("records sent")).context("no summary line")?;
    let field = |label: &str| -> anyhow::Result<f64> {
        line.split(',')
            .map(|part| part.trim().trim_end_matches('.'))
            .find_map(|part| {
                let words: Vec<&str> = part.split_whitespace().collect();
                let at = words.windows(label.split_whitespace().count()).position(|w| w.join(" ") == label)?;
                words.get(at.checked_sub(1)?)?.trim_start_matches('(').parse().ok()
            })
            .with_context(|| format!("no \"{label}\" in: {line}"))
    };
    Ok((field("records/sec")?, field("MB/sec)")?, field("ms 50th")?, field("ms 99th")?))
}

/// The CSV line of kafka-consumer-perf-test: `start.time, end.time, data.consumed.in.MB, MB.sec,
/// data.consumed.in.nMsg, nMsg.sec, rebalance.time.ms, fetch.time.ms, fetch.MB.sec,
/// fetch.nMsg.sec`: nMsg.sec (over the whole run, group join included) and fetch.nMsg.sec (after
/// the join).
fn parse_consumer(out: &str) -> anyhow::Result<(f64, f64)> {
    let line = out.lines().last().context("no output")?;
    let cols: Vec<&str> = line.split(',').map(str::trim).collect();
    if cols.len() < 10 {
        bail!("unexpected consumer line: {line}");
    }
    Ok((cols[5].parse()?, cols[9].parse()?))
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

/// A broker under test: where it listens, its process (for CPU and RSS) and the configs of the
/// topics made on it.
struct Broker<'a> {
    label: &'static str,
    /// Topic name prefix, unique per broker and topic configuration.
    prefix: &'static str,
    bootstrap: &'a str,
    pid: &'a str,
    configs: &'a [&'a str],
}

/// One case: `partitions` partitions, full-speed runs of `records` records of `size` bytes, and
/// fixed-rate runs of `rate` records/s for `rate_records` records.
#[derive(Debug, Clone, Copy)]
struct Case {
    partitions: u32,
    size: usize,
    records: u64,
    rate: f64,
    rate_records: u64,
}

fn create_topic(jars: &KafkaJars, broker: &Broker<'_>, topic: &str, partitions: u32) -> anyhow::Result<()> {
    let partitions = partitions.to_string();
    let mut args =
        vec!["--bootstrap-server", broker.bootstrap, "--create", "--topic", topic, "--partitions", &partitions];
    for c in broker.configs {
        args.extend(["--config", c]);
    }
    jars.tool("org.apache.kafka.tools.TopicCommand", &args)?;
    Ok(())
}

fn perf_producer(
    jars: &KafkaJars,
    bootstrap: &str,
    topic: &str,
    records: u64,
    size: usize,
    rate: Option<f64>,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let throughput = rate.map_or_else(|| "-1".to_string(), |r| format!("{r:.0}"));
    let out = tool(
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
            throughput,
            "--producer-props".into(),
            format!("bootstrap.servers={bootstrap}"),
            "acks=all".into(),
        ],
    )?;
    parse_producer(&out)
}

/// The Java client: kafka-producer-perf-test at full speed (CPU, RSS), at the fixed rate on its
/// own topic, then kafka-consumer-perf-test reading the full-speed topic (a consumer group).
fn perf_case(jars: &KafkaJars, broker: &Broker<'_>, case: Case) -> anyhow::Result<Run> {
    let Case { partitions, size, records, rate, rate_records } = case;
    let topic = format!("{}-perf-{partitions}-{size}", broker.prefix);
    let rate_topic = format!("{topic}-rate");
    create_topic(jars, broker, &topic, partitions)?;
    create_topic(jars, broker, &rate_topic, partitions)?;
    let cpu0 = cpu_seconds(broker.pid);
    let (records_s, mb_s, p50_ms, p99_ms) = perf_producer(jars, broker.bootstrap, &topic, records, size, None)?;
    let cpu_produce_s = cpu_seconds(broker.pid) - cpu0;
    let rss_mib = status_kib(broker.pid, "VmRSS:") as f64 / 1024.0;
    let (rate_records_s, _, rate_p50_ms, rate_p99_ms) =
        perf_producer(jars, broker.bootstrap, &rate_topic, rate_records, size, Some(rate))?;
    let cpu0 = cpu_seconds(broker.pid);
    let consumed = tool(
        jars,
        512,
        "org.apache.kafka.tools.ConsumerPerformance",
        &[
            "--bootstrap-server".into(),
            broker.bootstrap.into(),
            "--topic".into(),
            topic,
            "--messages".into(),
            records.to_string(),
            "--timeout".into(),
            "60000".into(),
        ],
    )?;
    let cpu_consume_s = cpu_seconds(broker.pid) - cpu0;
    let (consume_records_s, fetch_records_s) = parse_consumer(&consumed)?;
    Ok(Run {
        records_s,
        mb_s,
        p50_ms,
        p99_ms,
        rate_records_s,
        rate_p50_ms,
        rate_p99_ms,
        consume_records_s,
        consume_fetch_records_s: Some(fetch_records_s),
        cpu_produce_s,
        cpu_consume_s,
        rss_mib,
    })
}

/// librdkafka: the producer at full speed (CPU, RSS), at the fixed rate on its own topic, then
/// the consumer reading the full-speed topic (assigned, from the beginning).
fn librdkafka_case(jars: &KafkaJars, broker: &Broker<'_>, case: Case) -> anyhow::Result<Run> {
    let Case { partitions, size, records, rate, rate_records } = case;
    let topic = format!("{}-rdk-{partitions}-{size}", broker.prefix);
    let rate_topic = format!("{topic}-rate");
    create_topic(jars, broker, &topic, partitions)?;
    create_topic(jars, broker, &rate_topic, partitions)?;
    let cpu0 = cpu_seconds(broker.pid);
    let full = rdkafka_bench::produce(broker.bootstrap, &topic, records, size, "none", None, || {})?;
    let cpu_produce_s = cpu_seconds(broker.pid) - cpu0;
    let rss_mib = status_kib(broker.pid, "VmRSS:") as f64 / 1024.0;
    let fixed = rdkafka_bench::produce(broker.bootstrap, &rate_topic, rate_records, size, "none", Some(rate), || {})?;
    let cpu0 = cpu_seconds(broker.pid);
    // The warm-up record is in the topic too.
    let consumed = rdkafka_bench::consume(broker.bootstrap, &topic, partitions, records + 1, || {})?;
    let cpu_consume_s = cpu_seconds(broker.pid) - cpu0;
    Ok(Run {
        records_s: full.records_s(),
        mb_s: full.records_s() * size as f64 / 1e6,
        p50_ms: full.latency_ms(0.5),
        p99_ms: full.latency_ms(0.99),
        rate_records_s: fixed.records_s(),
        rate_p50_ms: fixed.latency_ms(0.5),
        rate_p99_ms: fixed.latency_ms(0.99),
        consume_records_s: consumed.records_s(),
        consume_fetch_records_s: None,
        cpu_produce_s,
        cpu_consume_s,
        rss_mib,
    })
}

type Row = (&'static str, Client, Case, Run);

/// Both clients over every case on one broker; the broker's peak RSS after them.
fn run_broker(
    jars: &KafkaJars,
    broker: &Broker<'_>,
    cases: &[Case],
    clients: &[Client],
    rows: &mut Vec<Row>,
) -> anyhow::Result<f64> {
    for case in cases {
        for &client in clients {
            eprintln!(
                "kafka-vs: {} / {} / {} partition(s) / {} B",
                broker.label,
                client.label(),
                case.partitions,
                case.size
            );
            let run = match client {
                Client::PerfTest => perf_case(jars, broker, *case)?,
                Client::Librdkafka => librdkafka_case(jars, broker, *case)?,
            };
            rows.push((broker.label, client, *case, run));
        }
    }
    Ok(status_kib(broker.pid, "VmHWM:") as f64 / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let jars = KafkaJars::locate()?;
    let fsyncs = fsync_rate(&args.dir, Duration::from_secs(3))?;
    let write = sequential_write(&args.dir, 512 << 20)? / MIB;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {fsyncs:.0} fsync/s (4 KiB), {write:.0} MiB/s sequential write + fsync, {} cores, load average at start {}",
        num_cpus(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let settings = |s: &[(&str, &str)]| s.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
    println!("librdkafka {} producer: {}", rdkafka::util::get_rdkafka_version().1, settings(PRODUCER_SETTINGS));
    println!("librdkafka consumer: {}", settings(CONSUMER_SETTINGS));

    let cases: Vec<Case> = [(1, 100), (6, 100), (1, 1024), (6, 1024)]
        .into_iter()
        .map(|(partitions, size)| {
            let (records, rate) =
                if size > 100 { (args.records / 4, args.rate_1k) } else { (args.records, args.rate_100) };
            Case { partitions, size, records, rate, rate_records: (rate * args.latency_secs as f64) as u64 }
        })
        .collect();
    let mut rows = Vec::new();
    let mut peaks = Vec::new();
    if args.brokers.contains(&Side::Tributary) {
        let gw_dir = tempfile::tempdir_in(&args.dir)?;
        // The Kafka broker below runs with group.initial.rebalance.delay.ms=0 (the harness's
        // setting); the gateway's equivalent is set the same, so a perf-test consumer's group join
        // costs both the same.
        let gw = BenchGateway::start_with(
            Some(&args.gateway),
            gw_dir.path(),
            "",
            "group_initial_rebalance_delay_ms = 0\n",
            "",
            "",
        )?;
        let broker = Broker {
            label: "Tributary (ack after fsync)",
            prefix: "trib",
            bootstrap: &gw.kafka,
            pid: &gw.pid,
            configs: &[],
        };
        peaks.push((broker.label, run_broker(&jars, &broker, &cases, &args.clients, &mut rows)?));
    }
    if args.brokers.contains(&Side::Kafka) {
        run_kafka(&args, &jars, &cases, &mut rows, &mut peaks)?;
    }
    print_table(&rows, &peaks);
    Ok(())
}

/// One Apache Kafka broker, run with its defaults and then with `flush.messages=1` on its topics.
fn run_kafka(
    args: &Args,
    jars: &KafkaJars,
    cases: &[Case],
    rows: &mut Vec<Row>,
    peaks: &mut Vec<(&'static str, f64)>,
) -> anyhow::Result<()> {
    let opts = KafkaOptions {
        heap_mb: args.kafka_heap_mb,
        light_jvm: false,
        parent_dir: Some(args.dir.clone()),
        ..KafkaOptions::default()
    };
    let kafka = KafkaCluster::start(opts)?;
    let pid = kafka.pid(1).context("kafka pid")?.to_string();
    let bootstrap = kafka.bootstrap();
    for (label, prefix, configs) in [
        ("Kafka, defaults (page cache)", "kafka", &[][..]),
        ("Kafka, flush.messages=1", "kafka-flush", &["flush.messages=1"][..]),
    ] {
        let broker = Broker { label, prefix, bootstrap: &bootstrap, pid: &pid, configs };
        peaks.push((label, run_broker(jars, &broker, cases, &args.clients, rows)?));
    }
    kafka.stop()
}

fn print_table(rows: &[Row], peaks: &[(&'static str, f64)]) {
    println!("| broker | client | partitions | record | produce records/s | MB/s | p50 ms | p99 ms | fixed rate: records/s | ack p50 ms | ack p99 ms | consume records/s | consume after group join | broker CPU s produce / consume | broker RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (label, client, case, r) in rows {
        println!(
            "| {label} | {} | {} | {} B | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} of {:.0} | {:.1} | {:.1} | {:.0} | {} | {:.1} / {:.1} | {:.0} |",
            client.label(),
            case.partitions,
            case.size,
            r.records_s,
            r.mb_s,
            r.p50_ms,
            r.p99_ms,
            r.rate_records_s,
            case.rate,
            r.rate_p50_ms,
            r.rate_p99_ms,
            r.consume_records_s,
            r.consume_fetch_records_s.map_or_else(|| "(assigned, no group)".to_string(), |f| format!("{f:.0}")),
            r.cpu_produce_s,
            r.cpu_consume_s,
            r.rss_mib
        );
    }
    for (label, peak) in peaks {
        println!("peak RSS (VmHWM) after all its runs: {label}: {peak:.0} MiB");
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as Kafka 4.1.1's tools print them (captured from a run against the gateway).
    #[test]
    fn parses_the_perf_tools_summaries() {
        let produced = "50000 records sent, 13583.3 records/sec (13.26 MB/sec), 1237.43 ms avg latency, \
                        1629.00 ms max latency, 1274 ms 50th, 1597 ms 95th, 1621 ms 99th, 1628 ms 99.9th.\n";
        assert_eq!(parse_producer(produced).expect("parse"), (13583.3, 13.26, 1274.0, 1621.0));
        let consumed = "start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, \
                        rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec\n\
                        2026-12-05 21:43:29:278, 2026-12-05 21:43:33:647, 48.8281, 11.1760, 50000, 11444.2664, \
                        4002, 367, 133.0467, 136239.7820\n";
        assert_eq!(parse_consumer(consumed).expect("parse"), (11444.2664, 136239.7820));
        assert!(parse_consumer("a, b, c\n").is_err());
    }
}
