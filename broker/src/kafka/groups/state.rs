//! A group's state machine without I/O or clock: members, generations, the join and sync
//! phases, rebalance and session deadlines, the initial join delay of an empty group, all fed
//! with `now` by the coordinator.

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

/// Kafka's `InitialDelayedJoin`: the first join of an Empty group completes only after
/// `group.initial.rebalance.delay.ms`, once more for each new member that joined meanwhile,
/// until the largest rebalance timeout is used up; members starting together get one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct InitialJoin {
    /// The configured delay (each extension is at most this).
    pub(super) delay: Duration,
    /// When the join phase may complete.
    pub(super) due: Instant,
    /// What the rebalance timeout leaves for extensions.
    pub(super) remaining: Duration,
    /// A new member joined since the delay was last (re)started.
    pub(super) new_member: bool,
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
    /// Set while the first join phase of an Empty group is held back (`InitialJoin`).
    pub(super) initial_join: Option<InitialJoin>,
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
            initial_join: None,
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

    /// Enters PreparingRebalance: members must rejoin before the largest rebalance timeout. From
    /// Empty with a non-zero `initial_delay` (Kafka's `group.initial.rebalance.delay.ms`) the
    /// join phase is held back as Kafka's `InitialDelayedJoin` does: the first delay in full,
    /// then, while new members keep joining, another `min(delay, remaining)` each time, where
    /// `remaining` starts at `max(rebalance timeout - delay, 0)`.
    pub(super) fn prepare_rebalance(&mut self, now: Instant, initial_delay: Duration) {
        if self.state == GroupState::PreparingRebalance {
            return;
        }
        if self.state == GroupState::Empty && !initial_delay.is_zero() {
            self.initial_join = Some(InitialJoin {
                delay: initial_delay,
                due: now + initial_delay,
                remaining: self.max_rebalance_timeout().saturating_sub(initial_delay),
                new_member: false,
            });
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
        if let Some(hold) = &mut self.initial_join {
            // Kafka's InitialDelayedJoin completes only when its delay expires, not when every
            // member has joined (they all have: they are new).
            if now < hold.due {
                return;
            }
            if hold.new_member && !hold.remaining.is_zero() {
                let d = hold.delay.min(hold.remaining);
                hold.due = now + d;
                hold.remaining -= d;
                hold.new_member = false;
                return;
            }
            self.initial_join = None;
            self.complete_join(now, group_id);
            return;
        }
        let all_joined = self.members.iter().all(|m| m.join_waiter.is_some());
        let due = self.rebalance_deadline.is_some_and(|d| now >= d);
        if !all_joined && !due {
            return;
        }
        self.complete_join(now, group_id);
    }

    /// A member joined the group as a new member (not a rejoin): it extends an initial delay.
    pub(super) fn new_member_joined(&mut self) {
        if let Some(hold) = &mut self.initial_join {
            hold.new_member = true;
        }
    }

    /// Ends the join phase: members that did not rejoin are dropped, the others get the new
    /// generation (the leader with every member's metadata).
    fn complete_join(&mut self, now: Instant, group_id: &str) {
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
                self.initial_join = None;
            }
            GroupState::PreparingRebalance => self.maybe_complete_join(now, group_id),
            GroupState::CompletingRebalance | GroupState::Stable => self.prepare_rebalance(now, Duration::ZERO),
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let sessions = self
            .members
            .iter()
            .filter(|m| m.join_waiter.is_none() && m.sync_waiter.is_none())
            .map(|m| m.last_seen + m.session_timeout);
        let pending = self.pending.values().copied();
        // While an initial join is held, its due time decides (rebalance_deadline is not used).
        let join = match &self.initial_join {
            Some(hold) => Some(hold.due),
            None => self.rebalance_deadline,
        };
        sessions.chain(pending).chain(join).min()
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

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_millis(3000);

    /// A new member with a pending JoinGroup answer; the receiver stands for the client.
    fn joining(g: &mut Group, id: &str, rebalance_timeout: Duration, now: Instant) -> oneshot::Receiver<JoinResponse> {
        let (tx, rx) = oneshot::channel();
        g.members.push(Member {
            id: id.into(),
            instance_id: None,
            client_id: "c".into(),
            client_host: "h".into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout,
            protocols: vec![("range".into(), Bytes::from_static(b"m"))],
            last_seen: now,
            join_waiter: Some(tx),
            sync_waiter: None,
            assignment: Bytes::new(),
        });
        g.new_member_joined();
        g.prepare_rebalance(now, DELAY);
        g.maybe_complete_join(now, "g");
        rx
    }

    /// Kafka's InitialDelayedJoin: members joining an empty group within the delay (each one
    /// restarting it) all get generation 1 together, and not before the delay after the last.
    #[test]
    fn initial_delayed_join_gives_members_joining_together_one_generation() {
        let t0 = Instant::now();
        let mut g = Group::new();
        let timeout = Duration::from_secs(60);
        let mut a = joining(&mut g, "a", timeout, t0);
        assert_eq!(g.state, GroupState::PreparingRebalance);
        assert_eq!(g.next_deadline(), Some(t0 + DELAY), "the timer wakes at the delay");
        let mut b = joining(&mut g, "b", timeout, t0 + Duration::from_millis(1000));
        g.maybe_complete_join(t0 + Duration::from_millis(2999), "g");
        assert!(a.try_recv().is_err(), "all members joined, yet the delay holds the join");
        // At the delay, B's arrival extends it once by the delay.
        g.maybe_complete_join(t0 + DELAY, "g");
        assert_eq!(g.state, GroupState::PreparingRebalance);
        assert_eq!(g.next_deadline(), Some(t0 + 2 * DELAY));
        let mut c = joining(&mut g, "c", timeout, t0 + Duration::from_millis(4000));
        g.maybe_complete_join(t0 + 2 * DELAY, "g");
        assert_eq!(g.state, GroupState::PreparingRebalance, "C extends it again");
        // No one new during the last delay: the join completes, one generation for all three.
        g.maybe_complete_join(t0 + 3 * DELAY, "g");
        assert_eq!((g.state, g.generation), (GroupState::CompletingRebalance, 1));
        let (ra, rb, rc) = (a.try_recv().expect("a"), b.try_recv().expect("b"), c.try_recv().expect("c"));
        assert_eq!((ra.generation, rb.generation, rc.generation), (1, 1, 1));
        assert_eq!((ra.leader.as_str(), ra.members.len()), ("a", 3), "the first member leads, sees all");
        assert!(g.initial_join.is_none());
    }

    /// The extensions end when the rebalance timeout is used up (Kafka: remaining =
    /// rebalance timeout - delay, each extension min(delay, remaining)), however many join.
    #[test]
    fn initial_delay_extensions_stop_at_the_rebalance_timeout() {
        let t0 = Instant::now();
        let mut g = Group::new();
        let timeout = Duration::from_millis(7000); // the delay, then 3000 + 1000 of extensions
        let mut rx = vec![joining(&mut g, "m0", timeout, t0)];
        let mut now = t0;
        let mut completed_at = None;
        for i in 1..100 {
            now += Duration::from_millis(500);
            rx.push(joining(&mut g, &format!("m{i}"), timeout, now));
            g.maybe_complete_join(now, "g");
            if g.state != GroupState::PreparingRebalance {
                completed_at = Some(now);
                break;
            }
        }
        assert_eq!(completed_at, Some(t0 + timeout), "a steady stream of joins is cut at the rebalance timeout");
        assert_eq!(g.generation, 1);
        assert!(rx.iter_mut().all(|r| r.try_recv().is_ok_and(|r| r.generation == 1)));
    }

    /// 0 turns the delay off: a lone first member gets its generation at once, as before.
    #[test]
    fn without_an_initial_delay_a_first_member_gets_its_generation_at_once() {
        let t0 = Instant::now();
        let mut g = Group::new();
        let (tx, mut rx) = oneshot::channel();
        g.members.push(Member {
            id: "a".into(),
            instance_id: None,
            client_id: "c".into(),
            client_host: "h".into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(10),
            protocols: vec![("range".into(), Bytes::from_static(b"m"))],
            last_seen: t0,
            join_waiter: Some(tx),
            sync_waiter: None,
            assignment: Bytes::new(),
        });
        g.prepare_rebalance(t0, Duration::ZERO);
        g.maybe_complete_join(t0, "g");
        assert_eq!(rx.try_recv().expect("answered").generation, 1);
    }

    /// Only the first join of an Empty group is delayed: a rebalance of a Stable group
    /// completes as soon as every member rejoined.
    #[test]
    fn a_stable_groups_rebalance_is_not_delayed() {
        let t0 = Instant::now();
        let mut g = Group::new();
        let timeout = Duration::from_secs(60);
        let _a = joining(&mut g, "a", timeout, t0);
        g.maybe_complete_join(t0 + DELAY, "g");
        g.state = GroupState::Stable;
        let mut b = joining(&mut g, "b", timeout, t0 + DELAY);
        assert!(b.try_recv().is_err(), "waits for A to rejoin");
        let (tx, mut a2) = oneshot::channel();
        if let Some(m) = g.member("a") {
            m.join_waiter = Some(tx);
        }
        g.maybe_complete_join(t0 + DELAY, "g");
        assert_eq!(a2.try_recv().expect("a").generation, 2);
        assert_eq!(b.try_recv().expect("b").generation, 2);
    }

    /// All members leaving during the delay leave an Empty group with no hold left.
    #[test]
    fn leaving_during_the_initial_delay_empties_the_group() {
        let t0 = Instant::now();
        let mut g = Group::new();
        let _a = joining(&mut g, "a", Duration::from_secs(60), t0);
        g.remove_member("a", t0, "g");
        assert_eq!(g.state, GroupState::Empty);
        assert!(g.initial_join.is_none());
        assert_eq!(g.next_deadline(), None);
    }
}
