//! A group's state machine without I/O or clock: members, generations, the join and sync
//! phases, rebalance and session deadlines, all fed with `now` by the coordinator.

use super::*;

#[derive(Debug)]
pub(super) struct Member {
    pub(super) id: String,
    pub(super) instance_id: Option<String>,
    pub(super) client_id: String,
    pub(super) client_host: String,
    pub(super) session_timeout: Duration,
    pub(super) rebalance_timeout: Duration,
    pub(super) protocols: Vec<(String, Bytes)>,
    pub(super) last_seen: Instant,
    pub(super) join_waiter: Option<oneshot::Sender<JoinResponse>>,
    pub(super) sync_waiter: Option<oneshot::Sender<SyncResponse>>,
    pub(super) assignment: Bytes,
}

impl Member {
    /// Bytes this member makes the coordinator hold beyond its fixed size.
    pub(super) fn held_bytes(&self) -> u64 {
        let ids = self.id.len() + self.instance_id.as_ref().map_or(0, String::len);
        let ids = ids + self.client_id.len() + self.client_host.len();
        (ids + protocols_bytes(&self.protocols) + self.assignment.len()) as u64
    }
}

/// Bytes of a member's protocols (names and metadata).
pub(super) fn protocols_bytes(protocols: &[(String, Bytes)]) -> usize {
    protocols.iter().map(|(n, m)| n.len() + m.len()).sum()
}

/// Owned copies of a request's byte fields: a slice would keep the whole request frame alive for
/// as long as the member lives.
pub(super) fn owned(protocols: Vec<(String, Bytes)>) -> Vec<(String, Bytes)> {
    protocols.into_iter().map(|(n, m)| (n, Bytes::copy_from_slice(&m))).collect()
}

#[derive(Debug)]
pub(super) struct Group {
    pub(super) state: GroupState,
    pub(super) generation: i32,
    pub(super) protocol_type: Option<String>,
    pub(super) protocol: Option<String>,
    pub(super) leader: Option<String>,
    /// In join order.
    pub(super) members: Vec<Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, valid until their session timeout.
    pub(super) pending: HashMap<String, Instant>,
    pub(super) rebalance_deadline: Option<Instant>,
    pub(super) has_offsets: bool,
    /// `held_bytes()` at the last `Coordinator::refresh`: this group's share of the total.
    pub(super) held: u64,
}

impl Group {
    pub(super) fn new() -> Self {
        Self {
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: Vec::new(),
            pending: HashMap::new(),
            rebalance_deadline: None,
            has_offsets: false,
            held: 0,
        }
    }

    /// Bytes the group's members make the coordinator hold.
    pub(super) fn held_bytes(&self) -> u64 {
        self.members.iter().map(Member::held_bytes).sum()
    }

    pub(super) fn member(&mut self, id: &str) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// Protocols every member supports, in the first member's order of preference.
    pub(super) fn common_protocols(&self) -> Vec<String> {
        let Some(first) = self.members.first() else { return Vec::new() };
        first
            .protocols
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| self.members.iter().all(|m| m.protocols.iter().any(|(p, _)| p == n)))
            .collect()
    }

    pub(super) fn max_rebalance_timeout(&self) -> Duration {
        self.members.iter().map(|m| m.rebalance_timeout).max().unwrap_or_default()
    }

    /// Enters PreparingRebalance: members must rejoin before the largest rebalance timeout.
    pub(super) fn prepare_rebalance(&mut self, now: Instant) {
        if self.state == GroupState::PreparingRebalance {
            return;
        }
        for m in &mut self.members {
            if let Some(w) = m.sync_waiter.take() {
                let _ = w.send(SyncResponse::error(ec::REBALANCE_IN_PROGRESS));
            }
        }
        self.state = GroupState::PreparingRebalance;
        self.rebalance_deadline = Some(now + self.max_rebalance_timeout());
    }

    /// Completes the join phase once every member rejoined, or at the deadline (dropping the
    /// members that did not).
    pub(super) fn maybe_complete_join(&mut self, now: Instant, group_id: &str) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        let all_joined = self.members.iter().all(|m| m.join_waiter.is_some());
        let due = self.rebalance_deadline.is_some_and(|d| now >= d);
        if !all_joined && !due {
            return;
        }
        let before = self.members.len();
        self.members.retain(|m| m.join_waiter.is_some());
        if self.members.len() < before {
            tracing::info!(group = group_id, removed = before - self.members.len(), "members did not rejoin in time");
        }
        self.generation += 1;
        self.rebalance_deadline = None;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.protocol = None;
            self.leader = None;
            return;
        }
        let protocol = self.common_protocols().into_iter().next();
        if self.leader.as_ref().is_none_or(|l| !self.members.iter().any(|m| &m.id == l)) {
            self.leader = self.members.first().map(|m| m.id.clone());
        }
        self.protocol = protocol.clone();
        self.state = GroupState::CompletingRebalance;
        let leader = self.leader.clone().unwrap_or_default();
        let all: Vec<JoinedMember> = self
            .members
            .iter()
            .map(|m| JoinedMember {
                member_id: m.id.clone(),
                instance_id: m.instance_id.clone(),
                metadata: m
                    .protocols
                    .iter()
                    .find(|(n, _)| Some(n) == protocol.as_ref())
                    .map(|(_, md)| md.clone())
                    .unwrap_or_default(),
            })
            .collect();
        tracing::debug!(
            group = group_id,
            generation = self.generation,
            members = all.len(),
            "rebalance: join complete"
        );
        for m in &mut self.members {
            m.assignment = Bytes::new();
            m.last_seen = now;
            if let Some(w) = m.join_waiter.take() {
                let _ = w.send(JoinResponse {
                    error: ec::NONE,
                    generation: self.generation,
                    protocol_type: self.protocol_type.clone(),
                    protocol: protocol.clone(),
                    leader: leader.clone(),
                    member_id: m.id.clone(),
                    members: if m.id == leader { all.clone() } else { Vec::new() },
                });
            }
        }
    }

    /// Removes a member and rebalances the rest.
    pub(super) fn remove_member(&mut self, id: &str, now: Instant, group_id: &str) {
        self.members.retain(|m| m.id != id);
        if self.leader.as_deref() == Some(id) {
            self.leader = None;
        }
        match self.state {
            GroupState::Empty => {}
            _ if self.members.is_empty() => {
                self.state = GroupState::Empty;
                self.generation += 1;
                self.protocol = None;
                self.leader = None;
                self.rebalance_deadline = None;
            }
            GroupState::PreparingRebalance => self.maybe_complete_join(now, group_id),
            GroupState::CompletingRebalance | GroupState::Stable => self.prepare_rebalance(now),
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let sessions = self
            .members
            .iter()
            .filter(|m| m.join_waiter.is_none() && m.sync_waiter.is_none())
            .map(|m| m.last_seen + m.session_timeout);
        let pending = self.pending.values().copied();
        sessions.chain(pending).chain(self.rebalance_deadline).min()
    }
}

/// Membership check shared by sync, heartbeat, leave and commit; `None` = a known member.
pub(super) fn check_member(g: &Group, member_id: &str, instance_id: Option<&str>) -> Option<i16> {
    if let Some(i) = instance_id {
        if let Some(m) = g.members.iter().find(|m| m.instance_id.as_deref() == Some(i)) {
            if m.id != member_id {
                return Some(ec::FENCED_INSTANCE_ID);
            }
        }
    }
    if g.members.iter().any(|m| m.id == member_id) {
        None
    } else {
        Some(ec::UNKNOWN_MEMBER_ID)
    }
}

/// Removes members whose session expired and member ids that were never used.
pub(super) fn expire(g: &mut Group, group_id: &str, now: Instant) {
    g.pending.retain(|_, deadline| *deadline > now);
    let expired: Vec<String> = g
        .members
        .iter()
        .filter(|m| m.join_waiter.is_none() && m.sync_waiter.is_none() && now >= m.last_seen + m.session_timeout)
        .map(|m| m.id.clone())
        .collect();
    for id in expired {
        tracing::info!(group = group_id, member = %id, "session timed out: member removed");
        g.remove_member(&id, now, group_id);
    }
}
