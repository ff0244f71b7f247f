//! `tributary topics list|describe|create|delete|alter`: topic administration over CreateTopics,
//! DeleteTopics, CreatePartitions, Metadata, ListOffsets and DescribeConfigs.

use clap::Subcommand;
use kafka_protocol::messages::{
    create_partitions_request, create_topics_request, describe_configs_request, CreatePartitionsRequest,
    CreateTopicsRequest, DeleteTopicsRequest, DescribeConfigsRequest,
};
use kafka_protocol::protocol::StrBytes;
use serde::Serialize;

use super::client::{check, check_topic, partition_keys, topic_name, Client};
use super::table::{emit, opt, Table};
use super::Connection;

/// Resource type of a topic in the config APIs.
const RESOURCE_TOPIC: i8 = 2;

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// List topics with their partition counts.
    List,
    /// Partitions (log start, high watermark, records) and settings of a topic, or of all.
    Describe { topic: Option<String> },
    /// Create a topic.
    Create {
        topic: String,
        /// Number of partitions.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        partitions: i32,
        /// A topic setting, KEY=VALUE (repeatable): retention.bytes, retention.ms,
        /// compression.type, durability, message.timestamp.type.
        #[arg(long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
    },
    /// Delete a topic and its records.
    Delete { topic: String },
    /// Grow a topic to more partitions (CreatePartitions; the count cannot shrink).
    Alter {
        topic: String,
        /// The new, larger partition count.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        partitions: i32,
    },
}

pub async fn run(conn: &Connection, command: TopicsCommand) -> anyhow::Result<()> {
    let mut client = conn.connect().await?;
    let timeout_ms = i32::try_from(conn.timeout_ms).unwrap_or(i32::MAX);
    match command {
        TopicsCommand::List => {
            let meta = client.metadata(None).await?;
            let list: Vec<TopicSummary> = meta
                .topics
                .into_iter()
                .map(|t| TopicSummary { name: t.name, partitions: t.partitions.len() })
                .collect();
            emit(conn.format(), &list, |list| {
                let mut t = Table::new(&["TOPIC", "PARTITIONS"]);
                for s in list {
                    t.row(vec![s.name.clone(), s.partitions.to_string()]);
                }
                t.render()
            })
        }
        TopicsCommand::Describe { topic } => {
            let described = describe(&mut client, topic).await?;
            emit(conn.format(), &described, |d| render_description(d))
        }
        TopicsCommand::Create { topic, partitions, configs } => {
            let configs = configs
                .iter()
                .map(|kv| {
                    let (k, v) =
                        kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--config {kv:?}: expected KEY=VALUE"))?;
                    Ok(create_topics_request::CreatableTopicConfig::default()
                        .with_name(StrBytes::from_string(k.to_string()))
                        .with_value(Some(StrBytes::from_string(v.to_string()))))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let req = CreateTopicsRequest::default().with_timeout_ms(timeout_ms).with_topics(vec![
                create_topics_request::CreatableTopic::default()
                    .with_name(topic_name(&topic))
                    .with_num_partitions(partitions)
                    .with_replication_factor(1)
                    .with_configs(configs),
            ]);
            let resp = client.call(&req, 2..=5).await?;
            for r in &resp.topics {
                check(r.error_code, r.error_message.as_ref(), || format!("cannot create topic '{topic}'"))?;
            }
            let done = TopicSummary { name: topic, partitions: partitions as usize };
            emit(conn.format(), &done, |d| format!("created topic '{}' with {} partitions\n", d.name, d.partitions))
        }
        TopicsCommand::Delete { topic } => {
            let req =
                DeleteTopicsRequest::default().with_timeout_ms(timeout_ms).with_topic_names(vec![topic_name(&topic)]);
            // v6 names topics differently (by id or name in `topics`).
            let resp = client.call(&req, 1..=5).await?;
            for r in &resp.responses {
                check_topic(r.error_code, r.error_message.as_ref(), &topic, "cannot delete topic")?;
            }
            let done = Deleted { topic, deleted: true };
            emit(conn.format(), &done, |d| format!("deleted topic '{}'\n", d.topic))
        }
        TopicsCommand::Alter { topic, partitions } => {
            let req = CreatePartitionsRequest::default().with_timeout_ms(timeout_ms).with_topics(vec![
                create_partitions_request::CreatePartitionsTopic::default()
                    .with_name(topic_name(&topic))
                    .with_count(partitions),
            ]);
            let resp = client.call(&req, 0..=3).await?;
            for r in &resp.results {
                check_topic(r.error_code, r.error_message.as_ref(), &topic, "cannot add partitions to topic")?;
            }
            let done = TopicSummary { name: topic, partitions: partitions as usize };
            emit(conn.format(), &done, |d| format!("topic '{}' now has {} partitions\n", d.name, d.partitions))
        }
    }
}

#[derive(Debug, Serialize)]
struct TopicSummary {
    name: String,
    partitions: usize,
}

#[derive(Debug, Serialize)]
struct Deleted {
    topic: String,
    deleted: bool,
}

#[derive(Debug, Serialize)]
struct TopicDescription {
    name: String,
    partitions: Vec<PartitionState>,
    configs: Vec<ConfigEntry>,
}

#[derive(Debug, Serialize)]
struct PartitionState {
    partition: i32,
    log_start_offset: Option<i64>,
    high_watermark: Option<i64>,
    /// High watermark minus log start offset.
    records: Option<i64>,
}

#[derive(Debug, Serialize)]
struct ConfigEntry {
    name: String,
    value: Option<String>,
    /// "topic" when set on the topic, "default" when it is the gateway's `[topic_defaults]`.
    source: &'static str,
}

async fn describe(client: &mut Client, topic: Option<String>) -> anyhow::Result<Vec<TopicDescription>> {
    let topics = match topic {
        Some(name) => vec![client.topic(&name).await?],
        None => client.metadata(None).await?.topics,
    };
    let watermarks = client.watermarks(&partition_keys(&topics)).await?;
    let mut out: Vec<TopicDescription> = topics
        .iter()
        .map(|t| TopicDescription {
            name: t.name.clone(),
            partitions: t
                .partitions
                .iter()
                .map(|p| {
                    let wm = watermarks.get(&(t.name.clone(), *p)).copied();
                    PartitionState {
                        partition: *p,
                        log_start_offset: wm.map(|w| w.0),
                        high_watermark: wm.map(|w| w.1),
                        records: wm.map(|(lo, hi)| hi - lo),
                    }
                })
                .collect(),
            configs: Vec::new(),
        })
        .collect();
    if out.is_empty() {
        return Ok(out);
    }
    let req = DescribeConfigsRequest::default().with_resources(
        out.iter()
            .map(|t| {
                describe_configs_request::DescribeConfigsResource::default()
                    .with_resource_type(RESOURCE_TOPIC)
                    .with_resource_name(StrBytes::from_string(t.name.clone()))
                    .with_configuration_keys(None) // all of them
            })
            .collect(),
    );
    let resp = client.call(&req, 1..=4).await?;
    for r in resp.results {
        let name = r.resource_name.to_string();
        check_topic(r.error_code, r.error_message.as_ref(), &name, "settings of topic")?;
        if let Some(t) = out.iter_mut().find(|t| t.name == name) {
            t.configs = r
                .configs
                .into_iter()
                .map(|c| ConfigEntry {
                    name: c.name.to_string(),
                    value: c.value.map(|v| v.to_string()),
                    source: match c.config_source {
                        1 => "topic",
                        4 | 5 => "default",
                        _ => "other",
                    },
                })
                .collect();
        }
    }
    Ok(out)
}

fn render_description(topics: &[TopicDescription]) -> String {
    let mut parts = Table::new(&["TOPIC", "PARTITION", "LOG-START", "HIGH-WATERMARK", "RECORDS"]);
    let mut configs = Table::new(&["TOPIC", "CONFIG", "VALUE", "SOURCE"]);
    for t in topics {
        for p in &t.partitions {
            parts.row(vec![
                t.name.clone(),
                p.partition.to_string(),
                opt(p.log_start_offset),
                opt(p.high_watermark),
                opt(p.records),
            ]);
        }
        for c in &t.configs {
            configs.row(vec![t.name.clone(), c.name.clone(), opt(c.value.as_deref()), c.source.to_string()]);
        }
    }
    format!("{}\n{}", parts.render(), configs.render())
}
