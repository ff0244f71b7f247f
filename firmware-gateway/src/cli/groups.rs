//! `tributary groups list|describe|delete|reset-offsets`: consumer-group administration over
//! ListGroups, DescribeGroups, DeleteGroups, OffsetFetch, OffsetCommit and ListOffsets, with the
//! per-partition lag Kafka's `kafka-consumer-groups.sh` shows.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::bail;
use bytes::{Buf, Bytes};
use clap::{ArgGroup, Args, Subcommand};
use kafka_protocol::messages::{
    describe_groups_response::DescribedGroup, DeleteGroupsRequest, DescribeGroupsRequest, GroupId, ListGroupsRequest,
};
use kafka_protocol::protocol::StrBytes;
use serde::Serialize;

use super::client::{check, partition_keys, Client, OffsetSpec};
use super::table::{emit, opt, Table};
use super::Connection;

const NON_EMPTY_GROUP: i16 = 68;
const GROUP_ID_NOT_FOUND: i16 = 69;

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// List consumer groups with their state and member count.
    List,
    /// Members, assignments, and per partition the committed offset, high watermark and lag.
    Describe { group: String },
    /// Delete a group that has no members, with its committed offsets.
    Delete { group: String },
    /// Set a group's committed offsets of one topic (a dry run unless --execute). The group must
    /// have no members.
    ResetOffsets(ResetArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_offset"])))]
pub struct ResetArgs {
    group: String,
    /// The topic whose partitions are reset (all of them).
    #[arg(long)]
    topic: String,
    /// Each partition's log start offset.
    #[arg(long)]
    to_earliest: bool,
    /// Each partition's high watermark (skip everything so far).
    #[arg(long)]
    to_latest: bool,
    /// This offset, clamped to each partition's log start and high watermark.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(0..))]
    to_offset: Option<i64>,
    /// Commit the new offsets (without it, only show them).
    #[arg(long)]
    execute: bool,
}

pub async fn run(conn: &Connection, command: GroupsCommand) -> anyhow::Result<()> {
    let mut client = conn.connect().await?;
    match command {
        GroupsCommand::List => {
            let ids = list_ids(&mut client).await?;
            let described = describe_groups(&mut client, &ids).await?;
            let list: Vec<GroupSummary> = described
                .into_iter()
                .map(|g| GroupSummary {
                    group: g.group_id.0.to_string(),
                    state: g.group_state.to_string(),
                    members: g.members.len(),
                    protocol_type: g.protocol_type.to_string(),
                })
                .collect();
            emit(conn.format(), &list, |list| {
                let mut t = Table::new(&["GROUP", "STATE", "MEMBERS", "PROTOCOL-TYPE"]);
                for g in list {
                    t.row(vec![g.group.clone(), g.state.clone(), g.members.to_string(), g.protocol_type.clone()]);
                }
                t.render()
            })
        }
        GroupsCommand::Describe { group } => {
            let d = describe(&mut client, &group).await?;
            emit(conn.format(), &d, render_description)
        }
        GroupsCommand::Delete { group } => {
            let req = DeleteGroupsRequest::default().with_groups_names(vec![group_id(&group)]);
            let resp = client.call(&req, 0..=2).await?;
            for r in &resp.results {
                match r.error_code {
                    NON_EMPTY_GROUP => bail!("group '{group}' still has members: stop its consumers first"),
                    GROUP_ID_NOT_FOUND => bail!("group '{group}' does not exist"),
                    code => check(code, None, || format!("cannot delete group '{group}'"))?,
                }
            }
            #[derive(Debug, Serialize)]
            struct Deleted {
                group: String,
                deleted: bool,
            }
            emit(conn.format(), &Deleted { group, deleted: true }, |d| format!("deleted group '{}'\n", d.group))
        }
        GroupsCommand::ResetOffsets(args) => reset_offsets(conn, &mut client, args).await,
    }
}

fn group_id(s: &str) -> GroupId {
    GroupId(StrBytes::from_string(s.to_string()))
}

/// Every group the gateway knows, sorted.
pub async fn list_ids(client: &mut Client) -> anyhow::Result<Vec<String>> {
    // v4 and v5 add state and type filters, which we leave empty.
    let resp = client.call(&ListGroupsRequest::default(), 0..=5).await?;
    check(resp.error_code, None, || "list groups".to_string())?;
    let mut ids: Vec<String> = resp.groups.into_iter().map(|g| g.group_id.0.to_string()).collect();
    ids.sort();
    Ok(ids)
}

async fn describe_groups(client: &mut Client, ids: &[String]) -> anyhow::Result<Vec<DescribedGroup>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let req = DescribeGroupsRequest::default().with_groups(ids.iter().map(|g| group_id(g)).collect());
    // v6 (KIP-1043) changes how a missing group is reported; nothing else we need.
    let resp = client.call(&req, 0..=5).await?;
    for g in &resp.groups {
        check(g.error_code, g.error_message.as_ref(), || format!("describe group '{}'", g.group_id.0))?;
    }
    Ok(resp.groups)
}

#[derive(Debug, Serialize)]
struct GroupSummary {
    group: String,
    state: String,
    members: usize,
    protocol_type: String,
}

#[derive(Debug, Serialize)]
struct GroupDescription {
    group: String,
    state: String,
    protocol_type: String,
    /// The assignor chosen (while the group is stable).
    protocol: String,
    members: Vec<Member>,
    offsets: Vec<PartitionOffset>,
}

#[derive(Debug, Serialize)]
struct Member {
    member_id: String,
    instance_id: Option<String>,
    client_id: String,
    host: String,
    assignment: Vec<TopicPartitions>,
}

#[derive(Debug, Clone, Serialize)]
struct TopicPartitions {
    topic: String,
    partitions: Vec<i32>,
}

#[derive(Debug, Serialize)]
struct PartitionOffset {
    topic: String,
    partition: i32,
    committed: Option<i64>,
    high_watermark: Option<i64>,
    /// High watermark minus committed offset.
    lag: Option<i64>,
    /// Member id of the member the partition is assigned to.
    member: Option<String>,
    client_id: Option<String>,
}

async fn describe(client: &mut Client, group: &str) -> anyhow::Result<GroupDescription> {
    let Some(g) = describe_groups(client, &[group.to_string()]).await?.into_iter().next() else {
        bail!("the gateway did not describe group '{group}'");
    };
    let committed = client.committed(group, None).await?;
    if g.group_state.as_str() == "Dead" && committed.is_empty() {
        bail!("group '{group}' does not exist");
    }
    let consumer = g.protocol_type.as_str() == "consumer";
    let members: Vec<Member> = g
        .members
        .iter()
        .map(|m| Member {
            member_id: m.member_id.to_string(),
            instance_id: m.group_instance_id.as_ref().map(|i| i.to_string()),
            client_id: m.client_id.to_string(),
            host: m.client_host.to_string(),
            assignment: if consumer { parse_assignment(m.member_assignment.clone()) } else { Vec::new() },
        })
        .collect();
    let mut owner: BTreeMap<(String, i32), &Member> = BTreeMap::new();
    for m in &members {
        for tp in &m.assignment {
            for p in &tp.partitions {
                owner.insert((tp.topic.clone(), *p), m);
            }
        }
    }
    let keys: BTreeSet<(String, i32)> = committed.keys().chain(owner.keys()).cloned().collect();
    // High watermarks of the partitions that still exist (a group keeps offsets of deleted topics).
    let existing: BTreeSet<(String, i32)> = partition_keys(&client.metadata(None).await?.topics).into_iter().collect();
    let wanted: Vec<(String, i32)> = keys.iter().filter(|k| existing.contains(*k)).cloned().collect();
    let hw = client.list_offsets(&wanted, OffsetSpec::Latest).await?;
    let offsets = keys
        .into_iter()
        .map(|key| {
            let c = committed.get(&key).copied();
            let h = hw.get(&key).copied();
            let m = owner.get(&key);
            PartitionOffset {
                committed: c,
                high_watermark: h,
                lag: c.zip(h).map(|(c, h)| (h - c).max(0)),
                member: m.map(|m| m.member_id.clone()),
                client_id: m.map(|m| m.client_id.clone()),
                topic: key.0,
                partition: key.1,
            }
        })
        .collect();
    Ok(GroupDescription {
        group: group.to_string(),
        state: g.group_state.to_string(),
        protocol_type: g.protocol_type.to_string(),
        protocol: g.protocol_data.to_string(),
        members,
        offsets,
    })
}

fn render_description(d: &GroupDescription) -> String {
    let protocol = match (d.protocol_type.is_empty(), d.protocol.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!(", {}", d.protocol_type),
        (false, false) => format!(", {}/{}", d.protocol_type, d.protocol),
    };
    let n = d.members.len();
    let mut out =
        format!("group '{}': {}{protocol}, {n} member{}\n\n", d.group, d.state, if n == 1 { "" } else { "s" });
    if !d.members.is_empty() {
        let mut t = Table::new(&["MEMBER", "CLIENT-ID", "HOST", "ASSIGNMENT"]);
        for m in &d.members {
            let assignment: Vec<String> = m
                .assignment
                .iter()
                .map(|tp| {
                    let ps: Vec<String> = tp.partitions.iter().map(i32::to_string).collect();
                    format!("{}:{}", tp.topic, ps.join(","))
                })
                .collect();
            t.row(vec![m.member_id.clone(), m.client_id.clone(), m.host.clone(), assignment.join(" ")]);
        }
        out.push_str(&t.render());
        out.push('\n');
    }
    let mut t = Table::new(&["TOPIC", "PARTITION", "COMMITTED", "HIGH-WATERMARK", "LAG", "MEMBER", "CLIENT-ID"]);
    for o in &d.offsets {
        t.row(vec![
            o.topic.clone(),
            o.partition.to_string(),
            opt(o.committed),
            opt(o.high_watermark),
            opt(o.lag),
            opt(o.member.as_deref()),
            opt(o.client_id.as_deref()),
        ]);
    }
    out.push_str(&t.render());
    out
}

/// Topics and partitions of a ConsumerProtocolAssignment (any version: they all begin with the
/// version and the topic array). Malformed input yields what could be read, nothing more: the
/// counts are checked against the bytes left before anything is allocated.
fn parse_assignment(mut b: Bytes) -> Vec<TopicPartitions> {
    let mut out = Vec::new();
    if b.remaining() < 6 {
        return out;
    }
    b.advance(2); // version
    let topics = b.get_i32();
    for _ in 0..topics.max(0) {
        if b.remaining() < 2 {
            break;
        }
        let len = usize::try_from(b.get_i16()).unwrap_or(0);
        if b.remaining() < len + 4 {
            break;
        }
        let topic = String::from_utf8_lossy(&b.split_to(len)).into_owned();
        let count = usize::try_from(b.get_i32()).unwrap_or(0);
        if b.remaining() < count.saturating_mul(4) {
            break;
        }
        let partitions = (0..count).map(|_| b.get_i32()).collect();
        out.push(TopicPartitions { topic, partitions });
    }
    out
}

#[derive(Debug, Serialize)]
struct Reset {
    group: String,
    topic: String,
    /// Whether the offsets were committed (`--execute`) or only shown.
    executed: bool,
    partitions: Vec<ResetPartition>,
}

#[derive(Debug, Serialize)]
struct ResetPartition {
    partition: i32,
    current: Option<i64>,
    new: i64,
}

async fn reset_offsets(conn: &Connection, client: &mut Client, args: ResetArgs) -> anyhow::Result<()> {
    let group = &args.group;
    if let Some(g) = describe_groups(client, std::slice::from_ref(group)).await?.first() {
        let state = g.group_state.as_str();
        if !g.members.is_empty() || !matches!(state, "Empty" | "Dead") {
            bail!(
                "group '{group}' is {state} with {} member(s): offsets can be reset only while it has no members \
                 (stop its consumers first)",
                g.members.len()
            );
        }
    }
    let topic = client.topic(&args.topic).await?;
    let current = client.committed(group, Some(std::slice::from_ref(&topic))).await?;
    let watermarks = client.watermarks(&partition_keys(std::slice::from_ref(&topic))).await?;
    let mut new = BTreeMap::new();
    for (key, &(lo, hi)) in &watermarks {
        let target = match args.to_offset {
            Some(n) => n.clamp(lo, hi.max(lo)),
            None if args.to_earliest => lo,
            None => hi,
        };
        new.insert(key.clone(), target);
    }
    if args.execute {
        client.commit(group, &new).await?;
    }
    let reset = Reset {
        group: group.clone(),
        topic: topic.name.clone(),
        executed: args.execute,
        partitions: new
            .iter()
            .map(|(key, n)| ResetPartition { partition: key.1, current: current.get(key).copied(), new: *n })
            .collect(),
    };
    emit(conn.format(), &reset, |r| {
        let mut t = Table::new(&["TOPIC", "PARTITION", "CURRENT", "NEW"]);
        for p in &r.partitions {
            t.row(vec![r.topic.clone(), p.partition.to_string(), opt(p.current), p.new.to_string()]);
        }
        t.render()
    })?;
    if args.execute {
        eprintln!("committed the new offsets of group '{group}'");
    } else {
        eprintln!("dry run: nothing changed; add --execute to commit these offsets");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_is_parsed_and_bad_counts_stop_the_parse() {
        let mut b = vec![0, 1, 0, 0, 0, 1, 0, 2, b'a', b'b', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3];
        b.extend_from_slice(&[0, 0, 0, 0]); // user data: empty
        let parsed = parse_assignment(Bytes::from(b));
        assert_eq!(parsed.len(), 1);
        assert_eq!((parsed[0].topic.as_str(), parsed[0].partitions.as_slice()), ("ab", &[0, 3][..]));
        let huge = vec![0, 1, 0x7f, 0xff, 0xff, 0xff, 0, 1, b'x', 0x7f, 0xff, 0xff, 0xff];
        assert!(parse_assignment(Bytes::from(huge)).is_empty());
    }
}
