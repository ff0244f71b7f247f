//! The administration commands (`tributary topics|groups|produce|consume|status`): their clap
//! definitions and dispatch. They talk to a running gateway through its Kafka listener, like
//! Kafka's own scripts with `--bootstrap-server`.

mod client;
mod groups;
mod mirror;
mod records;
mod sasl;
mod table;
mod topics;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use self::client::{partition_keys, Client, Credentials};
use self::table::{emit, Format, Table};

/// Options every administration command takes (before or after its subcommand).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Gateway connection and output")]
pub struct Connection {
    /// The gateway's Kafka listener, HOST:PORT.
    #[arg(long, global = true, env = "TRIBUTARY_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap_server: String,
    /// Time limit of the connection and of every request, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// JSON output for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// User to log in as when the gateway has [auth] on; the password comes from the
    /// TRIBUTARY_PASSWORD environment variable or --password-file.
    #[arg(long, global = true, env = "TRIBUTARY_USER")]
    user: Option<String>,
    /// File whose first line is the password of --user.
    #[arg(long, global = true, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// SASL mechanism for --user (SCRAM keeps the password off the wire).
    #[arg(long, global = true, value_enum, default_value = "SCRAM-SHA-256")]
    sasl_mechanism: sasl::Mechanism,
}

impl Connection {
    async fn connect(&self) -> anyhow::Result<Client> {
        let credentials = self.credentials()?;
        let timeout = Duration::from_millis(self.timeout_ms);
        // Boxed: one copy of the connection's future, not one inside every command's.
        Ok(Box::pin(Client::connect(&self.bootstrap_server, timeout, credentials.as_ref())).await?)
    }

    fn credentials(&self) -> anyhow::Result<Option<Credentials>> {
        let Some(user) = &self.user else { return Ok(None) };
        let password = match &self.password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read the password of '{user}' from {}", path.display()))?;
                text.lines().next().unwrap_or_default().to_string()
            }
            None => std::env::var("TRIBUTARY_PASSWORD").map_err(|_| {
                anyhow::anyhow!("--user {user}: no password (set TRIBUTARY_PASSWORD or give --password-file)")
            })?,
        };
        Ok(Some(Credentials { user: user.clone(), password, mechanism: self.sasl_mechanism }))
    }

    fn format(&self) -> Format {
        if self.json {
            Format::Json
        } else {
            Format::Table
        }
    }
}

/// The administration subcommands, flattened into the program's command list.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List, describe, create, delete topics and add partitions.
    Topics {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: topics::TopicsCommand,
    },
    /// List, describe and delete consumer groups; reset their offsets.
    Groups {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: groups::GroupsCommand,
    },
    /// Produce stdin to a topic, one record per line (acks=all), and report the offsets.
    Produce {
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        args: records::ProduceArgs,
    },
    /// Print a topic's records, one per line (until interrupted, or --max-messages).
    Consume {
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        args: records::ConsumeArgs,
    },
    /// Whether the gateway answers, and what it holds.
    Status {
        #[command(flatten)]
        conn: Connection,
    },
    /// The mirror to the central cluster, from the gateway's metrics endpoint.
    Mirror {
        #[command(subcommand)]
        command: mirror::MirrorCommand,
    },
}

/// Runs one administration command on a small single-threaded runtime.
pub fn run(command: Command) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the async runtime")?;
    rt.block_on(async move {
        match command {
            Command::Topics { conn, command } => topics::run(&conn, command).await,
            Command::Groups { conn, command } => groups::run(&conn, command).await,
            Command::Produce { conn, args } => records::produce(&conn, args).await,
            Command::Consume { conn, args } => records::consume(&conn, args).await,
            Command::Status { conn } => status(&conn).await,
            Command::Mirror { command } => mirror::run(command).await,
        }
    })
}

#[derive(Debug, Serialize)]
struct Status {
    bootstrap_server: String,
    reachable: bool,
    cluster_id: Option<String>,
    /// The version the ApiVersions exchange used, and every API the gateway serves.
    api_versions_version: i16,
    apis: Vec<ApiRange>,
    topics: usize,
    partitions: usize,
    /// Sum over partitions of high watermark minus log start offset.
    records: i64,
    groups: usize,
    cli_version: &'static str,
}

#[derive(Debug, Serialize)]
struct ApiRange {
    name: String,
    min: i16,
    max: i16,
}

async fn status(conn: &Connection) -> anyhow::Result<()> {
    let mut client = conn.connect().await?;
    let meta = client.metadata(None).await?;
    let partitions = partition_keys(&meta.topics);
    let records = client.watermarks(&partitions).await?.values().map(|(lo, hi)| hi - lo).sum();
    let groups = groups::list_ids(&mut client).await?.len();
    let status = Status {
        bootstrap_server: client.addr().to_string(),
        reachable: true,
        cluster_id: meta.cluster_id,
        api_versions_version: client.api_versions_version(),
        apis: client.apis().into_iter().map(|(name, min, max)| ApiRange { name, min, max }).collect(),
        topics: meta.topics.len(),
        partitions: partitions.len(),
        records,
        groups,
        cli_version: env!("CARGO_PKG_VERSION"),
    };
    emit(conn.format(), &status, |s| {
        let mut t = Table::new(&[]);
        t.row(vec!["gateway".into(), format!("{} (reachable)", s.bootstrap_server)]);
        t.row(vec!["cluster id".into(), table::opt(s.cluster_id.as_deref())]);
        t.row(vec!["kafka apis".into(), format!("{} served (ApiVersions v{})", s.apis.len(), s.api_versions_version)]);
        t.row(vec!["topics".into(), s.topics.to_string()]);
        t.row(vec!["partitions".into(), s.partitions.to_string()]);
        t.row(vec!["records".into(), s.records.to_string()]);
        t.row(vec!["groups".into(), s.groups.to_string()]);
        t.row(vec!["cli version".into(), s.cli_version.into()]);
        t.render()
    })
}
