//! `tributary restore`: rebuilds this gateway's data directory from the central cluster with the
//! `[mirror]` settings (the site's certificate, the same `gateway.toml`), before `serve`: the
//! site's topics with their records at their original offsets, its consumer groups' committed
//! offsets, and so the MQTT retained messages (`mqtt.retained`). A progress bar with the ETA on a
//! terminal, plain lines otherwise. Stopped at any point, the same command continues.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tributary_broker::Store;
use tributary_sync::gateway_restore::{restore, RestoreRequest};
use tributary_sync::restore::{Selection, Snapshot};

use crate::config::GatewayConfig;

/// Group offsets written per store commit.
const OFFSETS_PER_COMMIT: usize = 1_000;

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The gateway's configuration file (its `[storage]` and `[mirror]` settings are used).
    #[arg(long, short)]
    config: PathBuf,
    /// Restore only this topic (repeatable; default: every topic the central cluster holds for
    /// this site).
    #[arg(long = "topic", value_name = "NAME")]
    topics: Vec<String>,
    /// Restore only the records of the last DURATION of each topic (e.g. `6h`, `2d`); compacted
    /// topics come back whole.
    #[arg(long, value_name = "DURATION", conflicts_with = "bytes")]
    since: Option<String>,
    /// Restore only about the last SIZE of records of each topic (e.g. `1GiB`); compacted topics
    /// come back whole.
    #[arg(long, value_name = "SIZE")]
    bytes: Option<String>,
    /// Fail back this consumer group (repeatable): it consumed in the central cluster while the
    /// site was lost, so its central commits, translated to this gateway's offsets, replace its
    /// last edge commits. Its central name follows the receiver's `central_group_format`.
    #[arg(long = "failback-group", value_name = "GROUP")]
    failback_groups: Vec<String>,
    /// How often the progress is shown (default: 250 ms on a terminal, 5 s otherwise).
    #[arg(long, value_name = "MS")]
    progress_interval_ms: Option<u64>,
}

pub fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let cfg = GatewayConfig::load(&args.config).context("invalid configuration")?;
    let mut mirror = cfg.mirror.clone();
    // The same settings as the mirror's, whether it is on or not in this file.
    mirror.enabled = true;
    mirror.validate("mirror").context("invalid configuration: restore needs the [mirror] settings")?;
    let since_ms = match &args.since {
        Some(s) => Some(
            tributary_sync::config_file::parse_duration(s)
                .with_context(|| format!("--since {s:?}: not a duration (e.g. 6h, 2d, 90m)"))?,
        ),
        None => None,
    };
    let bytes = match &args.bytes {
        Some(s) => Some(
            tributary_sync::config_file::parse_size(s)
                .with_context(|| format!("--bytes {s:?}: not a size (e.g. 1GiB, 500MB)"))?,
        ),
        None => None,
    };
    // Log lines would break the progress bar: warnings and errors only, unless RUST_LOG says.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let tty = std::io::stderr().is_terminal();
    let every = Duration::from_millis(args.progress_interval_ms.unwrap_or(if tty { 250 } else { 5_000 }).max(10));
    let rt = crate::runtime(&cfg)?;
    rt.block_on(async move {
        let storage = cfg.storage.clone();
        let (store, _) = tokio::task::spawn_blocking(move || Store::open(storage))
            .await
            .context("storage open task")?
            .with_context(|| format!("open the log store in {}", cfg.storage.data_dir.display()))?;
        let req = RestoreRequest {
            selection: Selection { topics: args.topics.clone(), since_ms, bytes },
            topic_config: cfg.topic_defaults.topic_config(),
            failback_groups: args.failback_groups.clone(),
        };
        eprintln!("tributary restore: site {} from {} into {}", mirror.site, mirror.cloud, cfg.storage.data_dir.display());
        let outcome = restore(&mirror, &store, req, every, |s, last| show(s, last, tty)).await;
        let result = match outcome {
            Ok(o) => write_offsets(&store, &o.offsets).await.map(|n| (o, n)),
            // The error's own text names the cause (its sources are already in it).
            Err(e) => Err(anyhow::anyhow!("{e}")),
        };
        store.close().await.context("close the log store")?;
        let (o, groups) = result.context("restore stopped (run the same command again to continue)")?;
        let secs = o.elapsed.as_secs_f64().max(0.001);
        println!(
            "restored {} topics ({} partitions): {} records, {} bytes in {:.1} s ({:.0} records/s, {:.2} MB/s); {} group offsets ({} failed back from the central cluster)",
            o.topics.len(),
            o.last.partitions,
            o.last.records,
            o.last.bytes,
            secs,
            o.last.records as f64 / secs,
            o.last.bytes as f64 / secs / 1e6,
            groups,
            o.failed_back,
        );
        // The topics' settings: what was applied, what this gateway refused (skipped).
        let created: Vec<_> = o.settings.iter().filter_map(|t| t.applied.as_ref().map(|a| (t, a))).collect();
        let applied: usize = created.iter().map(|(_, a)| a.len()).sum();
        let skipped: usize = o.settings.iter().map(|t| t.skipped.len()).sum();
        println!(
            "topic settings: {applied} applied on {} topics created, {skipped} skipped; {} topics already here kept theirs",
            created.len(),
            o.settings.len() - created.len(),
        );
        for (t, a) in &created {
            if !a.is_empty() {
                let list: Vec<String> = a.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("  {}: {}", t.topic, list.join(", "));
            }
        }
        for t in &o.settings {
            for s in &t.skipped {
                println!("  {}: {}={} skipped: {}", t.topic, s.key, s.value, s.reason);
            }
        }
        Ok(())
    })
}

/// The group offsets as the gateway's own committed offsets (topics not restored left out).
async fn write_offsets(store: &Store, offsets: &[tributary_sync::protocol::CommittedOffset]) -> anyhow::Result<usize> {
    let mut written = 0;
    let kept: Vec<_> = offsets.iter().filter(|o| store.partition_info(&o.topic, o.partition).is_ok()).collect();
    for chunk in kept.chunks(OFFSETS_PER_COMMIT) {
        let entries = chunk
            .iter()
            .map(|o| {
                let (k, v) = tributary_broker::kafka::groups::offset_entry(
                    &o.group,
                    &o.topic,
                    o.partition,
                    o.offset,
                    o.commit_time_ms,
                );
                (k, Some(v))
            })
            .collect();
        store.kv_write(tributary_broker::spaces::GROUP_OFFSETS, entries).await.context("write the group offsets")?;
        written += chunk.len();
    }
    Ok(written)
}

/// The progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise.
fn show(s: &Snapshot, last: bool, tty: bool) {
    let mut err = std::io::stderr().lock();
    let _ = if tty {
        write!(err, "\r\x1b[2K{} {}{}", s.bar(30), s.line(), if last { "\n" } else { "" })
    } else {
        writeln!(err, "restore: {}", s.line())
    };
    let _ = err.flush();
}
