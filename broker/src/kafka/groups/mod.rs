//! Consumer groups with this node as coordinator (Kafka's classic group protocol): membership,
//! generations and rebalances (Empty -> PreparingRebalance -> CompletingRebalance -> Stable),
//! session and rebalance timeouts, static membership, and committed offsets kept durably in the
//! store's `spaces::GROUP_OFFSETS` space. Membership lives in memory only (bounded by
//! `groups_max` and `group_members_max`, and what members make it hold, their protocol metadata
//! and assignments, by `group_member_metadata_bytes_max` each and `groups_metadata_bytes_max` in
//! all); committed offsets survive restarts. Store reads run on the blocking pool, not on an
//! async worker.
//!
//! This file is the coordinator: the group map, its lock, timers and the store I/O; `state.rs` is
//! a group's state machine, fed with `now`; `offsets.rs` the committed offsets; `protocol.rs` the
//! consumer protocol inside join metadata. The coordinator speaks in Kafka error codes (`i16`,
//! from `super::errors`) because its only client is the Kafka front end; it knows nothing of the
//! wire encoding.

mod offsets;
mod protocol;
mod state;

pub use offsets::{
    offset_entry, AllCommitted, CommitHook, CommittedOffset, CommittedPartition, OffsetToCommit, PartitionLag,
};
use offsets::{offset_key_prefix, parse_offset_key};
use protocol::subscribed_topics;
use state::{check_member, expire, owned, protocols_bytes, Group, Member};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::errors as ec;
use crate::spaces;
use crate::storage::accounting::debit;
use crate::storage::clock::now_ms;
use crate::storage::Store;

/// What the checked accounting of `Coordinator::held` names when it finds a bug.
const HELD: &str = "group metadata bytes held (kafka.groups_metadata_bytes_max)";

/// Limits of the coordinator (from `[kafka]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    pub groups_max: u32,
    pub members_max: u32,
    pub session_timeout_min_ms: u32,
    pub session_timeout_max_ms: u32,
    pub offset_metadata_bytes_max: u32,
    /// What one member may make the coordinator hold: protocol metadata, assignment and ids.
    pub member_metadata_bytes_max: u32,
    /// The same for all members of all groups together.
    pub metadata_bytes_max: u64,
    /// Kafka's `group.initial.rebalance.delay.ms`: how long the first join of an Empty group
    /// waits for more members (extended per new member up to the rebalance timeout); 0 = off.
    pub initial_rebalance_delay_ms: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

/// A JoinGroup request: its body as `kafka/requests.rs` decodes it, and the client id (from the
/// request header) and host (the peer's address) the API adds.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub group_id: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    pub client_id: String,
    pub client_host: String,
    /// JoinGroup v4+: a new member first gets MEMBER_ID_REQUIRED with its id.
    pub require_known_member_id: bool,
}

/// A member as the leader sees it in the JoinGroup response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedMember {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub metadata: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinResponse {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// All members for the leader, empty for the others.
    pub members: Vec<JoinedMember>,
}

impl JoinResponse {
    fn error(error: i16, member_id: &str) -> Self {
        Self {
            error,
            generation: -1,
            protocol_type: None,
            protocol: None,
            leader: String::new(),
            member_id: member_id.to_string(),
            members: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncResponse {
    pub error: i16,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub assignment: Bytes,
}

impl SyncResponse {
    fn error(error: i16) -> Self {
        Self { error, protocol_type: None, protocol: None, assignment: Bytes::new() }
    }
}

/// A member as a LeaveGroup request names it: by id, or by static instance id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberIdentity {
    pub member_id: String,
    pub instance_id: Option<String>,
}

/// A group as DescribeGroups shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub error: i16,
    pub group_id: String,
    pub state: String,
    pub protocol_type: String,
    pub protocol: String,
    pub members: Vec<MemberDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
}

/// The group coordinator. Cheap to share behind an `Arc`; `run_timers` must run for session
/// expiry and rebalance deadlines to take effect.
#[derive(Debug)]
pub struct Coordinator {
    store: Store,
    limits: GroupLimits,
    groups: Mutex<HashMap<String, Group>>,
    /// Bytes all members hold (the sum of the groups' `held`); changed only under `groups`' lock,
    /// with checked arithmetic (`HELD`).
    held: AtomicU64,
    wake: Notify,
    /// Called after each durable commit (`set_commit_hook`).
    commit_hook: offsets::HookSlot,
}

fn new_member_id(prefix: &str) -> String {
    let r: u128 = rand::random();
    let prefix: String = prefix.chars().take(64).collect();
    format!("{}-{:032x}", if prefix.is_empty() { "member" } else { &prefix }, r)
}

enum Joined {
    Now(JoinResponse),
    Wait(oneshot::Receiver<JoinResponse>),
}

impl Coordinator {
    /// Creates the coordinator; groups with committed offsets are known from the start.
    pub fn new(store: Store, limits: GroupLimits) -> Result<Arc<Self>, crate::error::StoreError> {
        let mut groups = HashMap::new();
        let mut prefix_from: Vec<u8> = Vec::new();
        // One key per group is enough: after each group, continue past its prefix.
        while groups.len() < limits.groups_max as usize {
            let Some((k, _)) = store.kv_scan_from(spaces::GROUP_OFFSETS, &prefix_from, 1)?.into_iter().next() else {
                break;
            };
            let Some((group, _, _)) = parse_offset_key(&k) else { break };
            let mut next = offset_key_prefix(&group);
            next.push(0xff);
            next.push(0xff);
            prefix_from = next;
            let mut g = Group::new();
            g.has_offsets = true;
            groups.insert(group, g);
        }
        Ok(Arc::new(Self {
            store,
            limits,
            groups: Mutex::new(groups),
            held: AtomicU64::new(0),
            wake: Notify::new(),
            commit_hook: offsets::HookSlot::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        // A panic while holding the lock would be a bug; the state is still usable.
        self.groups.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Brings a group's share of the bytes members hold up to date after it changed (called with
    /// the groups locked, so the total is never read half-updated).
    fn refresh(&self, g: &mut Group) {
        let now = g.held_bytes();
        let total = self.held.load(Ordering::Relaxed);
        let total = if now >= g.held { total + (now - g.held) } else { debit(total, g.held - now, HELD) };
        self.held.store(total, Ordering::Relaxed);
        g.held = now;
    }

    /// Session expiry and rebalance deadlines; runs until the process ends.
    pub async fn run_timers(self: Arc<Self>) {
        loop {
            let next = {
                let mut groups = self.lock();
                let now = Instant::now();
                let mut next: Option<Instant> = None;
                groups.retain(|id, g| {
                    expire(g, id, now);
                    g.maybe_complete_join(now, id);
                    self.refresh(g);
                    if let Some(d) = g.next_deadline() {
                        next = Some(next.map_or(d, |n| n.min(d)));
                    }
                    // Forget groups with neither members nor offsets.
                    !(g.state == GroupState::Empty && g.members.is_empty() && g.pending.is_empty() && !g.has_offsets)
                });
                next
            };
            let sleep_until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                () = tokio::time::sleep_until(sleep_until) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    pub async fn join(&self, mut req: JoinRequest) -> JoinResponse {
        // What the member will make us hold (a new member's id is at most ~100 bytes), checked
        // before anything is copied.
        let wanted = (protocols_bytes(&req.protocols)
            + req.member_id.len().max(100)
            + req.instance_id.as_ref().map_or(0, String::len)
            + req.client_id.len()
            + req.client_host.len()) as u64;
        if wanted > u64::from(self.limits.member_metadata_bytes_max) {
            tracing::warn!(
                group = %req.group_id,
                bytes = wanted,
                limit = self.limits.member_metadata_bytes_max,
                "kafka.group_member_metadata_bytes_max: join refused (protocol metadata too large)"
            );
            return JoinResponse::error(ec::GROUP_MAX_SIZE_REACHED, &req.member_id);
        }
        req.protocols = owned(req.protocols);
        let member_id = req.member_id.clone();
        let joined = {
            let mut groups = self.lock();
            let group_id = req.group_id.clone();
            let joined = self.join_locked(&mut groups, req, wanted);
            if let Some(g) = groups.get_mut(&group_id) {
                self.refresh(g);
            }
            joined
        };
        self.wake.notify_one();
        match joined {
            Joined::Now(r) => r,
            Joined::Wait(rx) => rx.await.unwrap_or_else(|_| JoinResponse::error(ec::REBALANCE_IN_PROGRESS, &member_id)),
        }
    }

    /// A join, with the groups locked; `wanted` = the bytes the member will hold.
    fn join_locked(&self, groups: &mut HashMap<String, Group>, req: JoinRequest, wanted: u64) -> Joined {
        let err = |e| Joined::Now(JoinResponse::error(e, &req.member_id));
        if req.group_id.is_empty() {
            return err(ec::INVALID_GROUP_ID);
        }
        let l = &self.limits;
        if req.session_timeout_ms < l.session_timeout_min_ms as i32
            || req.session_timeout_ms > l.session_timeout_max_ms as i32
        {
            return err(ec::INVALID_SESSION_TIMEOUT);
        }
        if req.protocol_type.is_empty() || req.protocols.is_empty() {
            return err(ec::INCONSISTENT_GROUP_PROTOCOL);
        }
        let now = Instant::now();
        // The member's old metadata (if it is one) is replaced, not added to.
        let replaced = groups
            .get(&req.group_id)
            .map(|g| {
                g.members
                    .iter()
                    .filter(|m| {
                        m.id == req.member_id || (req.instance_id.is_some() && m.instance_id == req.instance_id)
                    })
                    .map(Member::held_bytes)
                    .sum::<u64>()
            })
            .unwrap_or(0);
        let held = self.held.load(Ordering::Relaxed);
        if debit(held, replaced, HELD) + wanted > l.metadata_bytes_max {
            tracing::warn!(
                group = %req.group_id,
                held,
                limit = l.metadata_bytes_max,
                "kafka.groups_metadata_bytes_max reached: join refused"
            );
            return err(ec::GROUP_MAX_SIZE_REACHED);
        }

        if !groups.contains_key(&req.group_id) && groups.len() >= l.groups_max as usize {
            tracing::warn!(group = %req.group_id, limit = l.groups_max, "kafka.groups_max reached: join refused");
            return err(ec::GROUP_MAX_SIZE_REACHED);
        }
        let g = groups.entry(req.group_id.clone()).or_insert_with(Group::new);
        // The protocol type must match and the protocols must overlap with the current members'.
        if !g.members.is_empty() {
            let common = g.common_protocols();
            if g.protocol_type.as_deref() != Some(req.protocol_type.as_str())
                || !req.protocols.iter().any(|(n, _)| common.contains(n))
            {
                return err(ec::INCONSISTENT_GROUP_PROTOCOL);
            }
        }
        let session_timeout = Duration::from_millis(req.session_timeout_ms.max(0) as u64);
        let rebalance_timeout =
            Duration::from_millis(req.rebalance_timeout_ms.max(req.session_timeout_ms).max(0) as u64);
        let mut member_id = req.member_id.clone();
        let by_instance = req
            .instance_id
            .as_ref()
            .and_then(|i| g.members.iter().find(|m| m.instance_id.as_ref() == Some(i)).map(|m| m.id.clone()));

        if member_id.is_empty() {
            if let (Some(old), Some(instance)) = (&by_instance, &req.instance_id) {
                // A static member came back: it takes over its old membership under a new id; the
                // old id is fenced from now on.
                let new_id = new_member_id(instance);
                let current_leader = g.leader.clone().unwrap_or_default();
                let was_leader = g.leader.as_deref() == Some(old.as_str());
                if let Some(m) = g.member(old) {
                    m.id = new_id.clone();
                    m.last_seen = now;
                    m.session_timeout = session_timeout;
                    m.rebalance_timeout = rebalance_timeout;
                    m.protocols = req.protocols.clone();
                    m.client_id = req.client_id.clone();
                    m.client_host = req.client_host.clone();
                }
                if was_leader {
                    g.leader = Some(new_id.clone());
                }
                // As Kafka decides: a rebalance only if the protocol the group would select
                // changes. The metadata itself may differ (a restarted consumer owns nothing
                // yet); the member's new metadata is kept for the next rebalance.
                let same = g.common_protocols().into_iter().next() == g.protocol;
                if g.state == GroupState::Stable && same {
                    // KIP-345: no rebalance, the leader included. As Kafka answers (JoinGroup up
                    // to v8), the reply names the leader as it was, by its old id: a restarted
                    // leader then does not take itself for the leader and compute an assignment
                    // that a Stable group would not hand out; the group knows it by its new id.
                    return Joined::Now(JoinResponse {
                        error: ec::NONE,
                        generation: g.generation,
                        protocol_type: g.protocol_type.clone(),
                        protocol: g.protocol.clone(),
                        leader: current_leader,
                        member_id: new_id,
                        members: Vec::new(),
                    });
                }
                member_id = new_id;
            } else {
                member_id = new_member_id(req.instance_id.as_deref().unwrap_or(&req.client_id));
                if req.require_known_member_id && req.instance_id.is_none() {
                    if g.pending.len() >= l.members_max as usize {
                        return err(ec::GROUP_MAX_SIZE_REACHED);
                    }
                    g.pending.insert(member_id.clone(), now + session_timeout);
                    return Joined::Now(JoinResponse::error(ec::MEMBER_ID_REQUIRED, &member_id));
                }
            }
        } else if g.pending.remove(&member_id).is_none() && g.member(&member_id).is_none() {
            return err(if by_instance.is_some() { ec::FENCED_INSTANCE_ID } else { ec::UNKNOWN_MEMBER_ID });
        } else if let (Some(old), Some(_)) = (&by_instance, &req.instance_id) {
            if *old != member_id {
                return err(ec::FENCED_INSTANCE_ID);
            }
        }

        let (tx, rx) = oneshot::channel();
        match g.member(&member_id) {
            Some(m) => {
                let unchanged = m.protocols == req.protocols;
                m.last_seen = now;
                m.session_timeout = session_timeout;
                m.rebalance_timeout = rebalance_timeout;
                m.protocols = req.protocols.clone();
                let is_leader = g.leader.as_deref() == Some(member_id.as_str());
                if matches!(g.state, GroupState::Stable | GroupState::CompletingRebalance) && unchanged && !is_leader {
                    // A follower asking again: nothing changed, same generation.
                    return Joined::Now(JoinResponse {
                        error: ec::NONE,
                        generation: g.generation,
                        protocol_type: g.protocol_type.clone(),
                        protocol: g.protocol.clone(),
                        leader: g.leader.clone().unwrap_or_default(),
                        member_id,
                        members: Vec::new(),
                    });
                }
                if let Some(m) = g.member(&member_id) {
                    m.join_waiter = Some(tx);
                }
            }
            None => {
                if g.members.len() >= l.members_max as usize {
                    tracing::warn!(group = %req.group_id, limit = l.members_max, "kafka.group_members_max reached: join refused");
                    return err(ec::GROUP_MAX_SIZE_REACHED);
                }
                if g.members.is_empty() {
                    g.protocol_type = Some(req.protocol_type.clone());
                }
                g.members.push(Member {
                    id: member_id.clone(),
                    instance_id: req.instance_id.clone(),
                    client_id: req.client_id.clone(),
                    client_host: req.client_host.clone(),
                    session_timeout,
                    rebalance_timeout,
                    protocols: req.protocols.clone(),
                    last_seen: now,
                    join_waiter: Some(tx),
                    sync_waiter: None,
                    assignment: Bytes::new(),
                });
                g.new_member_joined();
            }
        }
        g.prepare_rebalance(now, Duration::from_millis(u64::from(l.initial_rebalance_delay_ms)));
        g.maybe_complete_join(now, &req.group_id);
        Joined::Wait(rx)
    }

    pub async fn sync(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
        assignments: Vec<(String, Bytes)>,
    ) -> SyncResponse {
        let rx = {
            let mut groups = self.lock();
            let Some(g) = groups.get_mut(group_id) else { return SyncResponse::error(ec::UNKNOWN_MEMBER_ID) };
            if let Some(e) = check_member(g, member_id, instance_id) {
                return SyncResponse::error(e);
            }
            if generation != g.generation {
                return SyncResponse::error(ec::ILLEGAL_GENERATION);
            }
            let reply = |g: &Group, assignment: Bytes| SyncResponse {
                error: ec::NONE,
                protocol_type: g.protocol_type.clone(),
                protocol: g.protocol.clone(),
                assignment,
            };
            match g.state {
                GroupState::Empty => return SyncResponse::error(ec::UNKNOWN_MEMBER_ID),
                GroupState::PreparingRebalance => return SyncResponse::error(ec::REBALANCE_IN_PROGRESS),
                GroupState::Stable => {
                    let a = g.member(member_id).map(|m| m.assignment.clone()).unwrap_or_default();
                    return reply(g, a);
                }
                GroupState::CompletingRebalance => {}
            }
            let now = Instant::now();
            if g.leader.as_deref() == Some(member_id) {
                let mut assignments: HashMap<String, Bytes> =
                    assignments.into_iter().map(|(m, a)| (m, Bytes::copy_from_slice(&a))).collect();
                // Every member's assignment must fit its share, and all of them the total.
                let l = &self.limits;
                let mut grown = 0u64;
                for m in &g.members {
                    let new = assignments.get(&m.id).map_or(0, Bytes::len) as u64;
                    if m.held_bytes() - m.assignment.len() as u64 + new > u64::from(l.member_metadata_bytes_max) {
                        tracing::warn!(
                            group = group_id,
                            member = %m.id,
                            bytes = new,
                            limit = l.member_metadata_bytes_max,
                            "kafka.group_member_metadata_bytes_max: assignment refused"
                        );
                        return SyncResponse::error(ec::INVALID_REQUEST);
                    }
                    grown += new.saturating_sub(m.assignment.len() as u64);
                }
                let held = self.held.load(Ordering::Relaxed);
                if held + grown > l.metadata_bytes_max {
                    tracing::warn!(
                        group = group_id,
                        held,
                        limit = l.metadata_bytes_max,
                        "kafka.groups_metadata_bytes_max reached: assignment refused"
                    );
                    return SyncResponse::error(ec::INVALID_REQUEST);
                }
                for m in &mut g.members {
                    m.assignment = assignments.remove(&m.id).unwrap_or_default();
                    m.last_seen = now;
                }
                g.state = GroupState::Stable;
                let (pt, p) = (g.protocol_type.clone(), g.protocol.clone());
                for m in &mut g.members {
                    if let Some(w) = m.sync_waiter.take() {
                        let _ = w.send(SyncResponse {
                            error: ec::NONE,
                            protocol_type: pt.clone(),
                            protocol: p.clone(),
                            assignment: m.assignment.clone(),
                        });
                    }
                }
                tracing::debug!(group = group_id, generation = g.generation, "rebalance: stable");
                self.refresh(g);
                let a = g.member(member_id).map(|m| m.assignment.clone()).unwrap_or_default();
                return reply(g, a);
            }
            let (tx, rx) = oneshot::channel();
            if let Some(m) = g.member(member_id) {
                m.sync_waiter = Some(tx);
                m.last_seen = now;
            }
            rx
        };
        self.wake.notify_one();
        rx.await.unwrap_or_else(|_| SyncResponse::error(ec::REBALANCE_IN_PROGRESS))
    }

    pub fn heartbeat(&self, group_id: &str, generation: i32, member_id: &str, instance_id: Option<&str>) -> i16 {
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(group_id) else { return ec::UNKNOWN_MEMBER_ID };
        if let Some(e) = check_member(g, member_id, instance_id) {
            return e;
        }
        if let Some(m) = g.member(member_id) {
            m.last_seen = Instant::now();
        }
        match g.state {
            GroupState::Empty => ec::UNKNOWN_MEMBER_ID,
            GroupState::PreparingRebalance => ec::REBALANCE_IN_PROGRESS,
            _ if generation != g.generation => ec::ILLEGAL_GENERATION,
            _ => ec::NONE,
        }
    }

    /// Removes members (by member id, or by instance id when the member id is empty); one error
    /// code per member, and the group-level one.
    pub fn leave(&self, group_id: &str, members: &[MemberIdentity]) -> (i16, Vec<i16>) {
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(group_id) else {
            return (ec::UNKNOWN_MEMBER_ID, vec![ec::UNKNOWN_MEMBER_ID; members.len()]);
        };
        let now = Instant::now();
        let mut errors = Vec::with_capacity(members.len());
        for MemberIdentity { member_id, instance_id } in members {
            let id = if member_id.is_empty() {
                instance_id
                    .as_ref()
                    .and_then(|i| g.members.iter().find(|m| m.instance_id.as_ref() == Some(i)).map(|m| m.id.clone()))
            } else {
                Some(member_id.clone())
            };
            match id {
                Some(id) if g.members.iter().any(|m| m.id == id) => {
                    if let Some(e) = check_member(g, &id, instance_id.as_deref()) {
                        errors.push(e);
                        continue;
                    }
                    g.remove_member(&id, now, group_id);
                    tracing::debug!(group = group_id, member = %id, "member left");
                    errors.push(ec::NONE);
                }
                _ => errors.push(ec::UNKNOWN_MEMBER_ID),
            }
        }
        self.refresh(g);
        drop(groups);
        self.wake.notify_one();
        let top = if members.len() == 1 { errors[0] } else { ec::NONE };
        (top, errors)
    }

    /// Validates an offset commit's membership; `None` = allowed.
    fn commit_allowed(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Option<i16> {
        let mut groups = self.lock();
        if !groups.contains_key(group_id) && groups.len() >= self.limits.groups_max as usize {
            return Some(ec::GROUP_MAX_SIZE_REACHED);
        }
        let g = groups.entry(group_id.to_string()).or_insert_with(Group::new);
        if generation < 0 && g.members.is_empty() {
            return None;
        }
        if g.state == GroupState::CompletingRebalance {
            return Some(ec::REBALANCE_IN_PROGRESS);
        }
        if let Some(e) = check_member(g, member_id, instance_id) {
            return Some(e);
        }
        if generation != g.generation {
            return Some(ec::ILLEGAL_GENERATION);
        }
        if let Some(m) = g.member(member_id) {
            m.last_seen = Instant::now();
        }
        None
    }

    /// (group id, protocol type, state) of every known group.
    pub fn list(&self) -> Vec<(String, String, GroupState)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, g)| (id.clone(), g.protocol_type.clone().unwrap_or_default(), g.state))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn describe(&self, group_id: &str) -> GroupDescription {
        let groups = self.lock();
        let Some(g) = groups.get(group_id) else {
            return GroupDescription {
                error: ec::NONE,
                group_id: group_id.to_string(),
                state: "Dead".into(),
                protocol_type: String::new(),
                protocol: String::new(),
                members: Vec::new(),
            };
        };
        let stable = g.state == GroupState::Stable;
        GroupDescription {
            error: ec::NONE,
            group_id: group_id.to_string(),
            state: g.state.name().into(),
            protocol_type: g.protocol_type.clone().unwrap_or_default(),
            protocol: if stable { g.protocol.clone().unwrap_or_default() } else { String::new() },
            members: g
                .members
                .iter()
                .map(|m| MemberDescription {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: if stable {
                        m.protocols
                            .iter()
                            .find(|(n, _)| Some(n) == g.protocol.as_ref())
                            .map(|(_, b)| b.clone())
                            .unwrap_or_default()
                    } else {
                        Bytes::new()
                    },
                    assignment: if stable { m.assignment.clone() } else { Bytes::new() },
                })
                .collect(),
        }
    }

    /// Deletes empty groups and their offsets.
    pub async fn delete_group(&self, group_id: &str) -> i16 {
        {
            let groups = self.lock();
            match groups.get(group_id) {
                None => return ec::GROUP_ID_NOT_FOUND,
                Some(g) if !g.members.is_empty() => return ec::NON_EMPTY_GROUP,
                Some(_) => {}
            }
        }
        match self.delete_offsets(group_id, |_, _| true).await {
            Ok(_) => {
                if let Some(g) = self.lock().remove(group_id) {
                    // Empty when checked above; a member that joined meanwhile is gone with it.
                    let total = debit(self.held.load(Ordering::Relaxed), g.held, HELD);
                    self.held.store(total, Ordering::Relaxed);
                }
                tracing::info!(group = group_id, "group deleted");
                ec::NONE
            }
            Err(e) => ec::code(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::offsets::{decode_offset, encode_offset, offset_key};
    use super::*;
    use crate::config::StorageConfig;

    /// An offset of topic `t` to commit.
    fn to_commit(partition: i32, offset: i64, metadata: Option<String>) -> OffsetToCommit {
        OffsetToCommit { topic: "t".into(), partition, offset, leader_epoch: -1, metadata }
    }

    fn store(dir: &std::path::Path) -> Store {
        let cfg = StorageConfig { data_dir: dir.to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() };
        Store::open(cfg).expect("open").0
    }

    fn limits() -> GroupLimits {
        GroupLimits {
            groups_max: 10,
            members_max: 3,
            session_timeout_min_ms: 100,
            session_timeout_max_ms: 60_000,
            offset_metadata_bytes_max: 16,
            member_metadata_bytes_max: 1024,
            metadata_bytes_max: 2048,
            initial_rebalance_delay_ms: 0,
        }
    }

    fn join_req(member_id: &str, instance: Option<&str>, session_ms: i32) -> JoinRequest {
        JoinRequest {
            group_id: "g".into(),
            session_timeout_ms: session_ms,
            rebalance_timeout_ms: session_ms,
            member_id: member_id.into(),
            instance_id: instance.map(str::to_string),
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(b"meta"))],
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            require_known_member_id: true,
        }
    }

    /// Joins with an empty id (MEMBER_ID_REQUIRED), then with the id; returns the member id.
    async fn first_join(c: &Arc<Coordinator>) -> String {
        let r = c.join(join_req("", None, 1000)).await;
        assert_eq!(r.error, ec::MEMBER_ID_REQUIRED);
        r.member_id
    }

    #[tokio::test(start_paused = true)]
    async fn rebalance_two_members_and_expire_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Coordinator::new(store(dir.path()), limits()).expect("coordinator");
        tokio::spawn(c.clone().run_timers());
        let a = first_join(&c).await;
        let r = c.join(join_req(&a, None, 1000)).await;
        assert_eq!((r.error, r.generation, r.leader.as_str(), r.members.len()), (ec::NONE, 1, a.as_str(), 1));
        let s = c.sync("g", 1, &a, None, vec![(a.clone(), Bytes::from_static(b"all"))]).await;
        assert_eq!((s.error, &s.assignment[..]), (ec::NONE, &b"all"[..]));
        assert_eq!(c.describe("g").state, "Stable");

        // B joins: the group rebalances; A learns it from its heartbeat and rejoins.
        let b = first_join(&c).await;
        let (c2, b2) = (c.clone(), b.clone());
        let b_join = tokio::spawn(async move { c2.join(join_req(&b2, None, 1000)).await });
        tokio::task::yield_now().await;
        assert_eq!(c.heartbeat("g", 1, &a, None), ec::REBALANCE_IN_PROGRESS);
        assert_eq!(c.sync("g", 1, &a, None, vec![]).await.error, ec::REBALANCE_IN_PROGRESS);
        let ra = c.join(join_req(&a, None, 1000)).await;
        let rb = b_join.await.expect("join task");
        assert_eq!((ra.generation, rb.generation), (2, 2));
        assert_eq!((ra.members.len(), rb.members.len()), (2, 0), "only the leader sees the members");
        assert_eq!(rb.leader, a);
        assert_eq!(c.sync("g", 1, &a, None, vec![]).await.error, ec::ILLEGAL_GENERATION, "old generation");
        let (c3, b3) = (c.clone(), b.clone());
        let b_sync = tokio::spawn(async move { c3.sync("g", 2, &b3, None, vec![]).await });
        tokio::task::yield_now().await;
        let assignments = vec![(a.clone(), Bytes::from_static(b"p0")), (b.clone(), Bytes::from_static(b"p1"))];
        assert_eq!(&c.sync("g", 2, &a, None, assignments).await.assignment[..], b"p0");
        assert_eq!(&b_sync.await.expect("sync task").assignment[..], b"p1", "followers wait for the leader");

        // B goes silent: after its session timeout it is removed and A rebalances alone.
        let mut beats = 0;
        while c.heartbeat("g", 2, &a, None) == ec::NONE {
            tokio::time::sleep(Duration::from_millis(100)).await;
            beats += 1;
            assert!(beats < 100, "B never expired");
        }
        assert!(beats >= 9, "B was removed only after its 1 s session timeout ({beats} beats)");
        let r = c.join(join_req(&a, None, 1000)).await;
        assert_eq!((r.generation, r.members.len()), (3, 1));
        assert_eq!(c.heartbeat("g", 2, &b, None), ec::UNKNOWN_MEMBER_ID);
        let (top, _) = c.leave("g", &[MemberIdentity { member_id: a.clone(), instance_id: None }]);
        assert_eq!(top, ec::NONE);
        assert_eq!(c.describe("g").state, "Empty");
    }

    #[tokio::test]
    async fn protocol_metadata_is_copied_and_bounded_per_member_and_in_total() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Coordinator::new(store(dir.path()), limits()).expect("coordinator");
        let join = |group: &str, member: &str, metadata: &Bytes| JoinRequest {
            group_id: group.into(),
            protocols: vec![("range".into(), metadata.clone())],
            require_known_member_id: false,
            ..join_req(member, None, 1000)
        };
        // Over one member's bound (1024 bytes with its ids).
        let r = c.join(join("g0", "", &Bytes::from(vec![0u8; 1000]))).await;
        assert_eq!(r.error, ec::GROUP_MAX_SIZE_REACHED);
        // 900 bytes each: two members fit the 2048-byte total, a third does not.
        let big = Bytes::from(vec![7u8; 900]);
        let a = c.join(join("g1", "", &big)).await;
        assert_eq!(a.error, ec::NONE);
        assert_eq!(a.members[0].metadata, big);
        assert_ne!(a.members[0].metadata.as_ptr(), big.as_ptr(), "a copy, not a slice of the request");
        let b = c.join(join("g2", "", &big)).await;
        assert_eq!(b.error, ec::NONE);
        assert_eq!(c.join(join("g3", "", &big)).await.error, ec::GROUP_MAX_SIZE_REACHED, "total reached");
        // A member joining again replaces its metadata: it is not counted twice.
        assert_eq!(c.join(join("g1", &a.member_id, &big)).await.error, ec::NONE);
        // An assignment counts against the member's bound too.
        let too_big = vec![(b.member_id.clone(), Bytes::from(vec![1u8; 200]))];
        assert_eq!(c.sync("g2", b.generation, &b.member_id, None, too_big).await.error, ec::INVALID_REQUEST);
        let fits = vec![(b.member_id.clone(), Bytes::from(vec![1u8; 20]))];
        assert_eq!(c.sync("g2", b.generation, &b.member_id, None, fits).await.error, ec::NONE);
        // Once a member leaves, its bytes are free again.
        assert_eq!(c.leave("g1", &[MemberIdentity { member_id: a.member_id.clone(), instance_id: None }]).0, ec::NONE);
        assert_eq!(c.join(join("g3", "", &big)).await.error, ec::NONE);
        // The running total is what the members hold.
        let held: u64 = c.lock().values().map(Group::held_bytes).sum();
        assert_eq!(c.held.load(Ordering::Relaxed), held);
        assert_eq!(
            held,
            2 * 950 + 20,
            "two members with 900 bytes of metadata, 34-byte ids and host names, one assignment"
        );
    }

    /// The running total of member bytes is checked accounting: a total found below what a
    /// group gives back is a bookkeeping bug, and a debug build stops at it (an unchecked
    /// `fetch_sub` would wrap to ~2^64 and refuse every join; a saturating one would hide it).
    #[tokio::test]
    #[should_panic(expected = "goes below zero")]
    async fn a_held_total_below_a_groups_share_stops_a_debug_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Coordinator::new(store(dir.path()), limits()).expect("coordinator");
        let a = first_join(&c).await;
        assert_eq!(c.join(join_req(&a, None, 1000)).await.error, ec::NONE);
        assert!(c.held.load(Ordering::Relaxed) > 0);
        c.held.store(0, Ordering::Relaxed); // the bug: the total lost the group's share
        c.leave("g", &[MemberIdentity { member_id: a, instance_id: None }]);
    }

    #[tokio::test]
    async fn refusals_carry_the_right_codes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Coordinator::new(store(dir.path()), limits()).expect("coordinator");
        assert_eq!(c.join(join_req("", None, 50)).await.error, ec::INVALID_SESSION_TIMEOUT);
        assert_eq!(c.join(join_req("nobody", None, 1000)).await.error, ec::UNKNOWN_MEMBER_ID);
        let mut bad = join_req("", None, 1000);
        bad.group_id = String::new();
        assert_eq!(c.join(bad).await.error, ec::INVALID_GROUP_ID);
        let a = first_join(&c).await;
        assert_eq!(c.join(join_req(&a, None, 1000)).await.error, ec::NONE);
        let mut other = join_req("", None, 1000);
        other.protocol_type = "connect".into();
        other.require_known_member_id = false;
        assert_eq!(c.join(other).await.error, ec::INCONSISTENT_GROUP_PROTOCOL);
        assert_eq!(c.heartbeat("g", 1, "stranger", None), ec::UNKNOWN_MEMBER_ID);
        assert_eq!(c.heartbeat("g", 7, &a, None), ec::ILLEGAL_GENERATION);
        // Members are bounded: the limit is 3 and A is one.
        for _ in 0..3 {
            let _ = c.join(join_req("", None, 1000)).await;
        }
        assert_eq!(c.join(join_req("", None, 1000)).await.error, ec::GROUP_MAX_SIZE_REACHED, "pending ids count too");
    }

    #[tokio::test]
    async fn static_member_rejoins_without_rebalance_and_fences_its_old_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Coordinator::new(store(dir.path()), limits()).expect("coordinator");
        let a = c.join(join_req("", Some("meter-a"), 1000));
        let a = a.await;
        assert_eq!(a.error, ec::NONE, "static members get their id at once");
        let mut breq = join_req("", Some("meter-b"), 1000);
        breq.require_known_member_id = false;
        let (c2, b_join) = (c.clone(), breq.clone());
        let b = tokio::spawn(async move { c2.join(b_join).await });
        tokio::task::yield_now().await;
        let a2 = c.join(join_req(&a.member_id, Some("meter-a"), 1000)).await;
        let b = b.await.expect("join");
        assert_eq!((a2.generation, b.generation), (2, 2));
        let leader = a2.leader.clone();
        let (follower_id, follower_instance) =
            if leader == a.member_id { (b.member_id.clone(), "meter-b") } else { (a.member_id.clone(), "meter-a") };
        let (c3, f) = (c.clone(), follower_id.clone());
        let inst = follower_instance.to_string();
        let fsync = tokio::spawn(async move { c3.sync("g", 2, &f, Some(&inst), vec![]).await });
        tokio::task::yield_now().await;
        let leader_instance = if leader == a.member_id { "meter-a" } else { "meter-b" };
        let s = c
            .sync("g", 2, &leader, Some(leader_instance), vec![(follower_id.clone(), Bytes::from_static(b"mine"))])
            .await;
        assert_eq!(s.error, ec::NONE);
        assert_eq!(&fsync.await.expect("sync").assignment[..], b"mine");
        // The follower restarts: same instance, empty member id -> same generation, same assignment.
        let mut again = join_req("", Some(follower_instance), 1000);
        again.require_known_member_id = false;
        let r = c.join(again).await;
        assert_eq!((r.error, r.generation), (ec::NONE, 2), "no rebalance for a returning static member");
        assert_ne!(r.member_id, follower_id);
        assert_eq!(&c.sync("g", 2, &r.member_id, Some(follower_instance), vec![]).await.assignment[..], b"mine");
        assert_eq!(c.heartbeat("g", 2, &follower_id, Some(follower_instance)), ec::FENCED_INSTANCE_ID);
        // The leader restarts too: no rebalance either (KIP-345). The reply names the leader by
        // its old id, as Kafka's does, so the restarted leader runs no assignment; its sync in
        // the Stable group gets what it had, and its old id is fenced.
        let mut again = join_req("", Some(leader_instance), 1000);
        again.require_known_member_id = false;
        // Its metadata differs from before (a consumer's owned partitions are gone after a
        // restart); the protocol is the same, and that is what counts.
        again.protocols = vec![("range".into(), Bytes::from_static(b"meta, owning nothing"))];
        let r = tokio::time::timeout(Duration::from_secs(5), c.join(again))
            .await
            .expect("the static leader's join is answered at once, not after a rebalance");
        assert_eq!((r.error, r.generation), (ec::NONE, 2), "no rebalance for a returning static leader");
        assert_eq!(r.leader, leader, "the leader as it was");
        assert_ne!(r.member_id, leader);
        assert!(r.members.is_empty(), "no member list: nothing to assign");
        let s = c.sync("g", 2, &r.member_id, Some(leader_instance), vec![]).await;
        assert_eq!(s.error, ec::NONE);
        assert_eq!(c.heartbeat("g", 2, &r.member_id, Some(leader_instance)), ec::NONE);
        assert_eq!(c.heartbeat("g", 2, &leader, Some(leader_instance)), ec::FENCED_INSTANCE_ID);
    }

    #[tokio::test]
    async fn offsets_are_durable_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = store(dir.path());
        st.create_topic("t", 2, Default::default()).await.expect("topic");
        let records = (0..10).map(|i| crate::storage::batch::NewRecord::new(None::<Bytes>, format!("v{i}"))).collect();
        st.append_records("t", 0, records).await.expect("append");
        let c = Coordinator::new(st.clone(), limits()).expect("coordinator");
        // A simple consumer (no membership, generation -1) commits to an empty group.
        let codes = c
            .commit(
                "simple",
                -1,
                "",
                None,
                vec![to_commit(0, 4, Some("m".into())), to_commit(9, 1, None), to_commit(1, 0, Some("x".repeat(17)))],
            )
            .await;
        assert_eq!(codes, vec![ec::NONE, ec::UNKNOWN_TOPIC_OR_PARTITION, ec::OFFSET_METADATA_TOO_LARGE]);
        let lag = c.lag("simple").expect("lag");
        assert_eq!(
            lag,
            vec![PartitionLag { topic: "t".into(), partition: 0, committed: 4, high_watermark: 10, lag: 6 }]
        );
        // Members commit only in their generation.
        let a = first_join(&c).await;
        let mut req = join_req(&a, None, 1000);
        req.group_id = "busy".into();
        let mut first = join_req("", None, 1000);
        first.group_id = "busy".into();
        let id = c.join(first).await.member_id;
        req.member_id = id.clone();
        assert_eq!(c.join(req).await.generation, 1);
        let _ = c.sync("busy", 1, &id, None, vec![]).await;
        let one = vec![to_commit(0, 1, None)];
        assert_eq!(c.commit("busy", -1, "", None, one.clone()).await, vec![ec::UNKNOWN_MEMBER_ID]);
        assert_eq!(c.commit("busy", 5, &id, None, one.clone()).await, vec![ec::ILLEGAL_GENERATION]);
        assert_eq!(c.commit("busy", 1, &id, None, one).await, vec![ec::NONE]);
        assert_eq!(c.delete_group("busy").await, ec::NON_EMPTY_GROUP);
        let _ = a;

        // After a restart the offsets (and the groups that have them) are still there.
        drop(c);
        st.close().await.expect("close");
        let st = store(dir.path());
        let c = Coordinator::new(st.clone(), limits()).expect("coordinator");
        let names: Vec<String> = c.list().into_iter().map(|g| g.0).collect();
        assert_eq!(names, vec!["busy".to_string(), "simple".to_string()]);
        let got = c.committed("simple", Some(&[("t".into(), 0), ("t".into(), 1)])).expect("committed");
        assert_eq!(got[0].2.as_ref().map(|o| (o.offset, o.metadata.as_str())), Some((4, "m")));
        assert_eq!(got[1].2, None);
        assert_eq!(c.delete_group("simple").await, ec::NONE);
        assert_eq!(c.delete_group("simple").await, ec::GROUP_ID_NOT_FOUND);
        assert!(c.committed("simple", None).expect("committed").is_empty());
        st.close().await.expect("close");
    }

    #[test]
    fn offset_keys_round_trip_and_do_not_collide() {
        let k = offset_key("g\0x", "t", 7);
        assert_eq!(parse_offset_key(&k), Some(("g\0x".into(), "t".into(), 7)));
        assert!(!offset_key("ab", "c", 0).starts_with(&offset_key_prefix("a")));
        let o = CommittedOffset { offset: 42, leader_epoch: -1, metadata: "m".into(), commit_time_ms: 5 };
        assert_eq!(decode_offset(&encode_offset(&o)), Some(o));
    }

    #[test]
    fn subscription_topics_are_read_with_bounds() {
        let mut md = vec![0, 1, 0, 0, 0, 2];
        for t in ["alpha", "b"] {
            md.extend_from_slice(&(t.len() as i16).to_be_bytes());
            md.extend_from_slice(t.as_bytes());
        }
        assert_eq!(subscribed_topics(&md), vec!["alpha".to_string(), "b".to_string()]);
        assert!(subscribed_topics(&[0, 1, 0x7f, 0xff, 0xff, 0xff]).is_empty());
        assert!(subscribed_topics(&[]).is_empty());
    }

    /// The mirror's read-only hook: called after a durable commit with exactly what was stored
    /// (not the partitions refused), never for a refused commit; `all_committed` lists every
    /// group's offsets.
    #[tokio::test]
    async fn the_commit_hook_sees_each_durable_commit_and_all_committed_lists_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = store(dir.path());
        st.create_topic("t", 2, Default::default()).await.expect("topic");
        let c = Coordinator::new(st, limits()).expect("coordinator");
        type Seen = Vec<(String, String, i32, i64)>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let log = seen.clone();
        c.set_commit_hook(Arc::new(move |group, committed, _at| {
            let mut log = log.lock().expect("log");
            for (t, p, o) in committed {
                log.push((group.to_string(), t.to_string(), *p, *o));
            }
        }));
        let unknown =
            OffsetToCommit { topic: "nope".into(), partition: 0, offset: 1, leader_epoch: -1, metadata: None };
        let errors = c.commit("g1", -1, "", None, vec![to_commit(0, 5, None), unknown, to_commit(1, 9, None)]).await;
        assert_eq!(errors, vec![ec::NONE, ec::UNKNOWN_TOPIC_OR_PARTITION, ec::NONE]);
        // A member that does not exist: refused, nothing stored, the hook not called.
        assert_eq!(c.commit("g1", 3, "ghost", None, vec![to_commit(0, 7, None)]).await, vec![ec::UNKNOWN_MEMBER_ID]);
        c.commit("g2", -1, "", None, vec![to_commit(0, 2, None)]).await;
        let want = vec![
            ("g1".to_string(), "t".to_string(), 0, 5),
            ("g1".to_string(), "t".to_string(), 1, 9),
            ("g2".to_string(), "t".to_string(), 0, 2),
        ];
        assert_eq!(*seen.lock().expect("log"), want);
        let all: Vec<_> =
            c.all_committed(100).expect("scan").into_iter().map(|(g, t, p, o)| (g, t, p, o.offset)).collect();
        assert_eq!(all, want);
        assert_eq!(c.all_committed(1).expect("scan").len(), 1, "bounded");
    }
}
