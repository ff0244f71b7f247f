//! The `tributary` program: the gateway daemon (`serve`) and its command-line tools. The binary
//! target is a one-line `main` over this library so the end-to-end suite can run the same code.

mod cert;
mod cli;
pub mod config;
pub mod http;
pub mod metrics;
mod passwd;
mod restore;
pub mod status;
pub mod systemd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tributary_broker::kafka::KafkaServer;
use tributary_broker::mqtt::MqttServer;
use tributary_broker::Store;

use crate::config::GatewayConfig;

#[derive(Debug, Parser)]
#[command(name = "tributary", version, about = "Tributary event-streaming gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (built-in defaults without --config; data in ./tributary-data).
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    // topics, groups, produce, consume, status: a running gateway's administration (src/cli/).
    #[command(flatten)]
    Admin(cli::Command),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Certificates for the mirror link (a deployment CA, per-site and cloud certificates).
    Cert {
        #[command(subcommand)]
        command: cert::CertCommand,
    },
    /// Print an [[auth.users]] entry for USER (the password is read from standard input).
    Passwd(passwd::PasswdArgs),
    /// Rebuild this gateway's data from the central cluster ([mirror] settings): topics, records
    /// at their original offsets, group offsets, retained messages. Resumable.
    Restore(restore::RestoreArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file without starting.
    Check { file: PathBuf },
    /// Print the built-in defaults as TOML.
    Defaults,
}

/// Entry point of the `tributary` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tributary: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Cert { command } => cert::run(command),
        Command::Passwd(args) => passwd::run(args),
        Command::Restore(args) => restore::run(args),
        Command::Serve { config } => {
            let cfg = match &config {
                Some(path) => GatewayConfig::load(path).context("invalid configuration")?,
                None => GatewayConfig::default(),
            };
            init_logging(&cfg.log.level);
            limit_malloc_arenas();
            runtime(&cfg)?.block_on(serve(cfg, config))
        }
        Command::Config { command: ConfigCommand::Check { file } } => {
            GatewayConfig::load(&file).context("invalid configuration")?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Admin(command) => cli::run(command),
        Command::Config { command: ConfigCommand::Defaults } => {
            print!("{}", toml::to_string(&GatewayConfig::default()).context("serialize defaults")?);
            Ok(())
        }
    }
}

/// glibc malloc arenas at most (`M_ARENA_MAX`), unless `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES`
/// says otherwise. glibc's default is 8 per core: every thread that allocates while another
/// holds the lock gets an arena of its own, and memory freed into one arena is not reused by
/// the others nor returned while its top is in use. The gateway's buffers move between threads
/// (a Kafka request read on a worker, its batch stored by the writer, fetch responses built on
/// the blocking pool), so with many arenas each keeps its own high-water mark. Measured
/// (2026-12-06, release, one librdkafka producer then consumer, 200,000 x 1 KiB and 1,000,000 x
/// 100 B, BENCHMARKS.md "Where the gateway's memory goes"): peak RSS 54-59 MiB with glibc's
/// default, 41-48 with 2 arenas, 38-42 with 1; produce and consume times within the run-to-run
/// noise of this shared machine. Two, not one: the async workers and the writer allocate at
/// the same time, and one arena would make them take turns at its lock.
const MALLOC_ARENAS_MAX: i32 = 2;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    // SAFETY: mallopt only sets a parameter of glibc's allocator; it is called before the
    // runtime's threads start, with a valid parameter and value.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS_MAX) };
    if ok != 1 {
        tracing::warn!("mallopt(M_ARENA_MAX) refused: glibc keeps its default arenas");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {
    let _ = MALLOC_ARENAS_MAX;
}

/// The gateway's runtime: two async workers (a Pi has four cores, shared with the store's
/// writer) and at most `storage.blocking_threads_max` blocking threads for store reads.
pub(crate) fn runtime(cfg: &GatewayConfig) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cfg.storage.blocking_threads_max as usize)
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// Consumer groups' committed offsets of mirrored topics go to the mirror: those stored now, then
/// every commit as it happens (the coordinator's commit hook).
async fn feed_commits(
    groups: &std::sync::Arc<tributary_broker::kafka::groups::Coordinator>,
    mirror: &tributary_sync::MirrorConfig,
    stats: &std::sync::Arc<tributary_sync::gateway::MirrorStats>,
) -> anyhow::Result<()> {
    let limit = mirror.offsets_tracked_max as usize;
    stats.commits.set_limit(limit);
    let coordinator = groups.clone();
    // Offsets of topics not mirrored are read too: four times the feed's limit bounds the read.
    let stored = tokio::task::spawn_blocking(move || coordinator.all_committed(limit.saturating_mul(4)))
        .await
        .context("read committed offsets")?
        .context("read committed offsets")?;
    for (group, topic, partition, c) in stored {
        if mirror.mirrors(&topic) {
            stats.commits.offer(&group, &topic, partition, c.offset, c.commit_time_ms);
        }
    }
    let (mirror, feed) = (mirror.clone(), stats.clone());
    groups.set_commit_hook(std::sync::Arc::new(move |group, committed, at| {
        for (topic, partition, offset) in committed {
            if mirror.mirrors(topic) {
                feed.commits.offer(group, topic, *partition, *offset, at);
            }
        }
    }));
    Ok(())
}

async fn serve(cfg: GatewayConfig, path: Option<PathBuf>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    // A write past a file-size limit (RLIMIT_FSIZE) raises SIGXFSZ, whose default action kills
    // the process. Handled, the write fails with EFBIG instead, and the store recovers from that
    // as from any failed write (writes refused, reads served, retried until it works).
    let mut sigxfsz = signal(SignalKind::from_raw(libc::SIGXFSZ)).context("install SIGXFSZ handler")?;
    tokio::spawn(async move {
        while sigxfsz.recv().await.is_some() {
            tracing::warn!("SIGXFSZ: a write went past the file-size limit; it fails and the store retries");
        }
    });
    let service = systemd::Service::from_env();
    // Shown by `systemctl status` while a database left by a power cut is repaired.
    service.status("opening the log store");
    let storage = cfg.storage.clone();
    let (store, report) = tokio::task::spawn_blocking(move || Store::open(storage))
        .await
        .context("storage open task")?
        .context("open the log store")?;
    // Before the listeners start: they record refusals from their first connection on.
    store.refusals().set_limit(cfg.status.refusals_max as usize);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // One user database for both listeners ([auth]).
    let auth = tributary_broker::security::Auth::new(&cfg.auth, "auth").context("invalid configuration")?;
    if auth.enabled() {
        tracing::info!(users = auth.user_count(), "authentication on: clients log in, ACLs apply");
    }
    let mut kafka_addr = String::from("off");
    let mut kafka_sources = None;
    let mut kafka_task = None;
    if cfg.kafka.enabled {
        let server =
            KafkaServer::bind_with(cfg.kafka.clone(), store.clone(), cfg.topic_defaults.template(), auth.clone())
                .await
                .context("start the Kafka listener")?;
        let local = server.local_addr().context("Kafka listener address")?;
        let (host, port) = server.advertised();
        tracing::info!(listen = %local, advertised = %format!("{host}:{port}"), tls = cfg.kafka.tls.enabled,
            "kafka listener bound");
        kafka_addr = local.to_string();
        kafka_sources = Some((server.stats(), server.groups()));
        let mut stop = stop_rx.clone();
        kafka_task = Some(tokio::spawn(server.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    let mut mqtt_addr = String::from("off");
    let mut mqtt_ws_addr = String::from("off");
    let mut mqtt_stats = None;
    let mut sys_publisher = None;
    let mut mqtt_task = None;
    if cfg.mqtt.enabled {
        let server =
            MqttServer::bind_with(cfg.mqtt.clone(), store.clone(), cfg.topic_defaults.template(), auth.clone())
                .await
                .context("start the MQTT listener")?;
        let local = server.local_addr().context("MQTT listener address")?;
        tracing::info!(listen = %local, "mqtt listener bound");
        if let Some(tls) = server.tls_local_addr() {
            tracing::info!(listen = %tls.context("MQTT TLS listener address")?, "mqtt TLS listener bound");
        }
        if let Some(ws) = server.websocket_local_addr() {
            mqtt_ws_addr = ws.context("MQTT WebSocket listener address")?.to_string();
            tracing::info!(listen = %mqtt_ws_addr, "mqtt WebSocket listener bound");
        }
        if let Some(wss) = server.websocket_tls_local_addr() {
            tracing::info!(listen = %wss.context("MQTT secure WebSocket listener address")?,
                "mqtt secure WebSocket listener bound");
        }
        mqtt_addr = local.to_string();
        mqtt_stats = Some(server.stats());
        sys_publisher = Some(server.sys_publisher());
        let mut stop = stop_rx.clone();
        mqtt_task = Some(tokio::spawn(server.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    let mut mirror_task = None;
    let mut mirror_stats = None;
    if cfg.mirror.enabled {
        // Latest-first topics that exist must be compacted: refused at start, naming the key.
        cfg.mirror.validate_topics("mirror", |t| store.topic(t).map(|i| i.config.compacted()))?;
        let stats = std::sync::Arc::new(tributary_sync::gateway::MirrorStats::default());
        mirror_stats = Some(stats.clone());
        if let Some((_, groups)) = &kafka_sources {
            feed_commits(groups, &cfg.mirror, &stats).await?;
        }
        let mut stop = stop_rx.clone();
        let (mirror, store, defaults) = (cfg.mirror.clone(), store.clone(), cfg.topic_defaults.topic_config());
        tracing::info!(cloud = %mirror.cloud, site = %mirror.site, "mirror enabled");
        mirror_task = Some(tokio::spawn(async move {
            let run = tributary_sync::gateway::run(mirror, store, stats, defaults, async move {
                let _ = stop.wait_for(|s| *s).await;
            });
            if let Err(e) = run.await {
                tracing::error!(error = %e, "mirror stopped");
            }
        }));
    }
    // [[aggregate]]: one task per derived topic, stopped with the listeners.
    let (aggregates, aggregate_tasks) = tributary_broker::aggregate::spawn_all(
        &cfg.aggregate,
        &store,
        &cfg.topic_defaults.topic_config(),
        stop_rx.clone(),
    );
    let mut metrics_addr = String::from("off");
    let mut metrics_task = None;
    if cfg.metrics.enabled {
        // Metrics are not worth refusing to serve devices for: a busy port is logged, naming the
        // key, and the gateway runs without the endpoint.
        match tokio::net::TcpListener::bind(&cfg.metrics.listen).await {
            Ok(listener) => {
                metrics_addr = listener.local_addr().context("metrics address")?.to_string();
                // The status page shares the listener; TLS on either listener keeps its plain
                // HTTP to loopback peers and serves other hosts https on the same port, with that
                // listener's certificate (MQTT's first; no client certificates asked for).
                let tls_configured = cfg.mqtt.tls.enabled || cfg.kafka.tls.enabled;
                let https = if cfg.mqtt.tls.enabled {
                    Some(("mqtt.tls", &cfg.mqtt.tls.cert_file, &cfg.mqtt.tls.key_file))
                } else if cfg.kafka.tls.enabled {
                    Some(("kafka.tls", &cfg.kafka.tls.cert_file, &cfg.kafka.tls.key_file))
                } else {
                    None
                };
                let https = match https {
                    Some((prefix, cert_file, key_file)) => Some(
                        tributary_broker::security::tls::server_config(tributary_broker::security::tls::TlsFiles {
                            prefix,
                            cert_file,
                            key_file,
                            client_ca_file: "",
                        })
                        .context("the status page's https")?,
                    ),
                    None => None,
                };
                let status =
                    cfg.status.enabled.then(|| status::Status::new(cfg.status.clone(), auth.clone(), tls_configured));
                let sources = metrics::Sources {
                    store: store.clone(),
                    kafka: kafka_sources,
                    mqtt: mqtt_stats,
                    mirror: mirror_stats,
                    status: status.as_ref().map(|s| s.stats.clone()),
                    aggregates,
                };
                if let Some(status) = &status {
                    let mut stop = stop_rx.clone();
                    tokio::spawn(status::sample(status.clone(), sources.clone(), async move {
                        let _ = stop.wait_for(|s| *s).await;
                    }));
                }
                if let (Some(sys), true) = (sys_publisher.take(), cfg.metrics.sys_interval_ms > 0) {
                    let mut stop = stop_rx.clone();
                    let every = std::time::Duration::from_millis(cfg.metrics.sys_interval_ms);
                    tokio::spawn(metrics::publish_sys(sys, sources.clone(), every, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    }));
                }
                let mut stop = stop_rx.clone();
                metrics_task = Some(tokio::spawn(metrics::serve(
                    listener,
                    cfg.metrics.clone(),
                    sources,
                    status,
                    https,
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )));
            }
            Err(e) => tracing::error!(error = %e, listen = %cfg.metrics.listen,
                "metrics.listen: cannot bind the metrics endpoint; running without it"),
        }
    }
    tracing::info!(
        config = %path.as_ref().map_or_else(|| "built-in defaults".to_string(), |p| p.display().to_string()),
        data_dir = %cfg.storage.data_dir.display(),
        recovery_ms = report.duration.as_millis() as u64,
        repaired = report.repaired,
        kafka = %kafka_addr,
        mqtt = %mqtt_addr,
        mqtt_ws = %mqtt_ws_addr,
        metrics = %metrics_addr,
        version = env!("CARGO_PKG_VERSION"),
        "tributary gateway ready"
    );
    // Type=notify: READY only now, with the store open and both listeners bound.
    let serving = format!("serving: kafka={kafka_addr} mqtt={mqtt_addr}");
    service.ready(&serving);
    let watchdog = service.spawn_watchdog(store.clone(), serving);
    let which = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutting down: committing pending appends");
    // systemd does not watch a stopping service (TimeoutStopSec bounds the stop instead); the
    // pinger is gone before STOPPING so no ping follows it.
    if let Some(w) = watchdog {
        w.abort();
        let _ = w.await;
    }
    service.stopping("shutting down: committing pending appends");
    let _ = stop_tx.send(true);
    for t in [kafka_task, mqtt_task, mirror_task, metrics_task].into_iter().flatten().chain(aggregate_tasks) {
        let _ = t.await;
    }
    store.close().await.context("close the log store")?;
    tracing::info!("shutdown complete");
    Ok(())
}
