//! Kafka benchmark: the gateway runs as a child process (release build, its own data directory);
//! a librdkafka producer writes `--records` records of `--value-bytes` bytes with acks=all, then
//! a librdkafka consumer reads them all back. Reports records/s and MB/s of both phases, the
//! gateway's peak RSS, and the machine's own disk limits measured in the same run, as a Markdown
//! table for BENCHMARKS.md.
//!
//! `cargo build --release -p tributary-tests && target/release/kafka-bench [--dir DIR]`

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;
use tributary_tests::{cpu_seconds, fsync_rate, sequential_write, status_kib, BenchGateway, MIB};

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

#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
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
    let value = vec![b'v'; args.value_bytes];
    let producer: ThreadedProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("acks", "all")
        .set("compression.type", &args.compression)
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "100000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "120000")
        .create_with_context(Deliveries::default())
        .context("producer")?;
    // Warm up: the topic is auto-created, connections are up.
    producer.send(BaseRecord::<(), _>::to(topic).payload(&value[..])).map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(30))?;
    let deliveries = producer.context();
    let base = deliveries.ok.load(Ordering::Relaxed);
    let mut rss_max_kib = 0u64;
    let cpu0 = cpu_seconds(pid);
    let start = Instant::now();
    for i in 0..args.records {
        let mut record = BaseRecord::<(), _>::to(topic).payload(&value[..]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("produce: {e}"),
            }
        }
        if i % 100_000 == 0 {
            rss_max_kib = rss_max_kib.max(status_kib(pid, "VmRSS:"));
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let produce_secs = start.elapsed().as_secs_f64();
    let produce_cpu = cpu_seconds(pid) - cpu0;
    let produce_rss = rss_max_kib;
    rss_max_kib = 0;
    let ok = deliveries.ok.load(Ordering::Relaxed) - base;
    let failed = deliveries.failed.load(Ordering::Relaxed);
    if ok != args.records || failed != 0 {
        bail!("{ok} of {} records acknowledged, {failed} failed", args.records);
    }
    drop(producer);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", "bench")
        .set("enable.auto.commit", "false")
        .set("max.partition.fetch.bytes", "4194304")
        .set("fetch.max.bytes", "8388608")
        // librdkafka stops fetching once this many messages wait in its queue and rechecks only
        // about once a second; a deep queue keeps it fetching (client memory, not the broker's).
        .set("queued.min.messages", "2000000")
        .set("queued.max.messages.kbytes", "1048576")
        .create()
        .context("consumer")?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..args.partitions as i32 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let total = args.records + 1;
    let mut bytes = 0u64;
    let cpu0 = cpu_seconds(pid);
    let start = Instant::now();
    let mut n = 0u64;
    while n < total {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(m)) => {
                n += 1;
                bytes += m.payload_len() as u64;
                if n % 100_000 == 0 {
                    rss_max_kib = rss_max_kib.max(status_kib(pid, "VmRSS:"));
                }
            }
            Some(Err(e)) => bail!("consume: {e}"),
            None => bail!("consume stalled at {n} of {total}"),
        }
    }
    let consume_secs = start.elapsed().as_secs_f64();
    let consume_cpu = cpu_seconds(pid) - cpu0;
    Ok(Phases {
        produce_secs,
        consume_secs,
        consumed_bytes: bytes,
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
