//! The chaos soak, long form: `soak --minutes 30` runs tests/src/soak.rs against the gateway
//! binary for that long and prints the report (the figures in BENCHMARKS.md).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tributary_tests::soak::{run, SoakConfig};

#[derive(Debug, Parser)]
struct Args {
    /// Length of the chaos phase.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Seed of the schedule (default: random, printed).
    #[arg(long, env = "TRIBUTARY_SOAK_SEED")]
    seed: Option<u64>,
    /// The gateway binary (default: tributary-under-test next to this program).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// SIGKILLs and disk faults per minute.
    #[arg(long, default_value_t = 2)]
    kills_per_minute: u32,
    #[arg(long, default_value_t = 2)]
    faults_per_minute: u32,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let binary = match args.binary {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("tributary-under-test"),
    };
    let dir = tempfile::tempdir()?;
    let mut cfg = SoakConfig::short(binary, dir.path().join("soak"), seed);
    cfg.duration = Duration::from_secs(args.minutes * 60);
    cfg.kills = args.kills_per_minute * args.minutes as u32;
    cfg.disk_faults = args.faults_per_minute * args.minutes as u32;
    eprintln!("soak: {} min, seed {seed}", args.minutes);
    let report = run(cfg).await?;
    println!("{report}");
    Ok(())
}
