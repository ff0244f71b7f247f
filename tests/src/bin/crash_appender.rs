//! Crash-test child: appends to topic `crash` (or `--topic`) from many concurrent tasks (single
//! records and ready client batches) and prints `ack <partition> <base> <last> <value,...>` for
//! every acknowledged append. The crash test kills it with SIGKILL at random moments. With
//! `--relaxed` the topic has `durability = "relaxed"`, flushed every `--relaxed-flush-ms`.

use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use tributary_broker::config::{Durability, StorageConfig, TimestampKind, TopicConfig};
use tributary_broker::storage::batch::{encode_batch, NewRecord};
use tributary_broker::{Store, StoreError};

pub const TOPIC: &str = "crash";
pub const PARTITIONS: u32 = 3;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 32)]
    tasks: usize,
    #[arg(long)]
    round: u32,
    #[arg(long, default_value = TOPIC)]
    topic: String,
    /// Create the topic with durability = "relaxed".
    #[arg(long)]
    relaxed: bool,
    /// storage.relaxed_flush_interval_ms.
    #[arg(long, default_value_t = 1000)]
    relaxed_flush_ms: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = StorageConfig {
        data_dir: args.data_dir,
        disk_free_bytes_min: 0,
        relaxed_flush_interval_ms: args.relaxed_flush_ms,
        ..StorageConfig::default()
    };
    let (store, report) = Store::open(cfg).context("open store")?;
    println!("open {} {}", report.duration.as_micros(), report.repaired);
    let durability = if args.relaxed { Durability::Relaxed } else { Durability::Fsync };
    match store.create_topic(&args.topic, PARTITIONS, TopicConfig { durability, ..TopicConfig::default() }).await {
        Ok(()) | Err(StoreError::TopicExists(_)) => {}
        Err(e) => return Err(e).context("create topic"),
    }
    let mut tasks = Vec::new();
    for task in 0..args.tasks {
        let store = store.clone();
        let (round, topic) = (args.round, args.topic.clone());
        tasks.push(tokio::spawn(async move { run_task(store, topic, round, task).await }));
    }
    for t in tasks {
        t.await.context("join")??;
    }
    Ok(())
}

async fn run_task(store: Store, topic: String, round: u32, task: usize) -> anyhow::Result<()> {
    let partition = (task % PARTITIONS as usize) as i32;
    for seq in 0u64.. {
        let n = 1 + (seq as usize + task) % 4;
        let values: Vec<String> = (0..n).map(|k| format!("r{round}-t{task}-s{seq}-{k}")).collect();
        let records: Vec<NewRecord> = values
            .iter()
            .map(|v| NewRecord::new(Some(Bytes::from(format!("t{task}"))), Bytes::from(v.clone())))
            .collect();
        let outcome = if task % 2 == 0 {
            store.append_records(&topic, partition, records).await?
        } else {
            let stamped: Vec<_> = records.iter().map(|r| (r, 1_700_000_000_000 + seq as i64)).collect();
            let mut batch = Vec::new();
            encode_batch(&stamped, 0, tributary_broker::Codec::Lz4, TimestampKind::CreateTime, 0, &mut batch)?;
            store.append_batch(&topic, partition, Bytes::from(batch)).await?
        };
        println!("ack {partition} {} {} {}", outcome.base_offset, outcome.last_offset, values.join(","));
    }
    Ok(())
}
