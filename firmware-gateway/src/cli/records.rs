//! `tributary produce` and `tributary consume`: records from stdin to a topic (Produce, acks=all)
//! and from a topic to stdout (Fetch), with the broker's own RecordBatch codec (every codec a
//! producer may have used, repeated headers kept, no allocation from untrusted counts).

use std::collections::BTreeMap;
use std::io::BufRead;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{ArgGroup, Args};
use kafka_protocol::messages::{fetch_request, produce_request, FetchRequest, ProduceRequest};
use serde::Serialize;
use tributary_broker::partitioner::{partition_for_key, Partitioner};
use tributary_broker::storage::batch::{
    decode_records, encode_batch, BatchHeader, NewRecord, StoredRecord, HEADER_LEN,
};
use tributary_broker::{Codec, TimestampKind};

use super::client::{check, check_topic, partition_keys, topic_name, Client, OffsetSpec, TopicMeta};
use super::table::{emit, write_stdout, Table};
use super::Connection;

/// A produce request is sent once this many value bytes are waiting (or stdin has nothing more
/// buffered, so interactive lines go out at once).
const PRODUCE_BYTES: usize = 256 << 10;
const PRODUCE_RECORDS: usize = 10_000;
/// Fetch size per partition to begin with; doubled up to `FETCH_BYTES_MAX` when one batch does
/// not fit.
const FETCH_BYTES: i32 = 1 << 20;
const FETCH_BYTES_MAX: i32 = 32 << 20;
/// Bound on a decompressed batch.
const DECOMPRESSED_MAX: u64 = 64 << 20;
const OFFSET_OUT_OF_RANGE: i16 = 1;

#[derive(Debug, Args)]
pub struct ProduceArgs {
    topic: String,
    /// Key of every record; the partition then follows from it (Kafka's murmur2 partitioner).
    #[arg(long)]
    key: Option<String>,
    /// Partition of every record (default: from the key, else round robin).
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    partition: Option<i32>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("start").args(["from_beginning", "offset"])))]
pub struct ConsumeArgs {
    topic: String,
    /// Only this partition (default: all).
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    partition: Option<i32>,
    /// Start at each partition's log start (default: at its end, printing only new records).
    #[arg(long)]
    from_beginning: bool,
    /// Start at this offset (in every partition read).
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
    offset: Option<i64>,
    /// Exit after printing this many records.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_messages: Option<u64>,
    /// Start from this group's committed offsets (where it has none: as the other options say)
    /// and commit what was printed. The group is not joined: the gateway takes these commits
    /// only while the group has no members.
    #[arg(long)]
    group: Option<String>,
    /// Print each record's key and a tab before its value.
    #[arg(long)]
    print_key: bool,
    /// Exit once every partition read is at its high watermark (like `kcat -e`).
    #[arg(long)]
    exit_at_end: bool,
}

fn check_partition(topic: &TopicMeta, partition: i32) -> anyhow::Result<()> {
    if !topic.partitions.contains(&partition) {
        bail!("topic '{}' has no partition {partition} (it has {})", topic.name, topic.partitions.len());
    }
    Ok(())
}

// ---- produce ----

#[derive(Debug, Serialize)]
struct Produced {
    topic: String,
    records: u64,
    /// Offset ranges written, per partition.
    partitions: Vec<ProducedRange>,
}

#[derive(Debug, Serialize)]
struct ProducedRange {
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    records: u64,
}

pub async fn produce(conn: &Connection, args: ProduceArgs) -> anyhow::Result<()> {
    let mut client = conn.connect().await?;
    let topic = client.topic(&args.topic).await?;
    if let Some(p) = args.partition {
        check_partition(&topic, p)?;
    }
    let count = u32::try_from(topic.partitions.len()).unwrap_or(u32::MAX).max(1);
    let key = args.key.map(Bytes::from);
    let round_robin = Partitioner::new();
    let mut produced = Produced { topic: topic.name.clone(), records: 0, partitions: Vec::new() };
    let mut pending: BTreeMap<i32, Vec<NewRecord>> = BTreeMap::new();
    let (mut pending_bytes, mut pending_records) = (0usize, 0usize);
    let mut input = std::io::BufReader::with_capacity(64 << 10, std::io::stdin().lock());
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = input.read_until(b'\n', &mut line).context("read stdin")?;
        if n > 0 {
            if line.last() == Some(&b'\n') {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
            }
            let partition = match (args.partition, &key) {
                (Some(p), _) => p,
                (None, Some(k)) => partition_for_key(k, count) as i32,
                (None, None) => round_robin.partition(None, count) as i32,
            };
            pending_bytes += line.len();
            pending_records += 1;
            pending.entry(partition).or_default().push(NewRecord {
                key: key.clone(),
                value: Some(Bytes::copy_from_slice(&line)),
                headers: Vec::new(),
                timestamp_ms: None,
            });
        }
        let done = n == 0;
        if !pending.is_empty()
            && (done
                || input.buffer().is_empty()
                || pending_bytes >= PRODUCE_BYTES
                || pending_records >= PRODUCE_RECORDS)
        {
            send(&mut client, conn, &topic.name, std::mem::take(&mut pending), &mut produced).await?;
            (pending_bytes, pending_records) = (0, 0);
        }
        if done {
            break;
        }
    }
    produced.partitions.sort_by_key(|r| (r.partition, r.first_offset));
    emit(conn.format(), &produced, |p| {
        let mut t = Table::new(&["PARTITION", "FIRST-OFFSET", "LAST-OFFSET", "RECORDS"]);
        for r in &p.partitions {
            t.row(vec![
                r.partition.to_string(),
                r.first_offset.to_string(),
                r.last_offset.to_string(),
                r.records.to_string(),
            ]);
        }
        format!(
            "produced {} record(s) to '{}'\n{}",
            p.records,
            p.topic,
            if t.is_empty() { String::new() } else { t.render() }
        )
    })
}

/// Produces one record to `partition` of `topic` (acks=all); its offset.
pub(super) async fn produce_one(
    client: &mut Client,
    conn: &Connection,
    topic: &str,
    partition: i32,
    record: NewRecord,
) -> anyhow::Result<i64> {
    let mut produced = Produced { topic: topic.to_string(), records: 0, partitions: Vec::new() };
    send(client, conn, topic, BTreeMap::from([(partition, vec![record])]), &mut produced).await?;
    produced.partitions.first().map(|r| r.first_offset).context("the gateway stored no record")
}

/// One Produce request with a batch per partition; adds the offsets written to `produced`.
async fn send(
    client: &mut Client,
    conn: &Connection,
    topic: &str,
    batches: BTreeMap<i32, Vec<NewRecord>>,
    produced: &mut Produced,
) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut partition_data = Vec::with_capacity(batches.len());
    let mut counts = BTreeMap::new();
    for (partition, records) in &batches {
        let stamped: Vec<(&NewRecord, i64)> = records.iter().map(|r| (r, now)).collect();
        let mut batch = Vec::new();
        encode_batch(&stamped, 0, Codec::None, TimestampKind::CreateTime, now, &mut batch)
            .context("encode a record batch")?;
        counts.insert(*partition, records.len() as u64);
        partition_data.push(
            produce_request::PartitionProduceData::default()
                .with_index(*partition)
                .with_records(Some(Bytes::from(batch))),
        );
    }
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(i32::try_from(conn.timeout_ms).unwrap_or(i32::MAX))
        .with_topic_data(vec![produce_request::TopicProduceData::default()
            .with_name(topic_name(topic))
            .with_partition_data(partition_data)]);
    // v3 is the first with RecordBatch v2; v13 names topics by id.
    let resp = client.call(&req, 3..=12).await?;
    for t in resp.responses {
        for p in t.partition_responses {
            check_topic(p.error_code, p.error_message.as_ref(), topic, "cannot produce to topic")?;
            let records = counts.get(&p.index).copied().unwrap_or(0);
            if records == 0 {
                continue;
            }
            let last = p.base_offset + records as i64 - 1;
            produced.records += records;
            match produced.partitions.iter_mut().rev().find(|r| r.partition == p.index) {
                Some(r) if r.last_offset + 1 == p.base_offset => {
                    r.last_offset = last;
                    r.records += records;
                }
                _ => produced.partitions.push(ProducedRange {
                    partition: p.index,
                    first_offset: p.base_offset,
                    last_offset: last,
                    records,
                }),
            }
        }
    }
    Ok(())
}

// ---- consume ----

#[derive(Debug, Serialize)]
struct ConsumedRecord<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    timestamp: i64,
    key: Option<String>,
    value: Option<String>,
    headers: Vec<(String, Option<String>)>,
}

fn text(b: &Option<Bytes>) -> Option<String> {
    b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
}

fn render_record(out: &mut String, json: bool, print_key: bool, topic: &str, partition: i32, r: &StoredRecord) {
    if json {
        let line = ConsumedRecord {
            topic,
            partition,
            offset: r.offset,
            timestamp: r.timestamp,
            key: text(&r.key),
            value: text(&r.value),
            headers: r.headers.iter().map(|(k, v)| (k.clone(), text(v))).collect(),
        };
        // Serializing strings and numbers cannot fail.
        out.push_str(&serde_json::to_string(&line).unwrap_or_default());
    } else {
        if print_key {
            out.push_str(text(&r.key).as_deref().unwrap_or("null"));
            out.push('\t');
        }
        out.push_str(text(&r.value).as_deref().unwrap_or("null"));
    }
    out.push('\n');
}

pub async fn consume(conn: &Connection, args: ConsumeArgs) -> anyhow::Result<()> {
    let mut client = conn.connect().await?;
    let mut topic = client.topic(&args.topic).await?;
    if let Some(p) = args.partition {
        check_partition(&topic, p)?;
        topic.partitions = vec![p];
    }
    let name = topic.name.clone();
    let watermarks = client.watermarks(&partition_keys(std::slice::from_ref(&topic))).await?;
    let committed = match &args.group {
        Some(g) => client.committed(g, Some(std::slice::from_ref(&topic))).await?,
        None => BTreeMap::new(),
    };
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    // Whether each partition's position has reached the last high watermark seen.
    let mut at_end: BTreeMap<i32, bool> = BTreeMap::new();
    for (key, &(lo, hi)) in &watermarks {
        let at = match (committed.get(key), args.offset) {
            (Some(c), _) => *c,
            (None, Some(n)) if !(lo..=hi).contains(&n) => bail!(
                "offset {n} is out of range for partition {} of topic '{name}' (log start {lo}, high watermark {hi})",
                key.1
            ),
            (None, Some(n)) => n,
            (None, None) if args.from_beginning => lo,
            (None, None) => hi,
        };
        positions.insert(key.1, at);
        at_end.insert(key.1, at >= hi);
    }

    let json = conn.json;
    let mut left = args.max_messages;
    let mut fetch_bytes = FETCH_BYTES;
    let max_wait = i32::try_from(conn.timeout_ms / 2).unwrap_or(i32::MAX).min(500);
    let version = client.version::<FetchRequest>(4..=12)?; // v13 names topics by id
    while left != Some(0) && !(args.exit_at_end && at_end.values().all(|e| *e)) {
        let req = FetchRequest::default()
            .with_max_wait_ms(max_wait)
            .with_min_bytes(1)
            .with_max_bytes(fetch_bytes.saturating_mul(4))
            .with_topics(vec![fetch_request::FetchTopic::default().with_topic(topic_name(&name)).with_partitions(
                positions
                    .iter()
                    .map(|(p, at)| {
                        fetch_request::FetchPartition::default()
                            .with_partition(*p)
                            .with_fetch_offset(*at)
                            .with_partition_max_bytes(fetch_bytes)
                    })
                    .collect(),
            )]);
        let resp = client.call_at(&req, version).await?;
        check(resp.error_code, None, || format!("fetch from topic '{name}'"))?;
        let mut out = String::new();
        let mut moved = BTreeMap::new();
        let mut stuck = false;
        for p in resp.responses.into_iter().flat_map(|t| t.partitions) {
            let Some(at) = positions.get_mut(&p.partition_index) else { continue };
            if p.error_code == OFFSET_OUT_OF_RANGE {
                // Retention removed what we were about to read: go on at the log start.
                let key = (name.clone(), p.partition_index);
                let lo = client.list_offsets(std::slice::from_ref(&key), OffsetSpec::Earliest).await?;
                let lo = lo.get(&key).copied().unwrap_or(0);
                eprintln!("partition {}: offset {at} is no longer in the log; continuing at {lo}", p.partition_index);
                *at = lo;
                continue;
            }
            check_topic(p.error_code, None, &name, &format!("fetch partition {} of topic", p.partition_index))?;
            let mut data = p.records.unwrap_or_default();
            let before = *at;
            while left != Some(0) && data.len() >= HEADER_LEN {
                let h = BatchHeader::parse(&data).context("a fetched record batch")?;
                if h.total_len() > data.len() {
                    break; // truncated at the fetch size
                }
                let batch = data.split_to(h.total_len());
                if h.magic != 2 {
                    bail!(
                        "partition {} offset {}: record batch magic {} (only v2 is read)",
                        p.partition_index,
                        h.base_offset,
                        h.magic
                    );
                }
                if !h.is_control() {
                    for r in decode_records(&batch, DECOMPRESSED_MAX).context("decode a fetched record batch")? {
                        if r.offset < *at {
                            continue;
                        }
                        if left == Some(0) {
                            break;
                        }
                        render_record(&mut out, json, args.print_key, &name, p.partition_index, &r);
                        *at = r.offset + 1;
                        left = left.map(|n| n - 1);
                    }
                }
                if left != Some(0) {
                    *at = (*at).max(h.next_offset());
                }
            }
            at_end.insert(p.partition_index, *at >= p.high_watermark);
            if *at != before {
                moved.insert((name.clone(), p.partition_index), *at);
            } else if !data.is_empty() && p.high_watermark > *at {
                stuck = true;
            }
        }
        if stuck {
            if fetch_bytes >= FETCH_BYTES_MAX {
                bail!("a record batch of topic '{name}' is larger than {FETCH_BYTES_MAX} bytes");
            }
            fetch_bytes = fetch_bytes.saturating_mul(2);
        }
        if !out.is_empty() && !write_stdout(out.as_bytes())? {
            break; // stdout closed (`| head`)
        }
        if let Some(g) = &args.group {
            client.commit(g, &moved).await?;
        }
    }
    Ok(())
}
