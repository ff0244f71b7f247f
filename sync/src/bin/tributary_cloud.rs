//! `tributary-cloud`: the mirror receiver next to the central Kafka cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tributary_sync::cloud::CloudServer;
use tributary_sync::CloudConfig;

#[derive(Debug, Parser)]
#[command(name = "tributary-cloud", version, about = "Tributary mirror receiver: gateways over QUIC into Kafka")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the receiver.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file without starting.
    Check { file: PathBuf },
    /// Print the built-in defaults as TOML.
    Defaults,
}

fn load(path: &PathBuf) -> anyhow::Result<CloudConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let cfg: CloudConfig = tributary_sync::config_file::parse(&text).with_context(|| format!("{}", path.display()))?;
    cfg.validate().with_context(|| format!("{}", path.display()))?;
    Ok(cfg)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tributary-cloud: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { file } => {
            load(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Defaults => {
            print!("{}", toml::to_string(&CloudConfig::default()).context("serialize defaults")?);
            Ok(())
        }
        Command::Serve { config } => {
            let cfg = load(&config)?;
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log.level))
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the runtime")?;
            rt.block_on(async {
                let server = CloudServer::bind(cfg).context("start the receiver")?;
                let addr = server.local_addr().context("listen address")?;
                tracing::info!(listen = %addr, version = env!("CARGO_PKG_VERSION"), "tributary-cloud ready");
                notify_ready();
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("install SIGTERM handler")?;
                server
                    .run(async move {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    })
                    .await;
                tracing::info!("tributary-cloud stopped");
                Ok(())
            })
        }
    }
}

/// READY=1 for systemd's Type=notify, when run under it.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let path = std::path::PathBuf::from(path);
    let _ = sock.send_to(b"READY=1\nSTATUS=receiving", &path);
}
