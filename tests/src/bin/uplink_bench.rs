//! `uplink-bench` (issue 19): a metered, constrained uplink after an outage. The smart-meter
//! workload's backlog of an outage (default: 200 meters, a reading every 10 s, one hour) is in a
//! gateway store; the mirror then drains it through the project's UDP shaping proxy
//! (`tributary_tests::link`, default 1 Mbit/s, 300 ms round trip, 2% loss; `tc netem` does not
//! work on this kernel) into the `tributary-cloud` receiver and a second Tributary standing in as
//! the central Kafka cluster, all in this process, while the fleet keeps reading in real time.
//!
//! Two runs over the same backlog:
//! - raw, fresh data first: `meters` mirrored with `mirror.fresh_topics = ["meters"]` under a
//!   bandwidth cap: the drain time, the age of fresh readings when they reach
//!   `{site}.meters.live` (p50, p99, max) while the backlog drains, wire bytes, and the records
//!   read back from both remote topics (duplicates, losses);
//! - aggregated: the same hour aggregated on the gateway into 15-minute windows
//!   (`[[aggregate]]`, `meters.15m`), only the derived topic mirrored: drain time, wire bytes,
//!   records read back.
//!
//! With `--latest-first` (issue 17), one run instead: the backlog in a compacted topic of
//! `mirror.latest_first_topics` (compaction held off on the gateway, so the whole history
//! drains): the time until every meter's latest reading is at the centre through the preview
//! `{site}.meters.live` (the compacted view, sent first) and through `{site}.meters` (behind the
//! history), and the time to the full drain.
//!
//! `cargo build -p tributary-tests --bin uplink-bench && $CARGO_TARGET_DIR/debug/uplink-bench --dir /var/tmp [--latest-first]`

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tributary_broker::aggregate::{run as aggregate, AggregateConfig, AggregateStats};
use tributary_broker::config::CleanupPolicy;
use tributary_broker::{Codec, Store, TopicConfig};
use tributary_sync::cloud::CloudServer;
use tributary_sync::gateway::MirrorStats;
use tributary_sync::{certs, CloudConfig, MirrorConfig};
use tributary_tests::link::{udp_proxy, Impairment};
use tributary_tests::workload::{caught_up, fleets, follow, ingest, open_store, percentile, TOPIC};
use tributary_tests::KafkaListener;

const SITE: &str = "uplink";
const DERIVED: &str = "meters.15m";

#[derive(Debug, Parser)]
struct Args {
    /// Directory on the disk to use (a temporary directory is made inside it).
    #[arg(long, default_value = "/var/tmp")]
    dir: std::path::PathBuf,
    /// Smart meters in the fleet.
    #[arg(long, default_value_t = 200)]
    meters: usize,
    /// Each meter's reading interval, ms.
    #[arg(long, default_value_t = 10_000)]
    interval_ms: i64,
    /// Length of the outage whose backlog is drained, minutes.
    #[arg(long, default_value_t = 60.0)]
    outage_minutes: f64,
    /// The link: rate per direction (bits/s), round trip (ms), random UDP loss (percent).
    #[arg(long, default_value_t = 1_000_000)]
    link_bits_per_s: u64,
    #[arg(long, default_value_t = 300)]
    rtt_ms: u32,
    #[arg(long, default_value_t = 2)]
    loss_percent: u32,
    /// `mirror.bandwidth_bytes_per_s_max` (below the link's rate: the cap the share applies to).
    #[arg(long, default_value_t = 100_000)]
    cap_bytes_per_s: u64,
    /// `mirror.fresh_age_ms` and `mirror.fresh_share_percent`.
    #[arg(long, default_value_t = 10_000)]
    fresh_age_ms: u64,
    #[arg(long, default_value_t = 25)]
    fresh_share_percent: u8,
    /// Run the latest-first scenario (a compacted topic of `mirror.latest_first_topics`) only.
    #[arg(long)]
    latest_first: bool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn until(stats: &MirrorStats, what: &str, secs: u64, cond: impl Fn(&MirrorStats) -> bool) -> anyhow::Result<()> {
    let mut rx = stats.subscribe();
    if tokio::time::timeout(Duration::from_secs(secs), rx.wait_for(|_| cond(stats))).await.is_err() {
        bail!("{what} not reached in {secs} s; last mirror error: {:?}", stats.last_error.lock().map(|e| e.clone()));
    }
    Ok(())
}

/// Every record of partition 0 of `topic`: (records, distinct `tributary.offset` values).
fn read_back(store: &Store, topic: &str) -> anyhow::Result<(u64, u64)> {
    if store.topic(topic).is_none() {
        return Ok((0, 0));
    }
    let hw = store.watermarks(topic, 0)?.high_watermark;
    let (mut offset, mut n, mut distinct) = (0, 0u64, HashSet::new());
    while offset < hw {
        let (records, next) = store.read_records_next(topic, 0, offset, 1 << 20)?;
        for r in records {
            n += 1;
            let o = r.headers.iter().find(|(k, _)| k == "tributary.offset").and_then(|(_, v)| v.clone());
            distinct.insert(o.context("provenance offset")?);
        }
        offset = next;
    }
    Ok((n, distinct.len() as u64))
}

/// The offsets of the latest record of every key of partition 0 of `topic`.
fn latest_offsets(store: &Store, topic: &str) -> anyhow::Result<HashSet<i64>> {
    let hw = store.watermarks(topic, 0)?.high_watermark;
    let (mut offset, mut latest) = (0, std::collections::HashMap::new());
    while offset < hw {
        let (records, next) = store.read_records_next(topic, 0, offset, 1 << 20)?;
        for r in records {
            latest.insert(r.key.context("keyed")?, r.offset);
        }
        offset = next;
    }
    Ok(latest.into_values().collect())
}

/// One drain: the mirror of `topics` over a fresh shaped path until `drained`, then stopped.
struct Drain {
    secs: f64,
    wire_up: u64,
    wire_down: u64,
    batch_bytes: u64,
    live_bytes: u64,
}

async fn start_mirror(
    cfg: MirrorConfig,
    store: &Store,
) -> (Arc<MirrorStats>, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let stats = Arc::new(MirrorStats::default());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let (store, stats) = (store.clone(), stats.clone());
        async move {
            if let Err(e) = tributary_sync::gateway::run(cfg, store, stats, Default::default(), async move {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("mirror: {e}");
            }
        }
    });
    (stats, stop, task)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tributary_tests::log_to_stderr();
    let tmp = tempfile::tempdir_in(&args.dir).context("temporary directory")?;
    let readings = (args.meters as f64 * args.outage_minutes * 60_000.0 / args.interval_ms as f64).round() as u64;
    let outage_ms = (args.outage_minutes * 60_000.0) as i64;
    let start_ms = now_ms() - outage_ms;

    // PKI, the central Tributary and the receiver.
    let pki = tmp.path().join("pki");
    let ca = certs::new_ca("uplink bench CA", 2)?;
    ca.write(&pki, "ca")?;
    certs::server_cert(&ca, &["localhost".to_string()], 2)?.write(&pki, "cloud")?;
    certs::site_cert(&ca, SITE, 2)?.write(&pki, "site")?;
    let central = open_store(&tmp.path().join("central"), 1, false).await?;
    let listener = KafkaListener::start(central.clone(), TopicConfig::default()).await?;
    let mut cloud_cfg = CloudConfig {
        listen: "127.0.0.1:0".parse()?,
        ca_file: pki.join("ca.pem"),
        cert_file: pki.join("cloud.pem"),
        key_file: pki.join("cloud.key"),
        ..CloudConfig::default()
    };
    cloud_cfg.kafka.bootstrap_servers = listener.addr.to_string();
    cloud_cfg.kafka.properties.insert("broker.address.family".into(), "v4".into());
    let server = CloudServer::bind(cloud_cfg).context("receiver")?;
    let cloud_addr = server.local_addr()?;
    let (cloud_stop, rx) = tokio::sync::oneshot::channel::<()>();
    let cloud_task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let mirror_cfg = |via: SocketAddr| MirrorConfig {
        enabled: true,
        cloud: via.to_string(),
        server_name: "localhost".into(),
        site: SITE.into(),
        ca_file: pki.join("ca.pem"),
        cert_file: pki.join("site.pem"),
        key_file: pki.join("site.key"),
        bandwidth_bytes_per_s_max: args.cap_bytes_per_s,
        read_bytes_max: 64 * 1024,
        reconnect_backoff_max_ms: 2_000,
        ..MirrorConfig::default()
    };
    let shaped = || Impairment::shaped(args.link_bits_per_s, args.rtt_ms, args.loss_percent);
    eprintln!(
        "backlog: {} meters, a reading every {} ms, {} min: {readings} readings",
        args.meters, args.interval_ms, args.outage_minutes
    );

    if args.latest_first {
        // A compacted topic whose history drains (compaction held off for the run).
        let gateway = open_store(&tmp.path().join("gateway-latest"), 1, false).await?;
        let compacted = TopicConfig {
            compression: Codec::Lz4,
            cleanup_policy: CleanupPolicy::Compact,
            min_compaction_lag_ms: 86_400_000,
            ..TopicConfig::default()
        };
        gateway.create_topic(TOPIC, 1, compacted).await?;
        let mut fleet = fleets(args.meters, 1, start_ms, args.interval_ms);
        ingest(&gateway, &mut fleet, readings, 500, 1).await?;
        let stored = gateway.partition_info(TOPIC, 0)?.logical_bytes;
        let latest = latest_offsets(&gateway, TOPIC)?;
        let imp = shaped();
        let via = udp_proxy(cloud_addr, imp.clone()).await?;
        let mut cfg = mirror_cfg(via);
        cfg.topics = vec![TOPIC.into()];
        cfg.latest_first_topics = vec![TOPIC.into()];
        cfg.fresh_age_ms = args.fresh_age_ms;
        cfg.fresh_share_percent = args.fresh_share_percent;
        cfg.validate("mirror")?;
        let stop = Arc::new(AtomicBool::new(false));
        let preview = follow(central.clone(), format!("{SITE}.{TOPIC}.live"), stop.clone());
        let ordered = follow(central.clone(), format!("{SITE}.{TOPIC}"), stop.clone());
        let began = Instant::now();
        let (stats, mirror_stop, mirror_task) = start_mirror(cfg, &gateway).await;
        until(&stats, "the backlog drained", 3_600, |_| caught_up(&gateway, 1)).await?;
        let drain_s = began.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let (preview, ordered) = (preview.await??, ordered.await??);
        let _ = mirror_stop.send(());
        mirror_task.await?;
        // When the last of the latest readings was at the centre, through each topic.
        let current = |seen: &[tributary_tests::workload::Seen]| {
            let at: Vec<_> = seen.iter().filter(|s| latest.contains(&s.offset)).map(|s| s.at).collect();
            (at.len(), at.iter().max().map_or(f64::NAN, |t| t.duration_since(began).as_secs_f64()))
        };
        let ((via_preview, preview_s), (via_ordered, ordered_s)) = (current(&preview), current(&ordered));
        let (ordered_n, ordered_distinct) = read_back(&central, &format!("{SITE}.{TOPIC}"))?;
        let (live_n, live_distinct) = read_back(&central, &format!("{SITE}.{TOPIC}.live"))?;
        let total = gateway.watermarks(TOPIC, 0)?.high_watermark;
        gateway.close().await?;
        let _ = cloud_stop.send(());
        cloud_task.await?;
        listener.stop().await?;
        let s = &stats;
        println!(
            "\n### uplink-bench --latest-first: {readings} readings ({} meters every {} s, {} min outage) in a compacted topic; {} Mbit/s, {} ms RTT, {}% loss, cap {} B/s, live share {}%\n",
            args.meters,
            args.interval_ms / 1000,
            args.outage_minutes,
            args.link_bits_per_s as f64 / 1e6,
            args.rtt_ms,
            args.loss_percent,
            args.cap_bytes_per_s,
            args.fresh_share_percent
        );
        println!("| stored backlog | every meter's latest reading at the centre: via `.live` (view) | via `{SITE}.meters` (in order) | full drain | view: records, keys, windows, bytes, time to current (gateway) | records in the centre (distinct / expected) |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {stored} B | {preview_s:.2} s ({via_preview} of {}) | {ordered_s:.1} s ({via_ordered}) | {drain_s:.1} s | {}, {}, {}, {} B, {} ms | `{SITE}.meters` {ordered_n} ({ordered_distinct} / {total}); `.live` {live_n} ({live_distinct}) |",
            latest.len(),
            s.latest_view_records_sent.load(Ordering::Relaxed),
            s.latest_view_keys.load(Ordering::Relaxed),
            s.latest_view_windows.load(Ordering::Relaxed),
            s.latest_view_bytes_sent.load(Ordering::Relaxed),
            s.latest_view_last_ms.load(Ordering::Relaxed),
        );
        return Ok(());
    }

    // (1) Raw, fresh data first.
    let gateway = open_store(&tmp.path().join("gateway-raw"), 1, true).await?;
    let mut fleet = fleets(args.meters, 1, start_ms, args.interval_ms);
    ingest(&gateway, &mut fleet, readings, 500, 1).await?;
    let backlog_end = gateway.watermarks(TOPIC, 0)?.high_watermark;
    let raw_stored = gateway.partition_info(TOPIC, 0)?.logical_bytes;
    let imp = shaped();
    let via = udp_proxy(cloud_addr, imp.clone()).await?;
    let mut cfg = mirror_cfg(via);
    cfg.topics = vec![TOPIC.into()];
    cfg.fresh_topics = vec![TOPIC.into()];
    cfg.fresh_age_ms = args.fresh_age_ms;
    cfg.fresh_share_percent = args.fresh_share_percent;
    cfg.validate("mirror")?;
    let stop = Arc::new(AtomicBool::new(false));
    let follower = follow(central.clone(), format!("{SITE}.{TOPIC}.live"), stop.clone());
    // The ordered topic too: when the same fresh readings got there behind the backlog.
    let ordered_follower = follow(central.clone(), format!("{SITE}.{TOPIC}"), stop.clone());
    // The fleet keeps reading in real time: every 250 ms the readings due, stamped now.
    let produced: Arc<Mutex<Vec<(i64, i64, Instant)>>> = Arc::default();
    let producer = {
        let (store, stop, produced) = (gateway.clone(), stop.clone(), produced.clone());
        let mut fleet = fleet.pop().context("the fleet")?;
        let per_tick = ((args.meters as f64 * 250.0 / args.interval_ms as f64).round() as usize).max(1);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let batch: Vec<_> = (0..per_tick)
                    .map(|_| {
                        let mut r = fleet.next_reading();
                        r.timestamp_ms = Some(now_ms());
                        r
                    })
                    .collect();
                let out = store.append_records(TOPIC, 0, batch).await?;
                produced.lock().map_err(|_| anyhow::anyhow!("lock"))?.push((
                    out.base_offset,
                    out.last_offset,
                    Instant::now(),
                ));
            }
            anyhow::Ok(())
        })
    };
    let began = Instant::now();
    let (stats, mirror_stop, mirror_task) = start_mirror(cfg, &gateway).await;
    let age = args.fresh_age_ms as i64;
    until(&stats, "the backlog drained", 3_600, |s| {
        let lag = s.lag(&gateway);
        !lag.is_empty()
            && lag.iter().all(|l| l.mirrored >= backlog_end && (l.lag_records == 0 || l.oldest_unmirrored_age_ms < age))
    })
    .await?;
    let drained_at = Instant::now();
    let raw = Drain {
        secs: began.elapsed().as_secs_f64(),
        wire_up: imp.bytes().0,
        wire_down: imp.bytes().1,
        batch_bytes: stats.batch_bytes_sent.load(Ordering::Relaxed),
        live_bytes: stats.live_batch_bytes_sent.load(Ordering::Relaxed),
    };
    stop.store(true, Ordering::Relaxed);
    producer.await??;
    until(&stats, "the fresh readings mirrored", 600, |_| caught_up(&gateway, 1)).await?;
    let seen = follower.await??;
    let seen_ordered = ordered_follower.await??;
    let _ = mirror_stop.send(());
    mirror_task.await?;
    let produced = produced.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    // Fresh readings appended while the backlog drained (after the link came up).
    let during: HashSet<i64> =
        produced.iter().filter(|(_, _, at)| *at < drained_at).flat_map(|(first, last, _)| *first..=*last).collect();
    let mut ages: Vec<i64> = seen.iter().filter(|s| during.contains(&s.offset)).map(|s| s.age_ms).collect();
    ages.sort_unstable();
    let mut ordered_ages: Vec<i64> =
        seen_ordered.iter().filter(|s| during.contains(&s.offset)).map(|s| s.age_ms).collect();
    ordered_ages.sort_unstable();
    let total = gateway.watermarks(TOPIC, 0)?.high_watermark;
    let (ordered_n, ordered_distinct) = read_back(&central, &format!("{SITE}.{TOPIC}"))?;
    let (live_n, live_distinct) = read_back(&central, &format!("{SITE}.{TOPIC}.live"))?;
    let fresh_total: u64 = produced.iter().map(|(a, b, _)| (b - a + 1) as u64).sum();
    gateway.close().await?;

    // (2) Aggregated: the same hour, only the 15-minute windows mirrored.
    let gateway = open_store(&tmp.path().join("gateway-agg"), 1, true).await?;
    let mut fleet = fleets(args.meters, 1, start_ms, args.interval_ms);
    ingest(&gateway, &mut fleet, readings, 500, 1).await?;
    let lz4 = TopicConfig { compression: Codec::Lz4, ..TopicConfig::default() };
    let agg_cfg = AggregateConfig {
        source: TOPIC.into(),
        derived: DERIVED.into(),
        window_ms: 15 * 60_000,
        lateness_ms: 60_000,
        fields: ["import_kwh", "export_kwh", "power_factor", "freq_hz"].iter().map(|f| f.to_string()).collect(),
        ..AggregateConfig::default()
    };
    let agg_stats = Arc::new(AggregateStats::default());
    let (agg_stop, mut agg_rx) = tokio::sync::watch::channel(false);
    let agg_task = tokio::spawn(aggregate(agg_cfg, gateway.clone(), lz4, agg_stats.clone(), async move {
        let _ = agg_rx.wait_for(|s| *s).await;
    }));
    let deadline = Instant::now() + Duration::from_secs(600);
    while agg_stats.position_stored.load(Ordering::Relaxed) < readings {
        if Instant::now() > deadline {
            bail!("the aggregator did not read the hour in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = agg_stop.send(true);
    agg_task.await?;
    let derived_records = gateway.watermarks(DERIVED, 0)?.high_watermark;
    let derived_stored = gateway.partition_info(DERIVED, 0)?.logical_bytes;
    let imp = shaped();
    let via = udp_proxy(cloud_addr, imp.clone()).await?;
    let mut cfg = mirror_cfg(via);
    cfg.topics = vec![DERIVED.into()];
    let began = Instant::now();
    let (stats, mirror_stop, mirror_task) = start_mirror(cfg, &gateway).await;
    until(&stats, "the aggregates mirrored", 3_600, |_| {
        gateway.archived(DERIVED, 0).ok().flatten().unwrap_or(0) >= derived_records
    })
    .await?;
    let agg = Drain {
        secs: began.elapsed().as_secs_f64(),
        wire_up: imp.bytes().0,
        wire_down: imp.bytes().1,
        batch_bytes: stats.batch_bytes_sent.load(Ordering::Relaxed),
        live_bytes: 0,
    };
    let _ = mirror_stop.send(());
    mirror_task.await?;
    let (agg_n, agg_distinct) = read_back(&central, &format!("{SITE}.{DERIVED}"))?;
    gateway.close().await?;
    let _ = cloud_stop.send(());
    cloud_task.await?;
    listener.stop().await?;

    let link = format!(
        "{} Mbit/s, {} ms RTT, {}% loss, cap {} B/s",
        args.link_bits_per_s as f64 / 1e6,
        args.rtt_ms,
        args.loss_percent,
        args.cap_bytes_per_s
    );
    println!(
        "\n### uplink-bench: {readings} readings ({} meters every {} s, {} min outage); {link}\n",
        args.meters,
        args.interval_ms / 1000,
        args.outage_minutes
    );
    println!("| run | stored backlog | drain time | wire bytes up (down) | batch bytes sent | records in the centre (distinct source offsets / expected) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| raw, fresh first (`fresh_age_ms` {}, share {}%) | {raw_stored} B | {:.1} s | {} ({}) | {} (live {}) | `{SITE}.meters` {ordered_n} ({ordered_distinct} / {total}); `.live` {live_n} ({live_distinct}) |",
        args.fresh_age_ms, args.fresh_share_percent, raw.secs, raw.wire_up, raw.wire_down, raw.batch_bytes, raw.live_bytes
    );
    println!(
        "| aggregated (15 min windows only) | {derived_stored} B | {:.1} s | {} ({}) | {} | `{SITE}.{DERIVED}` {agg_n} ({agg_distinct} / {derived_records}) |",
        agg.secs, agg.wire_up, agg.wire_down, agg.batch_bytes
    );
    println!(
        "\nFresh readings while the backlog drained: {} appended ({} in all), {} reached `{SITE}.meters.live`; age at the centre p50 {} ms, p99 {} ms, max {} ms (the same readings in `{SITE}.meters`, behind the backlog: p50 {} ms, p99 {} ms). Wire bytes raw / aggregated: {:.1}x.",
        during.len(),
        fresh_total,
        ages.len(),
        percentile(&ages, 0.5),
        percentile(&ages, 0.99),
        ages.last().copied().unwrap_or_default(),
        percentile(&ordered_ages, 0.5),
        percentile(&ordered_ages, 0.99),
        raw.wire_up as f64 / agg.wire_up.max(1) as f64
    );
    Ok(())
}
