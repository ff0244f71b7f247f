//! Consumer-group benchmark: the gateway runs as a child process (release build, its own data
//! directory), librdkafka consumers form groups against it. Measures
//!
//! 1. rebalance time: a group of 3 members on a 12-partition topic; a 4th member subscribes,
//!    and the time until all 4 hold their new partitions (the last member's assignment callback)
//!    is taken; the 4th then closes (LeaveGroup) and the time until the 3 hold all 12 partitions
//!    again is taken too. Median of `--runs` joins and leaves.
//! 2. group consume throughput: `--records` records of `--value-bytes` bytes produced with
//!    acks=all into a 6-partition topic, then read by a group of 3 members from subscribe to the
//!    last record.
//!
//! Prints a Markdown table like kafka-bench, and the librdkafka settings used.
//!
//! `cargo build --release -p tributary-tests --bin group-bench && target/release/group-bench [--dir DIR]`

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, Message};
use tributary_tests::rdkafka_bench::send_waiting;
use tributary_tests::{cpu_seconds, status_kib, BenchGateway};

#[derive(Debug, Parser)]
struct Args {
    /// Directory for the gateway's data (a temporary directory is made inside it).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Joins (and leaves) of the 4th member measured.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Partitions of the rebalance topic.
    #[arg(long, default_value_t = 12)]
    rebalance_partitions: i32,
    #[arg(long, default_value_t = 3_000_000)]
    records: u64,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Partitions of the throughput topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Members of the throughput group.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// session.timeout.ms of every member (the gateway's default minimum is 6000).
    #[arg(long, default_value_t = 6000)]
    session_timeout_ms: u32,
    /// heartbeat.interval.ms of every member: how soon a member hears of a rebalance.
    #[arg(long, default_value_t = 100)]
    heartbeat_interval_ms: u32,
    /// The gateway binary (default: `tributary-under-test` next to this program).
    #[arg(long)]
    gateway: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let gw =
        BenchGateway::start(args.gateway.as_deref(), tmp.path(), "", "[topic_defaults]\nretention_ms = 86400000\n")?;
    let (addr, pid) = (gw.kafka.clone(), gw.pid.clone());
    let result = run(&args, &addr, &pid);
    let peak_kib = gw.peak_rss_kib();
    drop(gw);
    let r = result?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let n = args.records as f64;
    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| rebalance: a 4th member joins a stable group of 3 ({} partitions); subscribe until all 4 hold their partitions, {} runs | **median {:.0} ms** (min {:.0}, max {:.0}) |",
        args.rebalance_partitions,
        r.joins.len(),
        ms(median(&r.joins)),
        ms(r.joins[0]),
        ms(r.joins[r.joins.len() - 1])
    );
    println!(
        "| rebalance: the 4th member closes (LeaveGroup); close until the 3 hold all {} partitions, {} runs | **median {:.0} ms** (min {:.0}, max {:.0}) |",
        args.rebalance_partitions,
        r.leaves.len(),
        ms(median(&r.leaves)),
        ms(r.leaves[0]),
        ms(r.leaves[r.leaves.len() - 1])
    );
    println!(
        "| produce (setup): {} x {} B records, acks=all, {} partitions, 1 librdkafka producer | {:.0} records/s |",
        args.records,
        args.value_bytes,
        args.partitions,
        n / r.produce_secs
    );
    println!(
        "| group consume: {} members of one group, {} partitions, from subscribe to the last record | **{:.0} records/s**, {:.1} MB/s of values; {} |",
        args.members,
        args.partitions,
        n / r.consume_secs,
        r.consumed_bytes as f64 / 1e6 / r.consume_secs,
        r.consume_note
    );
    println!("| gateway peak RSS (VmHWM) over the run | **{:.1} MiB** |", peak_kib as f64 / 1024.0);
    println!();
    println!(
        "librdkafka {} settings of every member: {}",
        rdkafka::util::get_rdkafka_version().1,
        member_settings(&args)
    );
    Ok(())
}

fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

struct Results {
    joins: Vec<Duration>,
    leaves: Vec<Duration>,
    produce_secs: f64,
    consume_secs: f64,
    consumed_bytes: u64,
    consume_note: String,
}

fn run(args: &Args, addr: &str, pid: &str) -> anyhow::Result<Results> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", addr).create().context("admin client")?;
    let topics = [
        NewTopic::new("rebalance", args.rebalance_partitions, TopicReplication::Fixed(1)),
        NewTopic::new("groupbench", args.partitions, TopicReplication::Fixed(1)),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for r in rt.block_on(admin.create_topics(&topics, &AdminOptions::new()))? {
        r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
    }
    let (mut joins, mut leaves) = rebalances(args, addr)?;
    joins.sort();
    leaves.sort();
    let produce_secs = produce(args, addr)?;
    let (consume_secs, consumed_bytes, consume_note) = group_consume(args, addr, pid)?;
    Ok(Results { joins, leaves, produce_secs, consume_secs, consumed_bytes, consume_note })
}

// ---- members ----------------------------------------------------------------------------------

/// The settings every member uses besides bootstrap.servers, group.id and client.id.
fn member_config_pairs(args: &Args) -> Vec<(&'static str, String)> {
    vec![
        ("session.timeout.ms", args.session_timeout_ms.to_string()),
        ("heartbeat.interval.ms", args.heartbeat_interval_ms.to_string()),
        ("auto.offset.reset", "earliest".into()),
        ("fetch.max.bytes", "8388608".into()),
        ("max.partition.fetch.bytes", "4194304".into()),
        // librdkafka stops fetching once this many messages wait in its queue (see kafka-bench).
        ("queued.min.messages", "2000000".into()),
        ("queued.max.messages.kbytes", "1048576".into()),
    ]
}

fn member_settings(args: &Args) -> String {
    let set: Vec<String> = member_config_pairs(args).iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{}; defaults kept: partition.assignment.strategy=range,roundrobin (eager rebalancing), enable.auto.commit=true (every 5 s and on revoke)",
        set.join(", ")
    )
}

fn member_config(args: &Args, addr: &str, group: &str, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", addr).set("group.id", group).set("client.id", client_id);
    for (k, v) in member_config_pairs(args) {
        c.set(k, v);
    }
    c
}

/// A member's assignment and when it last changed (set in the rebalance callback).
#[derive(Default)]
struct Assignment {
    partitions: Mutex<(BTreeSet<i32>, Option<Instant>)>,
}

impl ClientContext for Assignment {}

impl ConsumerContext for Assignment {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut a = self.partitions.lock().expect("lock");
        match rebalance {
            Rebalance::Assign(tpl) => {
                *a = (tpl.elements().iter().map(|e| e.partition()).collect(), Some(Instant::now()));
            }
            Rebalance::Revoke(_) => *a = (BTreeSet::new(), Some(Instant::now())),
            Rebalance::Error(e) => eprintln!("rebalance error: {e}"),
        }
    }
}

/// A member polling on its own thread until stopped (then closed, which leaves the group).
struct Member {
    assignment: Arc<Assignment>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Member {
    /// Creates and subscribes a member; returns it and the moment it subscribed.
    fn start(config: &ClientConfig, topic: &str) -> anyhow::Result<(Self, Instant)> {
        let consumer: BaseConsumer<Assignment> =
            config.create_with_context(Assignment::default()).context("consumer")?;
        let assignment = consumer.context().clone();
        let subscribed = Instant::now();
        consumer.subscribe(&[topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(Err(e)) = consumer.poll(Duration::from_millis(10)) {
                    eprintln!("member poll: {e}");
                }
            }
            // Dropping the consumer closes it: LeaveGroup.
            drop(consumer);
        });
        Ok((Self { assignment, stop, thread }, subscribed))
    }

    fn assignment(&self) -> (BTreeSet<i32>, Option<Instant>) {
        self.assignment.partitions.lock().expect("lock").clone()
    }

    /// Stops polling and closes the consumer (LeaveGroup); returns when it is closed.
    fn close(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("member thread");
    }
}

/// Waits until the members' assignments cover 0..partitions once, as evenly as possible; returns
/// the time the last of them was set.
fn wait_balanced(members: &[&Member], partitions: i32, what: &str) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (lo, hi) = (partitions as usize / members.len(), (partitions as usize).div_ceil(members.len()));
    loop {
        let states: Vec<_> = members.iter().map(|m| m.assignment()).collect();
        let mut all: Vec<i32> = states.iter().flat_map(|(a, _)| a.iter().copied()).collect();
        all.sort_unstable();
        if all == (0..partitions).collect::<Vec<_>>() && states.iter().all(|(a, _)| (lo..=hi).contains(&a.len())) {
            return states.iter().filter_map(|(_, at)| *at).max().context("assignment time");
        }
        if Instant::now() > deadline {
            bail!("{what}: no balanced assignment within 60 s: {:?}", states.iter().map(|s| &s.0).collect::<Vec<_>>());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn rebalances(args: &Args, addr: &str) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let p = args.rebalance_partitions;
    let mut base = Vec::new();
    for i in 0..3 {
        base.push(Member::start(&member_config(args, addr, "rebalance", &format!("base-{i}")), "rebalance")?.0);
    }
    wait_balanced(&base.iter().collect::<Vec<_>>(), p, "the first 3 members")?;
    let (mut joins, mut leaves) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let (fourth, subscribed) =
            Member::start(&member_config(args, addr, "rebalance", &format!("fourth-{run}")), "rebalance")?;
        let mut all: Vec<&Member> = base.iter().collect();
        all.push(&fourth);
        let done = wait_balanced(&all, p, "join")?;
        joins.push(done - subscribed);
        let closing = Instant::now();
        fourth.close();
        let done = wait_balanced(&base.iter().collect::<Vec<_>>(), p, "leave")?;
        leaves.push(done.saturating_duration_since(closing));
        eprintln!(
            "run {run}: join {:.0} ms, leave {:.0} ms",
            joins[run].as_secs_f64() * 1000.0,
            leaves[run].as_secs_f64() * 1000.0
        );
    }
    for m in base {
        m.close();
    }
    Ok((joins, leaves))
}

// ---- throughput -------------------------------------------------------------------------------

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

fn produce(args: &Args, addr: &str) -> anyhow::Result<f64> {
    let value = vec![b'v'; args.value_bytes];
    let producer: ThreadedProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "100000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "120000")
        .create_with_context(Deliveries::default())
        .context("producer")?;
    let start = Instant::now();
    for i in 0..args.records {
        let partition = (i % args.partitions as u64) as i32;
        send_waiting(&producer, BaseRecord::<(), _>::to("groupbench").partition(partition).payload(&value[..]))?;
    }
    producer.flush(Duration::from_secs(300))?;
    let secs = start.elapsed().as_secs_f64();
    let (ok, failed) =
        (producer.context().ok.load(Ordering::Relaxed), producer.context().failed.load(Ordering::Relaxed));
    if ok != args.records || failed != 0 {
        bail!("{ok} of {} records acknowledged, {failed} failed", args.records);
    }
    Ok(secs)
}

fn group_consume(args: &Args, addr: &str, pid: &str) -> anyhow::Result<(f64, u64, String)> {
    let parts = args.partitions as usize;
    // The next offset to read per partition (the highest seen + 1), over all members.
    let next: Arc<Vec<AtomicI64>> = Arc::new((0..parts).map(|_| AtomicI64::new(0)).collect());
    let per_partition = args.records as i64 / args.partitions as i64;
    let ends: Vec<i64> =
        (0..parts).map(|p| per_partition + i64::from((p as u64) < args.records % args.partitions as u64)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let consumers: Vec<BaseConsumer> = (0..args.members)
        .map(|i| member_config(args, addr, "groupbench", &format!("member-{i}")).create().context("consumer"))
        .collect::<anyhow::Result<_>>()?;
    let cpu0 = cpu_seconds(pid);
    let start = Instant::now();
    let mut threads = Vec::new();
    for c in consumers {
        c.subscribe(&["groupbench"])?;
        let (next, stop) = (next.clone(), stop.clone());
        threads.push(std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
            let (mut n, mut bytes) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match c.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        n += 1;
                        bytes += m.payload_len() as u64;
                        next[m.partition() as usize].fetch_max(m.offset() + 1, Ordering::Relaxed);
                    }
                    Some(Err(e)) => bail!("consume: {e}"),
                    None => {}
                }
            }
            Ok((n, bytes))
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut rss_max_kib = 0u64;
    while (0..parts).any(|p| next[p].load(Ordering::Relaxed) < ends[p]) {
        if Instant::now() > deadline || threads.iter().any(|t| t.is_finished()) {
            stop.store(true, Ordering::Relaxed);
            let reached: Vec<i64> = next.iter().map(|n| n.load(Ordering::Relaxed)).collect();
            for t in threads {
                t.join().expect("member thread")?;
            }
            bail!("group consume stalled at {reached:?} of {ends:?}");
        }
        rss_max_kib = rss_max_kib.max(status_kib(pid, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    stop.store(true, Ordering::Relaxed);
    let mut counts = Vec::new();
    let mut bytes = 0;
    for t in threads {
        let (n, b) = t.join().expect("member thread")?;
        counts.push(n);
        bytes += b;
    }
    let total: u64 = counts.iter().sum();
    let note = format!(
        "records per member {counts:?} ({} read twice across rebalances); gateway CPU {:.0}% of one core, RSS sampled up to {:.1} MiB",
        total.saturating_sub(args.records),
        cpu / secs * 100.0,
        rss_max_kib as f64 / 1024.0
    );
    Ok((secs, bytes, note))
}
