//! `tributary mirror status`: the mirror's link, the backlog's drain rate and ETA per topic and in
//! total, per-partition lag and backfill progress, read from the running gateway's metrics
//! endpoint (the mirror's state lives in the daemon, not in the log). `tributary mirror backfill`:
//! a backfill request, appended over the Kafka listener to the gateway's `__mirror.backfill` log
//! topic, where the mirror reads it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::table::{emit, Format, Table};

#[derive(Debug, Subcommand)]
pub enum MirrorCommand {
    /// Link state, reconnects, bytes on the wire, the backlog's drain rate and ETA per topic and
    /// in total, and lag per partition.
    Status(StatusArgs),
    /// Send TOPIC's records from --from to --to (a topic the mirror keeps local, or sends only as
    /// aggregates) to the central cluster, into {site}.TOPIC, each once: the request is stored
    /// on the gateway; `tributary mirror status` shows its progress.
    Backfill(BackfillArgs),
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    conn: super::Connection,
    /// The topic.
    topic: String,
    /// From this time (record timestamps): ms since the epoch, or RFC 3339 in UTC
    /// (2026-12-05T14:00:00Z).
    #[arg(long)]
    from: String,
    /// Up to this time (exclusive), in the same forms.
    #[arg(long)]
    to: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The gateway's metrics endpoint ([metrics] listen), HOST:PORT.
    #[arg(long, env = "TRIBUTARY_METRICS", default_value = "127.0.0.1:9464")]
    metrics: String,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// JSON output for scripts instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct MirrorStatus {
    link_up: bool,
    reconnects: u64,
    batch_bytes_sent: u64,
    wire_bytes_sent: u64,
    gaps: u64,
    /// Fresh data first: live streams running, and the stored bytes they sent.
    live_streams: u64,
    live_batch_bytes_sent: u64,
    /// All topics together, then per topic: the drain over `mirror.drain_window_ms`.
    drain: DrainStatus,
    topics: BTreeMap<String, DrainStatus>,
    partitions: Vec<PartitionStatus>,
    /// Backfill requests and their progress.
    backfills: Vec<BackfillStatus>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct BackfillStatus {
    request: i64,
    topic: String,
    from_ms: i64,
    to_ms: i64,
    /// `accepted`, or `refused: why`.
    state: String,
    records: i64,
    sent: i64,
    /// Below what the centre held already: not sent.
    below: i64,
    /// Deleted by retention before it was sent: never sent.
    deleted: i64,
}

#[derive(Debug, Default, Clone, Serialize)]
struct DrainStatus {
    backlog_records: i64,
    backlog_bytes: u64,
    records_per_s: f64,
    shrink_records_per_s: f64,
    /// `None` while the backlog does not shrink.
    eta_s: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
struct PartitionStatus {
    topic: String,
    partition: i32,
    mirrored_offset: i64,
    lag_records: i64,
    lag_bytes: u64,
    oldest_unmirrored_age_s: f64,
}

/// One Prometheus sample line: name, labels, value.
fn parse_line(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, labels)) = series.split_once('{') else { return Some((series, BTreeMap::new(), value)) };
    let labels = labels.trim_end_matches('}').split("\",").filter_map(|kv| {
        let (k, v) = kv.split_once("=\"")?;
        Some((k, v.trim_end_matches('"')))
    });
    Some((name, labels.collect(), value))
}

fn parse(text: &str) -> Option<MirrorStatus> {
    let mut s = MirrorStatus::default();
    let mut found = false;
    let mut parts: BTreeMap<(String, i32), PartitionStatus> = BTreeMap::new();
    let mut drains: BTreeMap<String, DrainStatus> = BTreeMap::new();
    let mut backfills: BTreeMap<i64, BackfillStatus> = BTreeMap::new();
    for (name, labels, v) in text.lines().filter_map(parse_line) {
        let Some(metric) = name.strip_prefix("tributary_mirror_") else { continue };
        found = true;
        let key = || {
            let topic = labels.get("topic").copied().unwrap_or_default().to_string();
            let p = labels.get("partition").and_then(|p| p.parse().ok()).unwrap_or(0);
            (topic, p)
        };
        match metric {
            "link_up" => s.link_up = v > 0.0,
            "reconnects_total" => s.reconnects = v as u64,
            "batch_bytes_sent_total" => s.batch_bytes_sent = v as u64,
            "wire_bytes_sent_total" => s.wire_bytes_sent = v as u64,
            "gaps_total" => s.gaps = v as u64,
            "live_streams" => s.live_streams = v as u64,
            "live_batch_bytes_sent_total" => s.live_batch_bytes_sent = v as u64,
            "lag_records" => parts.entry(key()).or_default().lag_records = v as i64,
            "lag_bytes" => parts.entry(key()).or_default().lag_bytes = v as u64,
            "oldest_unmirrored_age_seconds" => parts.entry(key()).or_default().oldest_unmirrored_age_s = v,
            "mirrored_offset" => parts.entry(key()).or_default().mirrored_offset = v as i64,
            "backfill_records" | "backfill_sent_records" | "backfill_below_records" | "backfill_deleted_records" => {
                let id = labels.get("request").and_then(|r| r.parse().ok()).unwrap_or(-1);
                let label = |k: &str| labels.get(k).copied().unwrap_or_default().to_string();
                let b = backfills.entry(id).or_insert_with(|| BackfillStatus {
                    request: id,
                    topic: label("topic"),
                    from_ms: label("from_ms").parse().unwrap_or(0),
                    to_ms: label("to_ms").parse().unwrap_or(0),
                    state: label("state"),
                    ..BackfillStatus::default()
                });
                match metric {
                    "backfill_records" => b.records = v as i64,
                    "backfill_sent_records" => b.sent = v as i64,
                    "backfill_deleted_records" => b.deleted = v as i64,
                    _ => b.below = v as i64,
                }
            }
            "drain_records_per_second" | "drain_shrink_records_per_second" | "drain_eta_seconds" => {
                let d = match labels.get("topic") {
                    Some(topic) => drains.entry((*topic).to_string()).or_default(),
                    None => &mut s.drain,
                };
                match metric {
                    "drain_records_per_second" => d.records_per_s = v,
                    "drain_shrink_records_per_second" => d.shrink_records_per_s = v,
                    _ => d.eta_s = Some(v),
                }
            }
            _ => {}
        }
    }
    s.partitions = parts.into_iter().map(|((topic, partition), p)| PartitionStatus { topic, partition, ..p }).collect();
    for p in &s.partitions {
        for d in [&mut s.drain, drains.entry(p.topic.clone()).or_default()] {
            d.backlog_records += p.lag_records;
            d.backlog_bytes += p.lag_bytes;
        }
    }
    s.topics = drains;
    s.backfills = backfills.into_values().collect();
    found.then_some(s)
}

async fn scrape(addr: &str, timeout: Duration) -> anyhow::Result<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| anyhow::anyhow!("the gateway's metrics endpoint at {addr} did not answer in time"))?
        .with_context(|| {
            format!("cannot reach the gateway's metrics endpoint at {addr} — is `tributary serve` running with [metrics] enabled?")
        })?;
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP answer")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "metrics endpoint answered: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_string())
}

pub async fn run(command: MirrorCommand) -> anyhow::Result<()> {
    let args = match command {
        MirrorCommand::Status(args) => args,
        MirrorCommand::Backfill(args) => return backfill(args).await,
    };
    let body = scrape(&args.metrics, Duration::from_millis(args.timeout_ms)).await?;
    let status = parse(&body).context("mirroring is not enabled on this gateway ([mirror] enabled = false)")?;
    let format = if args.json { Format::Json } else { Format::Table };
    emit(format, &status, |s| {
        let mut out = format!(
            "link {}   reconnects {}   sent {} bytes (wire {} bytes)   gaps {}   live streams {} (sent {} bytes)\n\n",
            if s.link_up { "up" } else { "DOWN" },
            s.reconnects,
            s.batch_bytes_sent,
            s.wire_bytes_sent,
            s.gaps,
            s.live_streams,
            s.live_batch_bytes_sent,
        );
        let eta = |d: &DrainStatus| match (d.eta_s, d.backlog_records) {
            (Some(s), _) => format!("{:.0} s", s.ceil()),
            (None, 0) => "-".to_string(),
            (None, _) => "not draining".to_string(),
        };
        let mut t = Table::new(&["TOPIC", "BACKLOG", "BACKLOG BYTES", "RECORDS/S", "ETA"]);
        for (topic, d) in s.topics.iter().chain(std::iter::once((&"(all)".to_string(), &s.drain))) {
            t.row(vec![
                topic.clone(),
                d.backlog_records.to_string(),
                d.backlog_bytes.to_string(),
                format!("{:.1}", d.records_per_s),
                eta(d),
            ]);
        }
        out.push_str(&t.render());
        out.push('\n');
        let mut t = Table::new(&["TOPIC", "PARTITION", "MIRRORED", "LAG", "LAG BYTES", "OLDEST UNMIRRORED"]);
        for p in &s.partitions {
            t.row(vec![
                p.topic.clone(),
                p.partition.to_string(),
                p.mirrored_offset.to_string(),
                p.lag_records.to_string(),
                p.lag_bytes.to_string(),
                format!("{:.0} s", p.oldest_unmirrored_age_s),
            ]);
        }
        out.push_str(&t.render());
        if !s.backfills.is_empty() {
            let mut t = Table::new(&[
                "BACKFILL",
                "TOPIC",
                "FROM (MS)",
                "TO (MS)",
                "SENT",
                "RECORDS",
                "NOT SENT (BELOW)",
                "DELETED BEFORE SENT",
                "STATE",
            ]);
            for b in &s.backfills {
                t.row(vec![
                    b.request.to_string(),
                    b.topic.clone(),
                    b.from_ms.to_string(),
                    b.to_ms.to_string(),
                    b.sent.to_string(),
                    b.records.to_string(),
                    b.below.to_string(),
                    b.deleted.to_string(),
                    b.state.clone(),
                ]);
            }
            out.push('\n');
            out.push_str(&t.render());
        }
        out
    })
}

#[derive(Debug, Serialize)]
struct Requested {
    request: i64,
    topic: String,
    from_ms: i64,
    to_ms: i64,
}

async fn backfill(args: BackfillArgs) -> anyhow::Result<()> {
    use tributary_sync::backfill::{parse_time, Request, REQUESTS_TOPIC};
    let time = |flag: &str, s: &str| {
        parse_time(s).with_context(|| {
            format!("{flag} {s:?}: not a time (ms since the epoch, or RFC 3339 in UTC: 2026-12-05T14:00:00Z)")
        })
    };
    let (from_ms, to_ms) = (time("--from", &args.from)?, time("--to", &args.to)?);
    anyhow::ensure!(from_ms < to_ms, "--from must be before --to");
    let request = Request { topic: args.topic.clone(), from_ms, to_ms };
    let mut client = args.conn.connect().await?;
    client.topic(&args.topic).await?;
    let mut record = tributary_broker::storage::batch::NewRecord::new(
        Some(bytes::Bytes::from(args.topic.clone())),
        bytes::Bytes::from(request.value()),
    );
    record.timestamp_ms = None;
    let id = super::records::produce_one(&mut client, &args.conn, REQUESTS_TOPIC, 0, record)
        .await
        .context("store the request (is the mirror enabled on the gateway?)")?;
    let out = Requested { request: id, topic: args.topic, from_ms, to_ms };
    emit(args.conn.format(), &out, |r| {
        format!(
            "backfill request {} stored: {} from {} to {} (ms since the epoch); progress: tributary mirror status\n",
            r.request, r.topic, r.from_ms, r.to_ms
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_mirror_families_of_an_exposition() {
        let text = "# HELP x\ntributary_mirror_link_up 1\ntributary_mirror_reconnects_total 3\n\
                    tributary_mirror_lag_records{topic=\"meters\",partition=\"2\"} 17\n\
                    tributary_mirror_mirrored_offset{topic=\"meters\",partition=\"2\"} 100\n\
                    tributary_mirror_live_streams 2\ntributary_mirror_live_batch_bytes_sent_total 4096\n\
                    tributary_store_commits_total 5\n";
        let s = parse(text).expect("mirror metrics");
        assert!(s.link_up);
        assert_eq!((s.live_streams, s.live_batch_bytes_sent), (2, 4096));
        assert!(s.backfills.is_empty());
        let text = "tributary_mirror_backfill_records{request=\"3\",topic=\"raw\",from_ms=\"10\",to_ms=\"20\",state=\"accepted\"} 500\n\
                    tributary_mirror_backfill_sent_records{request=\"3\",topic=\"raw\",from_ms=\"10\",to_ms=\"20\",state=\"accepted\"} 120\n\
                    tributary_mirror_backfill_below_records{request=\"3\",topic=\"raw\",from_ms=\"10\",to_ms=\"20\",state=\"accepted\"} 7\n\
                    tributary_mirror_backfill_deleted_records{request=\"3\",topic=\"raw\",from_ms=\"10\",to_ms=\"20\",state=\"accepted\"} 9\n";
        let b = &parse(text).expect("mirror metrics").backfills[0];
        assert_eq!((b.request, b.topic.as_str(), b.from_ms, b.to_ms, b.state.as_str()), (3, "raw", 10, 20, "accepted"));
        assert_eq!((b.records, b.sent, b.below, b.deleted), (500, 120, 7, 9));
        assert_eq!(s.reconnects, 3);
        assert_eq!((s.partitions[0].topic.as_str(), s.partitions[0].partition), ("meters", 2));
        assert_eq!((s.partitions[0].lag_records, s.partitions[0].mirrored_offset), (17, 100));
        assert!(parse("tributary_store_commits_total 5\n").is_none(), "no mirror: none");
        assert_eq!(s.drain.eta_s, None, "no ETA sample: not draining");
    }

    #[test]
    fn reads_the_drain_per_topic_and_in_total() {
        let text = "tributary_mirror_lag_records{topic=\"meters\",partition=\"0\"} 40\n\
                    tributary_mirror_lag_records{topic=\"meters\",partition=\"1\"} 60\n\
                    tributary_mirror_lag_bytes{topic=\"meters\",partition=\"1\"} 6000\n\
                    tributary_mirror_lag_records{topic=\"alarms\",partition=\"0\"} 5\n\
                    tributary_mirror_drain_records_per_second{topic=\"meters\"} 12.5\n\
                    tributary_mirror_drain_eta_seconds{topic=\"meters\"} 8\n\
                    tributary_mirror_drain_records_per_second 20\n\
                    tributary_mirror_drain_eta_seconds 9.5\n";
        let s = parse(text).expect("mirror metrics");
        let meters = &s.topics["meters"];
        assert_eq!((meters.backlog_records, meters.backlog_bytes, meters.eta_s), (100, 6000, Some(8.0)));
        assert_eq!(meters.records_per_s, 12.5);
        assert_eq!((s.topics["alarms"].backlog_records, s.topics["alarms"].eta_s), (5, None));
        assert_eq!((s.drain.backlog_records, s.drain.records_per_s, s.drain.eta_s), (105, 20.0, Some(9.5)));
    }
}
