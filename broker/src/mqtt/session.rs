//! One MQTT session's rules and state as a state machine without I/O (as quinn-proto is to
//! quinn): it takes decoded packets, commit outcomes and `now`, and queues actions (send a packet,
//! append a message to the log, write or delete stored state, join or leave a shared group,
//! `Disconnect { reason, detail }`) that the driver in `server.rs` performs. It knows nothing of
//! tokio, sockets or the store.
//!
//! What it owns: the inbound QoS 1/2 flow (answers leave in the order their packets arrived,
//! each acknowledgement only once its message's commit succeeded; a QoS 2 packet id counts as
//! received only then; the server's Receive Maximum bounds what waits), the outbound in-flight
//! window (packet ids, PUBACK/PUBREC/PUBCOMP), topic aliases, subscriptions and their options,
//! keep-alive and the one-second save timer of a persistent session.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::outbound::Window;
use super::persist::StoredSession;
use super::persist::{encode_session, encode_shared, session_key, shared_key, Cursors, Position, StoredInflight};
use super::reason;
use super::retained::RetainedScan;
use super::shared::SharedGroup;
use super::topic;
use super::wire::{self, In, PublishProps, Version, WireError};
use crate::security::User;

/// The limits a session enforces (from `[mqtt]`).
#[derive(Debug, Clone)]
pub(super) struct Limits {
    /// `mqtt.inflight_messages_max`: the server's Receive Maximum (inbound) and the bound of the
    /// outbound window.
    pub inflight_messages_max: u16,
    pub subscriptions_per_client_max: usize,
    pub topic_bytes_max: usize,
    pub topic_levels_max: usize,
    /// The Topic Alias Maximum the server announces in CONNACK.
    pub topic_alias_max: u16,
}

/// A message to publish into the log (a PUBLISH or a will).
#[derive(Debug)]
pub(super) struct Message {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub payload: Bytes,
    pub props: PublishProps,
}

/// Counters the driver keeps for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Counter {
    /// A client publish to a `$` topic, dropped.
    PublishReserved,
    /// A publish whose Payload Format Indicator says UTF-8 and whose payload is not, dropped.
    PayloadFormatInvalid,
    SubscriptionDenied,
}

/// Work for the driver, in order.
#[derive(Debug)]
pub(super) enum Action {
    /// Write this packet.
    Send(Bytes),
    /// A publish to `topic` the user's rules do not allow (counted and recorded as a refusal).
    PublishDenied {
        topic: String,
    },
    /// Append a message to the log; with a ticket, report the commit's outcome through
    /// [`Session::resolve`]. `qos2_pkid`: store the QoS 2 packet id in the same commit.
    Append {
        ticket: Option<u64>,
        msg: Message,
        qos2_pkid: Option<u16>,
    },
    /// Delete a stored QoS 2 packet id (PUBREL), then [`Session::resolve`].
    DeleteQos2 {
        ticket: u64,
        pkid: u16,
    },
    /// Store the persistent session ([`Session::stored_entries`]); with a ticket, report the
    /// outcome through [`Session::resolve`], without one a failure ends the session.
    SaveSession {
        ticket: Option<u64>,
    },
    /// Find or load the shared group `name` and give it to [`Session::set_group`].
    JoinShared {
        name: String,
        inner: String,
    },
    /// The session left this shared group.
    LeaveShared(Arc<SharedGroup>),
    /// Start delivery cursors (at the log ends) for the log topics `filter` can reach.
    StartCursors {
        filter: String,
    },
    Count(Counter),
    /// Close the connection; MQTT 5 with a reason sends DISCONNECT with it first.
    Disconnect {
        reason: Option<u8>,
        detail: String,
    },
}

/// An outbound QoS 1/2 message waiting for PUBACK, or for PUBREC then PUBCOMP.
#[derive(Debug)]
pub(super) struct Inflight {
    pub qos: u8,
    /// QoS 2 after PUBREC: the client has the message; PUBREL sent, PUBCOMP awaited.
    pub released: bool,
    pub source: Source,
}

impl Inflight {
    pub fn new(qos: u8, source: Source) -> Self {
        Self { qos, released: false, source }
    }
}

/// Where an outbound message came from.
#[derive(Debug)]
pub(super) enum Source {
    /// A retained message sent on subscribe (not tracked in the log).
    Retained,
    /// The session's own subscriptions.
    Log(Position),
    /// A shared subscription: given back to the group if the session ends before the client
    /// has the message.
    Shared(Arc<SharedGroup>, Position),
}

/// A shared subscription of the session: its group once the driver has found it.
#[derive(Debug)]
pub(super) struct SharedSub {
    pub name: String,
    pub qos: u8,
    /// Its Subscription Identifier (0 = none).
    pub id: u32,
    pub group: Option<Arc<SharedGroup>>,
}

/// An inbound QoS 2 packet id: its message is being committed (with the tickets of the answers
/// that wait for that outcome), or stored and waiting for PUBREL.
#[derive(Debug)]
enum Qos2 {
    Pending { ticket: u64, retransmits: Vec<u64>, released: Vec<u64> },
    Stored,
}

/// What an answer waiting for an outcome becomes.
#[derive(Debug)]
enum Plan {
    /// PUBACK/PUBREC of an inbound QoS 1/2 publish.
    PublishAck {
        qos: u8,
        pkid: u16,
    },
    /// A copy of another ticket's answer (a QoS 2 retransmission while the first is committed).
    Copy,
    /// PUBCOMP once the message is known to be stored and its packet id deleted.
    PubComp {
        pkid: u16,
    },
    /// PUBCOMP for a PUBREL that came before its message's commit finished.
    AwaitRelease,
    /// PUBREL once the session recorded the client's PUBREC.
    PubRel {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
}

#[derive(Debug)]
enum Reply {
    Packet(Bytes),
    Close { reason: Option<u8>, detail: String },
}

#[derive(Debug)]
enum Ticket {
    Waiting(Plan),
    Ready(Reply),
}

/// Answers in the order their packets arrived.
#[derive(Debug)]
enum Answer {
    Packet(Bytes),
    Ticket(u64),
    Close {
        reason: Option<u8>,
        detail: String,
    },
    /// The session ends without an error; `true`: normal DISCONNECT (no will).
    End(bool),
}

/// How a session ended: `Ok(true)` normal DISCONNECT (no will), `Ok(false)` the client went
/// away, `Err` closed for the reason given.
pub(super) type End = Result<bool, String>;

/// A SUBSCRIBE or UNSUBSCRIBE being worked through, one filter per [`Session::step`].
#[derive(Debug)]
enum Work {
    Subscribe { pkid: u16, subs: VecDeque<wire::Subscription>, codes: Vec<u8> },
    Unsubscribe { pkid: u16, filters: VecDeque<String>, codes: Vec<u8> },
}

/// What [`Session::publish_out`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent {
    /// Queued for the client.
    Out,
    /// The in-flight window is full.
    WindowFull,
    /// Larger than the client's Maximum Packet Size: dropped.
    TooLarge,
}

/// How the session starts (from the CONNECT and the stored session).
#[derive(Debug)]
pub(super) struct Start {
    pub version: Version,
    pub client_id: String,
    pub username: Option<String>,
    pub user: Option<Arc<User>>,
    pub will: Option<wire::Will>,
    pub keep_alive_s: u16,
    /// Topic aliases the server may assign to its own PUBLISHes (MQTT 5: the client's Topic
    /// Alias Maximum, at most `mqtt.topic_aliases_out_max`; 0 = none).
    pub aliases_out: u16,
    pub receive_max: u16,
    pub session_expiry_s: u32,
    pub max_packet: Option<u32>,
    pub persistent: bool,
    pub resumed: StoredSession,
    /// Inbound QoS 2 packet ids stored for the client.
    pub qos2: Vec<u16>,
}

/// One session: its state and rules.
#[derive(Debug)]
pub(super) struct Session {
    pub version: Version,
    pub client_id: String,
    pub username: Option<String>,
    /// The logged-in user (authentication on): its rules decide what may be published and
    /// subscribed.
    pub user: Option<Arc<User>>,
    /// Boxed: ~200 bytes that a connection without a will would carry for nothing.
    pub will: Option<Box<wire::Will>>,
    pub subs: Vec<wire::Subscription>,
    /// Inbound QoS 2 packet ids.
    qos2: HashMap<u16, Qos2>,
    /// v5 topic aliases set by the client (at most `topic_alias_max`).
    aliases: HashMap<u16, String>,
    /// v5 topic aliases the server assigned to its PUBLISHes, and how many it may assign.
    aliases_out: HashMap<String, u16>,
    aliases_out_max: u16,
    /// Outbound delivery: next offset per (log topic, partition).
    pub cursors: Cursors,
    /// Outbound QoS 1/2 messages waiting for the client, by packet id, within the window.
    pub out: Window<Inflight>,
    /// Messages in flight when a persistent session was stored, sent again (within the window)
    /// before anything new.
    pub resend: VecDeque<StoredInflight>,
    /// Retained messages still to send for new subscriptions (one scan per filter).
    pub retained: Vec<RetainedScan>,
    /// Kept after the connection (clean session 0, or an MQTT 5 session expiry).
    pub persistent: bool,
    pub session_expiry_s: u32,
    /// Subscriptions or cursors changed since the session was last stored, and when they must
    /// be stored at the latest.
    pub dirty: bool,
    save_due: Option<Instant>,
    pub shared: Vec<SharedSub>,
    /// The client's Maximum Packet Size (MQTT 5): larger messages are not sent to it.
    max_packet_out: usize,
    limits: Limits,
    /// Keep-alive: 1.5 times the client's, from the last packet read.
    keep_alive: Option<Duration>,
    last_read: Instant,
    /// Inbound QoS 1/2 publishes whose commit is not known yet.
    unacked: usize,
    /// Inbound QoS 2 packet ids stored and waiting for PUBREL: with `unacked`, what counts
    /// against the server's Receive Maximum (4.9).
    qos2_stored: usize,
    next_ticket: u64,
    tickets: HashMap<u64, Ticket>,
    answers: VecDeque<Answer>,
    actions: VecDeque<Action>,
    work: Option<Work>,
    /// Set once the session decided to end: nothing more is read.
    closing: bool,
    end: Option<End>,
    /// When the buffers the session keeps between packets are given back if empty
    /// ([`Session::trim`]): `TRIM_AFTER` after the last packet, so an idle connection holds
    /// none of them.
    trim_due: Option<Instant>,
}

/// Answers that may wait for outcomes beyond the Receive Maximum (PUBRELs, SUBSCRIBEs, ...)
/// before the session stops reading.
const ANSWERS_SLACK: usize = 16;

/// How long a session keeps its emptied queues and maps after the last packet before giving
/// them back ([`Session::trim`]). A device publishing several times a second keeps them (no
/// allocation per message); one quiet for longer than this holds none: on 1,000 idle
/// connections they are about 1 MiB (the action queue alone, four slots of a ~230-byte action,
/// is 928 bytes).
pub(super) const TRIM_AFTER: Duration = Duration::from_millis(250);

impl Session {
    pub fn new(start: Start, limits: Limits, now: Instant) -> Self {
        let Start {
            version,
            client_id,
            username,
            user,
            will,
            keep_alive_s,
            aliases_out,
            receive_max,
            session_expiry_s,
            max_packet,
            persistent,
            resumed,
            qos2,
        } = start;
        let mut subs = resumed.subs;
        // A stored session keeps only what the user's rules (perhaps changed since) still allow.
        if let Some(u) = &user {
            subs.retain(|sub| u.may_subscribe(&client_id, &sub.filter));
        }
        Self {
            version,
            username,
            will: will.map(Box::new),
            subs,
            qos2_stored: qos2.len(),
            qos2: qos2.into_iter().map(|p| (p, Qos2::Stored)).collect(),
            aliases: HashMap::new(),
            aliases_out: HashMap::new(),
            aliases_out_max: aliases_out,
            cursors: resumed.cursors,
            out: Window::new(usize::from(receive_max.min(limits.inflight_messages_max))),
            resend: resumed.inflight.into(),
            retained: Vec::new(),
            persistent,
            session_expiry_s,
            dirty: false,
            save_due: None,
            shared: Vec::new(),
            max_packet_out: max_packet.map_or(usize::MAX, |m| m as usize),
            keep_alive: (keep_alive_s > 0).then(|| Duration::from_millis(u64::from(keep_alive_s) * 1500)),
            last_read: now,
            unacked: 0,
            next_ticket: 1,
            tickets: HashMap::new(),
            answers: VecDeque::new(),
            actions: VecDeque::new(),
            work: None,
            closing: false,
            end: None,
            trim_due: Some(now + TRIM_AFTER),
            client_id,
            user,
            limits,
        }
    }

    /// Gives back the capacity of the queues and maps that are empty (what a connection that
    /// went quiet holds). State is never dropped: only empty containers are replaced.
    fn trim(&mut self) {
        /// A new (unallocated) container in place of an empty one.
        fn release<T: Default>(c: &mut T, is_empty: impl Fn(&T) -> bool) {
            if is_empty(c) {
                *c = T::default();
            }
        }
        release(&mut self.answers, VecDeque::is_empty);
        release(&mut self.actions, VecDeque::is_empty);
        release(&mut self.tickets, HashMap::is_empty);
        release(&mut self.qos2, HashMap::is_empty);
        release(&mut self.resend, VecDeque::is_empty);
        release(&mut self.retained, Vec::is_empty);
        self.out.trim();
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// How the session ended, once it has (every answer before the end is out).
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Whether the session is ending: the driver reads no more packets and delivers nothing,
    /// and waits for the outcomes still due.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Whether the driver should read the next packet: not while closing, nor while a
    /// SUBSCRIBE is being worked through, nor while too many answers wait (3.1.1 clients,
    /// which cannot be told about a Receive Maximum, are slowed down instead).
    pub fn wants_read(&self) -> bool {
        !self.closing && self.work.is_none() && !self.backlogged()
    }

    /// Whether `inflight_messages_max` + 16 answers wait behind an outcome: the driver then
    /// neither reads nor delivers until outcomes arrive (deliveries queue behind answers).
    pub fn backlogged(&self) -> bool {
        self.answers.len() >= usize::from(self.limits.inflight_messages_max) + ANSWERS_SLACK
    }

    /// Whether a SUBSCRIBE or UNSUBSCRIBE is being worked through ([`Session::step`]).
    pub fn working(&self) -> bool {
        self.work.is_some()
    }

    /// When [`Session::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let keep_alive = self.keep_alive.map(|k| self.last_read + k);
        [keep_alive, self.save_due, self.trim_due].into_iter().flatten().min()
    }

    /// Keep-alive expiry ends the session (3.1.2.10: 1.5 times the Keep Alive); a due save of a
    /// persistent session is queued.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closing {
            return;
        }
        if self.trim_due.is_some_and(|at| now >= at) {
            self.trim_due = None;
            self.trim();
        }
        if self.keep_alive.is_some_and(|k| now >= self.last_read + k) {
            self.close(reason::KEEP_ALIVE_TIMEOUT, "keep-alive expired".into());
            return;
        }
        if self.save_due.is_some_and(|at| now >= at) {
            self.saving();
            self.actions.push_back(Action::SaveSession { ticket: None });
        }
    }

    /// Delivery progress to store at most a second late.
    pub fn mark_dirty(&mut self, now: Instant) {
        if self.persistent {
            self.dirty = true;
            self.save_due.get_or_insert(now + Duration::from_secs(1));
        }
    }

    /// The session is being stored now.
    pub fn saving(&mut self) {
        self.dirty = false;
        self.save_due = None;
    }

    /// Ends the session: answers queued before go out first, then (MQTT 5) a DISCONNECT with
    /// `reason`.
    pub fn close(&mut self, code: u8, detail: String) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.work = None;
        let reason = (self.version == Version::V5).then_some(code);
        self.answers.push_back(Answer::Close { reason, detail });
        self.flush();
    }

    /// Ends the session without an error (the socket closed, or a DISCONNECT).
    fn finish(&mut self, graceful: bool) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.work = None;
        self.answers.push_back(Answer::End(graceful));
        self.flush();
    }

    /// A frame could not be read: the session ends with the reason that fits.
    pub fn read_failed(&mut self, e: &WireError) {
        match e {
            WireError::Closed => self.finish(false),
            WireError::TooLarge { size, max } => self
                .close(reason::PACKET_TOO_LARGE, format!("packet of {size} bytes over mqtt.packet_bytes_max = {max}")),
            WireError::BudgetExhausted => self.close(reason::SERVER_BUSY, e.to_string()),
            _ => self.close(reason::MALFORMED_PACKET, e.to_string()),
        }
    }

    /// The server takes the session away (another connection took it over, or it stops).
    pub fn taken_away(&mut self, code: u8, detail: &str) {
        self.close(code, detail.to_string());
    }

    fn ticket(&mut self, plan: Plan) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(t, Ticket::Waiting(plan));
        self.answers.push_back(Answer::Ticket(t));
        t
    }

    fn answer(&mut self, bytes: Bytes) {
        self.answers.push_back(Answer::Packet(bytes));
        self.flush();
    }

    /// Sends a packet of the server's own (a delivery), in order with the answers.
    pub fn send(&mut self, bytes: Bytes) {
        if !self.closing {
            self.answer(bytes);
        }
    }

    /// Moves the answers whose outcomes are known to the actions, in order.
    fn flush(&mut self) {
        while let Some(front) = self.answers.front() {
            if let Answer::Ticket(t) = front {
                if !matches!(self.tickets.get(t), Some(Ticket::Ready(_))) {
                    return;
                }
            }
            let Some(answer) = self.answers.pop_front() else { return };
            let (reason, detail) = match answer {
                Answer::Packet(b) => {
                    self.actions.push_back(Action::Send(b));
                    continue;
                }
                Answer::Ticket(t) => match self.tickets.remove(&t) {
                    Some(Ticket::Ready(Reply::Packet(b))) => {
                        self.actions.push_back(Action::Send(b));
                        continue;
                    }
                    Some(Ticket::Ready(Reply::Close { reason, detail })) => (reason, detail),
                    _ => continue,
                },
                Answer::Close { reason, detail } => (reason, detail),
                Answer::End(graceful) => {
                    self.closing = true;
                    self.end = Some(Ok(graceful));
                    self.answers.clear();
                    return;
                }
            };
            self.closing = true;
            self.actions.push_back(Action::Disconnect { reason, detail: detail.clone() });
            self.end = Some(Err(detail));
            self.answers.clear();
            return;
        }
    }

    fn ready(&mut self, t: u64, reply: Reply) {
        self.tickets.insert(t, Ticket::Ready(reply));
    }

    fn ack(&self, kind: u8, pkid: u16, code: u8) -> Bytes {
        wire::ack(self.version, kind, pkid, code)
    }

    /// The outcome of a ticket's work: `Ok` or the v5 reason code of the failure.
    pub fn resolve(&mut self, t: u64, outcome: Result<(), u8>) {
        let Some(Ticket::Waiting(plan)) = self.tickets.remove(&t) else {
            debug_assert!(false, "ticket {t} resolved twice or unknown");
            return;
        };
        let v = self.version;
        match plan {
            Plan::PublishAck { qos, pkid } => {
                self.unacked = self.unacked.saturating_sub(1);
                let kind = if qos == 1 { wire::PUBACK } else { wire::PUBREC };
                let reply = |s: &Self| match outcome {
                    Ok(()) => Reply::Packet(s.ack(kind, pkid, reason::SUCCESS)),
                    Err(_) if v == Version::V4 => Reply::Close {
                        reason: None,
                        detail: "publish refused; 3.1.1 has no negative acknowledgement".into(),
                    },
                    Err(code) => Reply::Packet(s.ack(kind, pkid, code)),
                };
                let first = reply(self);
                self.ready(t, first);
                if qos == 2 {
                    let pending = self.qos2.remove(&pkid);
                    let Some(Qos2::Pending { ticket, retransmits, released }) = pending else {
                        debug_assert!(false, "QoS 2 packet id {pkid} not pending at its commit");
                        return;
                    };
                    debug_assert_eq!(ticket, t);
                    for r in retransmits {
                        let copy = reply(self);
                        self.ready(r, copy);
                    }
                    let mut released = released.into_iter();
                    match (outcome, released.next()) {
                        // Stored and released already: delete its packet id, then PUBCOMP.
                        (Ok(()), Some(rel)) => {
                            self.tickets.insert(rel, Ticket::Waiting(Plan::PubComp { pkid }));
                            self.actions.push_back(Action::DeleteQos2 { ticket: rel, pkid });
                        }
                        (Ok(()), None) => {
                            self.qos2.insert(pkid, Qos2::Stored);
                            self.qos2_stored += 1;
                        }
                        // Not stored: the same packet id is a new message.
                        (Err(_), Some(rel)) => {
                            let pubcomp = self.pubcomp_unknown(pkid);
                            self.ready(rel, Reply::Packet(pubcomp));
                        }
                        (Err(_), None) => {}
                    }
                    for rel in released {
                        let pubcomp = self.ack(wire::PUBCOMP, pkid, reason::SUCCESS);
                        self.ready(rel, Reply::Packet(pubcomp));
                    }
                }
            }
            Plan::PubComp { pkid } => {
                let code = if outcome.is_ok() { reason::SUCCESS } else { reason::UNSPECIFIED_ERROR };
                let b = self.ack(wire::PUBCOMP, pkid, code);
                self.ready(t, Reply::Packet(b));
            }
            Plan::PubRel { pkid } => {
                let reply = match outcome {
                    Ok(()) => Reply::Packet(self.ack(wire::PUBREL, pkid, reason::SUCCESS)),
                    Err(_) => Reply::Close {
                        reason: Some(reason::UNSPECIFIED_ERROR).filter(|_| v == Version::V5),
                        detail: "session not stored".into(),
                    },
                };
                self.ready(t, reply);
            }
            Plan::SubAck { pkid, mut codes } => {
                if outcome.is_err() {
                    tracing::warn!(client = %self.client_id, "subscriptions not stored");
                    codes.iter_mut().for_each(|c| *c = reason::UNSPECIFIED_ERROR);
                }
                let b = wire::suback(v, pkid, &codes);
                self.ready(t, Reply::Packet(b));
            }
            Plan::UnsubAck { pkid, codes } => {
                if outcome.is_err() {
                    tracing::warn!(client = %self.client_id, "subscriptions not stored");
                }
                let b = wire::unsuback(v, pkid, &codes);
                self.ready(t, Reply::Packet(b));
            }
            Plan::Copy | Plan::AwaitRelease => debug_assert!(false, "ticket {t} is resolved by another"),
        }
        self.flush();
    }

    /// PUBCOMP for a packet id not known: MQTT 5 says so; 3.1.1 completes it anyway.
    fn pubcomp_unknown(&self, pkid: u16) -> Bytes {
        let code = if self.version == Version::V5 { reason::PACKET_IDENTIFIER_NOT_FOUND } else { reason::SUCCESS };
        self.ack(wire::PUBCOMP, pkid, code)
    }

    /// Whether a topic name may be published to here (the length and level limits, no
    /// wildcards, not the broker's `$` topics).
    pub fn check_topic(&self, t: &str) -> Result<(), String> {
        check_topic(&self.limits, t)
    }

    /// One packet from the client.
    pub fn handle(&mut self, now: Instant, packet: In) {
        if self.closing {
            return;
        }
        self.last_read = now;
        // From the last packet: a connection busier than this never trims (no timer wake-up
        // and no allocation per message), a quiet one trims once.
        self.trim_due = Some(now + TRIM_AFTER);
        match packet {
            In::Connect { .. } => self.close(reason::PROTOCOL_ERROR, "a second CONNECT".into()),
            In::PingReq => self.answer(wire::pingresp()),
            In::Disconnect { reason: code, session_expiry_s } => {
                if let Some(expiry) = session_expiry_s {
                    // 3.14.2.2.2: it replaces the CONNECT's value; setting one when CONNECT
                    // had 0 is a protocol error ([MQTT-3.14.2-2]).
                    if self.session_expiry_s == 0 && expiry != 0 {
                        return self.close(
                            reason::PROTOCOL_ERROR,
                            "DISCONNECT sets a session expiry after CONNECT set none".into(),
                        );
                    }
                    self.session_expiry_s = expiry;
                    self.persistent = expiry > 0;
                }
                self.finish(code != reason::DISCONNECT_WITH_WILL);
            }
            In::Publish { topic, qos, retain, dup: _, pkid, payload, props } => {
                self.on_publish(&topic, qos, retain, pkid, payload, props);
            }
            In::PubRel(pkid) => self.on_pubrel(pkid),
            In::PubAck(pkid) | In::PubComp(pkid) => {
                if let Some(m) = self.out.remove(pkid) {
                    if let Source::Shared(g, position) = &m.source {
                        g.settle(position);
                    }
                    self.mark_dirty(now);
                }
            }
            In::PubRec(pkid) => self.on_pubrec(pkid),
            In::Subscribe { pkid, subs } => {
                self.work = Some(Work::Subscribe { pkid, codes: Vec::with_capacity(subs.len()), subs: subs.into() });
            }
            In::Unsubscribe { pkid, filters } => {
                self.work =
                    Some(Work::Unsubscribe { pkid, codes: Vec::with_capacity(filters.len()), filters: filters.into() });
            }
        }
    }

    fn on_publish(&mut self, t: &[u8], qos: u8, retain: bool, pkid: u16, payload: Bytes, props: PublishProps) {
        let topic_name = match (std::str::from_utf8(t), props.topic_alias) {
            (Ok(""), Some(alias)) => match self.aliases.get(&alias) {
                Some(known) => known.clone(),
                None => return self.close(reason::PROTOCOL_ERROR, format!("unknown topic alias {alias}")),
            },
            (Ok(name), alias) => {
                if let Some(a) = alias {
                    if a == 0 || a > self.limits.topic_alias_max {
                        let max = self.limits.topic_alias_max;
                        return self.close(reason::TOPIC_ALIAS_INVALID, format!("topic alias {a} outside 1..={max}"));
                    }
                    // Bounded: at most `topic_alias_max` aliases.
                    self.aliases.insert(a, name.to_string());
                }
                name.to_string()
            }
            (Err(_), _) => return self.close(reason::MALFORMED_PACKET, "topic is not valid UTF-8".into()),
        };
        if qos > 2 {
            return self.close(reason::MALFORMED_PACKET, "QoS 3".into());
        }
        if topic_name.starts_with('$') && topic::valid_topic(&topic_name) {
            // A valid name, but `$` topics are the broker's (4.7.2, [MQTT-4.7.2-1]: clients do
            // not exchange messages through them): refused like an ACL denial, and the
            // connection stays.
            self.actions.push_back(Action::Count(Counter::PublishReserved));
            tracing::debug!(client = %self.client_id, topic = %topic_name, "publish to a '$' topic: dropped");
            return self.refuse_publish(qos, pkid, reason::TOPIC_NAME_INVALID);
        }
        if let Err(detail) = self.check_topic(&topic_name) {
            return self.close(reason::TOPIC_NAME_INVALID, detail);
        }
        if self.user.as_ref().is_some_and(|u| !u.may_publish(&self.client_id, &topic_name)) {
            self.actions.push_back(Action::PublishDenied { topic: topic_name.clone() });
            tracing::warn!(client = %self.client_id, user = ?self.username, topic = %topic_name,
                "publish not allowed by the user's ACL: dropped");
            return self.refuse_publish(qos, pkid, reason::NOT_AUTHORIZED);
        }
        // 3.3.2.3.2: the receiver may check that a payload marked UTF-8 (Payload Format
        // Indicator 1) is; this one does, so no subscriber told "UTF-8" gets bytes that are not.
        // Refused like an ACL denial (PUBACK/PUBREC 0x99; QoS 0: dropped), the connection stays.
        if props.payload_format == Some(1) && std::str::from_utf8(&payload).is_err() {
            self.actions.push_back(Action::Count(Counter::PayloadFormatInvalid));
            tracing::debug!(client = %self.client_id, topic = %topic_name, "payload is not the UTF-8 it claims: dropped");
            return self.refuse_publish(qos, pkid, reason::PAYLOAD_FORMAT_INVALID);
        }
        if qos == 2 {
            match self.qos2.get(&pkid) {
                // A retransmission of a message already stored: acknowledge again, store
                // nothing.
                Some(Qos2::Stored) => {
                    let b = self.ack(wire::PUBREC, pkid, reason::SUCCESS);
                    return self.answer(b);
                }
                // Sent again while its commit is under way: answered with its outcome.
                Some(Qos2::Pending { .. }) => {
                    let t = self.ticket(Plan::Copy);
                    if let Some(Qos2::Pending { retransmits, .. }) = self.qos2.get_mut(&pkid) {
                        retransmits.push(t);
                    }
                    return;
                }
                None => {}
            }
        }
        let msg = Message { topic: topic_name, qos, retain, payload, props };
        if qos == 0 {
            self.actions.push_back(Action::Append { ticket: None, msg, qos2_pkid: None });
            return;
        }
        // [MQTT-3.3.4-9]: no more QoS 1/2 publishes unacknowledged than the Receive Maximum; a
        // QoS 2 one counts until its PUBCOMP (4.9), so PUBREC'd ones waiting for PUBREL too.
        let quota_used = self.unacked + self.qos2_stored;
        if self.version == Version::V5 && quota_used >= usize::from(self.limits.inflight_messages_max) {
            return self.close(
                reason::RECEIVE_MAXIMUM_EXCEEDED,
                "more unacknowledged QoS 1/2 publishes than the Receive Maximum".into(),
            );
        }
        self.unacked += 1;
        let t = self.ticket(Plan::PublishAck { qos, pkid });
        // QoS 2: the packet id counts as received once the commit succeeded; until then a
        // retransmission waits for this outcome.
        let qos2_pkid = (qos == 2).then(|| {
            self.qos2.insert(pkid, Qos2::Pending { ticket: t, retransmits: Vec::new(), released: Vec::new() });
            pkid
        });
        self.actions.push_back(Action::Append { ticket: Some(t), msg, qos2_pkid });
    }

    /// A publish the server does not take. MQTT 5: PUBACK/PUBREC with `code`. 3.1.1 has no
    /// negative acknowledgement: the message is acknowledged and dropped (as mosquitto does),
    /// so a device retrying it does not loop through reconnects.
    fn refuse_publish(&mut self, qos: u8, pkid: u16, code: u8) {
        if qos > 0 {
            let code = if self.version == Version::V5 { code } else { reason::SUCCESS };
            let kind = if qos == 1 { wire::PUBACK } else { wire::PUBREC };
            let b = self.ack(kind, pkid, code);
            self.answer(b);
        }
    }

    fn on_pubrel(&mut self, pkid: u16) {
        match self.qos2.get_mut(&pkid) {
            Some(Qos2::Stored) => {
                self.qos2.remove(&pkid);
                self.qos2_stored -= 1;
                let t = self.ticket(Plan::PubComp { pkid });
                self.actions.push_back(Action::DeleteQos2 { ticket: t, pkid });
            }
            // PUBREL before PUBREC: answered once the commit is known.
            Some(Qos2::Pending { .. }) => {
                let t = self.ticket(Plan::AwaitRelease);
                if let Some(Qos2::Pending { released, .. }) = self.qos2.get_mut(&pkid) {
                    released.push(t);
                }
            }
            None => {
                let b = self.pubcomp_unknown(pkid);
                self.answer(b);
            }
        }
    }

    /// Outbound QoS 2, step 2: the client has the message. A persistent session stores that
    /// before the PUBREL, so neither a reconnect nor a crash sends the message again: only the
    /// PUBREL is repeated.
    fn on_pubrec(&mut self, pkid: u16) {
        match self.out.get_mut(pkid) {
            Some(m) if m.qos == 2 => {
                if !m.released {
                    m.released = true;
                    if let Source::Shared(g, position) = &m.source {
                        g.settle(position);
                    }
                }
                if self.persistent {
                    self.saving();
                    let t = self.ticket(Plan::PubRel { pkid });
                    self.actions.push_back(Action::SaveSession { ticket: Some(t) });
                } else {
                    let b = self.ack(wire::PUBREL, pkid, reason::SUCCESS);
                    self.answer(b);
                }
            }
            _ if self.version == Version::V5 => {
                let b = self.ack(wire::PUBREL, pkid, reason::PACKET_IDENTIFIER_NOT_FOUND);
                self.answer(b);
            }
            _ => {}
        }
    }

    /// Works through one filter of a SUBSCRIBE or UNSUBSCRIBE (a packet may carry thousands:
    /// the driver yields between steps). Returns whether more steps are due.
    pub fn step(&mut self) -> bool {
        let Some(work) = self.work.take() else { return false };
        match work {
            Work::Subscribe { pkid, mut subs, mut codes } => match subs.pop_front() {
                Some(sub) => {
                    let code = self.subscribe_one(sub);
                    codes.push(code);
                    self.work = Some(Work::Subscribe { pkid, subs, codes });
                }
                None => {
                    if self.persistent {
                        self.saving();
                        let t = self.ticket(Plan::SubAck { pkid, codes });
                        self.actions.push_back(Action::SaveSession { ticket: Some(t) });
                    } else {
                        let b = wire::suback(self.version, pkid, &codes);
                        self.answer(b);
                    }
                }
            },
            Work::Unsubscribe { pkid, mut filters, mut codes } => match filters.pop_front() {
                Some(f) => {
                    let code = self.unsubscribe_one(&f);
                    codes.push(code);
                    self.work = Some(Work::Unsubscribe { pkid, filters, codes });
                }
                None => {
                    if self.persistent {
                        self.saving();
                        let t = self.ticket(Plan::UnsubAck { pkid, codes });
                        self.actions.push_back(Action::SaveSession { ticket: Some(t) });
                    } else {
                        let b = wire::unsuback(self.version, pkid, &codes);
                        self.answer(b);
                    }
                }
            },
        }
        self.work.is_some()
    }

    fn denied(&mut self, filter: &str) -> bool {
        if self.user.as_ref().is_some_and(|u| !u.may_subscribe(&self.client_id, filter)) {
            self.actions.push_back(Action::Count(Counter::SubscriptionDenied));
            tracing::warn!(client = %self.client_id, user = ?self.username, filter = %filter,
                "subscription not allowed by the user's ACL");
            return true;
        }
        false
    }

    /// One filter of a SUBSCRIBE: its reason code (the granted QoS, or why not).
    fn subscribe_one(&mut self, sub: wire::Subscription) -> u8 {
        let max = self.limits.subscriptions_per_client_max;
        if let Some(rest) = sub.filter.strip_prefix("$share/") {
            // Shared subscription: `$share/{group}/{filter}`.
            let valid = rest
                .split_once('/')
                .filter(|(g, f)| !g.is_empty() && !g.contains(['+', '#']) && topic::valid_filter(f));
            let Some((_, inner)) = valid else { return reason::TOPIC_FILTER_INVALID };
            let inner = inner.to_string();
            if self.denied(&inner) {
                return reason::NOT_AUTHORIZED; // 3.1.1: 0x80 failure
            }
            if self.subs.len() + self.shared.len() >= max && !self.shared.iter().any(|g| g.name == sub.filter) {
                return reason::QUOTA_EXCEEDED;
            }
            let granted = sub.qos.min(2);
            self.shared.retain(|g| g.name != sub.filter);
            self.shared.push(SharedSub { name: sub.filter.clone(), qos: granted, id: sub.id, group: None });
            self.actions.push_back(Action::JoinShared { name: sub.filter, inner });
            return granted;
        }
        if !topic::valid_filter(&sub.filter) || sub.filter.len() > self.limits.topic_bytes_max {
            return reason::TOPIC_FILTER_INVALID;
        }
        if self.denied(&sub.filter) {
            return reason::NOT_AUTHORIZED; // 3.1.1: 0x80 failure
        }
        let exists = self.subs.iter().position(|x| x.filter == sub.filter);
        if exists.is_none() && self.subs.len() >= max {
            return reason::QUOTA_EXCEEDED;
        }
        let granted = sub.qos.min(2);
        // New messages from now on: cursors of the log topics this filter can reach start at
        // their current ends.
        self.actions.push_back(Action::StartCursors { filter: sub.filter.clone() });
        // Its retained messages follow within the window, page by page; subscribing again to
        // the same filter starts them over ([MQTT-3.8.4-3]) instead of queueing them twice, so
        // at most one scan per subscription waits. Retain Handling 1 sends them only for a new
        // subscription, 2 never ([MQTT-3.3.1-9/10/11]).
        self.retained.retain(|r| r.filter != sub.filter);
        let send_retained = match sub.retain_handling {
            0 => true,
            1 => exists.is_none(),
            _ => false,
        };
        if send_retained {
            self.retained.push(RetainedScan::new(&sub.filter, granted));
        }
        let new = wire::Subscription { qos: granted, ..sub };
        match exists {
            Some(i) => self.subs[i] = new,
            None => self.subs.push(new),
        }
        granted
    }

    fn unsubscribe_one(&mut self, f: &str) -> u8 {
        self.retained.retain(|r| r.filter != f);
        if let Some(i) = self.subs.iter().position(|x| x.filter == f) {
            self.subs.remove(i);
            return reason::SUCCESS;
        }
        if let Some(i) = self.shared.iter().position(|g| g.name == f) {
            if let Some(g) = self.shared.remove(i).group {
                self.actions.push_back(Action::LeaveShared(g));
            }
            return reason::SUCCESS;
        }
        reason::NO_SUBSCRIPTION_EXISTED
    }

    /// The driver found (or loaded) a shared group the session joined.
    pub fn set_group(&mut self, name: &str, group: Arc<SharedGroup>) {
        match self.shared.iter_mut().find(|g| g.name == name) {
            Some(s) => s.group = Some(group),
            // Unsubscribed meanwhile.
            None => self.actions.push_back(Action::LeaveShared(group)),
        }
    }

    /// Sends a message to the client: a packet id and an in-flight entry (from `source`) at
    /// QoS 1/2. MQTT 5: a message larger than the client's Maximum Packet Size is dropped; the
    /// first `aliases_out_max` distinct topics get a topic alias (3.3.2.3.4), set with their
    /// first message and sent as the alias alone afterwards.
    pub fn publish_out(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: &[u8],
        mut props: PublishProps,
        source: Source,
    ) -> Sent {
        let pkid = if qos > 0 {
            let Ok(pkid) = self.out.insert(Inflight::new(qos, source)) else { return Sent::WindowFull };
            pkid
        } else {
            0
        };
        let (name, new_alias) = match self.aliases_out.get(topic) {
            Some(&alias) => {
                props.topic_alias = Some(alias);
                ("", None)
            }
            None if self.aliases_out.len() < usize::from(self.aliases_out_max) => {
                let alias = self.aliases_out.len() as u16 + 1;
                props.topic_alias = Some(alias);
                (topic, Some(alias))
            }
            None => (topic, None),
        };
        let bytes = wire::publish(self.version, name, qos, retain, false, pkid, payload, &props);
        if bytes.len() > self.max_packet_out {
            if qos > 0 {
                self.out.remove(pkid);
            }
            return Sent::TooLarge;
        }
        if let Some(alias) = new_alias {
            // The client learns the alias from this packet.
            self.aliases_out.insert(topic.to_string(), alias);
        }
        self.send(bytes);
        Sent::Out
    }

    /// A message that was in flight when the session was stored, under its packet id: the
    /// PUBREL again if the client has it, else the message again with DUP set (`publish`: its
    /// topic, payload and properties). Returns whether it went out.
    pub fn resend_one(&mut self, m: StoredInflight, publish: Option<(&str, &[u8], &PublishProps)>) -> bool {
        let bytes = match (m.released, publish) {
            (true, _) => self.ack(wire::PUBREL, m.pkid, reason::SUCCESS),
            (false, Some((topic, payload, props))) => {
                wire::publish(self.version, topic, m.qos, false, true, m.pkid, payload, props)
            }
            (false, None) => return false,
        };
        let entry = Inflight { qos: m.qos, released: m.released, source: Source::Log(m.position) };
        if self.out.insert_with_id(m.pkid, entry).is_err() {
            // Its packet id is in use (a stored duplicate): nothing to resend under it.
            return false;
        }
        self.send(bytes);
        true
    }

    /// Inbound QoS 2 packet ids the session holds (removed with a clean session).
    pub fn qos2_ids(&self) -> Vec<u16> {
        self.qos2.keys().copied().collect()
    }

    /// The store writes that save a persistent session: the session (with its own messages in
    /// flight, and those not yet resent) and the restart positions of its shared
    /// subscriptions, in one commit. `deadline_ms`: when it expires (0 = never).
    pub fn stored_entries(&self, deadline_ms: i64) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut inflight: Vec<StoredInflight> = self
            .out
            .iter()
            .filter_map(|(pkid, m)| match &m.source {
                Source::Log(position) => Some((pkid, m, position)),
                // The client has it: only the PUBREL is left to repeat after a reconnect.
                Source::Shared(_, position) if m.released => Some((pkid, m, position)),
                _ => None,
            })
            .map(|(pkid, m, position)| StoredInflight {
                pkid,
                qos: m.qos,
                released: m.released,
                position: position.clone(),
            })
            .collect();
        inflight.extend(self.resend.iter().cloned());
        inflight.sort_by(|a, b| a.position.cmp(&b.position));
        let groups = || self.shared.iter().filter_map(|s| s.group.as_ref().map(|g| (s.qos, g)));
        let stored = StoredSession {
            owner: self.user.as_ref().map(|u| u.name.clone()),
            subs: self.subs.clone(),
            cursors: self.cursors.clone(),
            shared: self.shared.iter().filter(|s| s.group.is_some()).map(|s| (s.name.clone(), s.qos, s.id)).collect(),
            inflight,
        };
        let mut entries = vec![(session_key(&self.client_id), Some(encode_session(deadline_ms, &stored)))];
        for (_, g) in groups() {
            let group_deadline = g.extend_deadline(deadline_ms);
            entries.push((shared_key(&g.name), Some(encode_shared(group_deadline, &g.restart_cursors()))));
        }
        entries
    }
}

/// Whether `t` is a topic name clients may publish to under `limits`.
pub(super) fn check_topic(limits: &Limits, t: &str) -> Result<(), String> {
    if !topic::valid_topic(t) {
        return Err(format!("{t:?} is not a valid topic name"));
    }
    if t.starts_with('$') {
        return Err(format!("{t:?}: topics starting with '$' are the broker's"));
    }
    if t.len() > limits.topic_bytes_max {
        return Err(format!("topic longer than mqtt.topic_bytes_max = {}", limits.topic_bytes_max));
    }
    if t.split('/').count() > limits.topic_levels_max {
        return Err(format!("topic has more than mqtt.topic_levels_max = {} levels", limits.topic_levels_max));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            inflight_messages_max: 4,
            subscriptions_per_client_max: 2,
            topic_bytes_max: 64,
            topic_levels_max: 4,
            topic_alias_max: 8,
        }
    }

    fn start(version: Version) -> Start {
        Start {
            version,
            client_id: "c1".into(),
            username: None,
            user: None,
            will: None,
            keep_alive_s: 10,
            aliases_out: 2,
            receive_max: 3,
            session_expiry_s: 0,
            max_packet: Some(64),
            persistent: false,
            resumed: StoredSession::default(),
            qos2: Vec::new(),
        }
    }

    fn session(version: Version) -> (Session, Instant) {
        let now = Instant::now();
        (Session::new(start(version), limits(), now), now)
    }

    fn publish(topic: &str, qos: u8, pkid: u16) -> In {
        In::Publish {
            topic: Bytes::from(topic.to_string()),
            qos,
            retain: false,
            dup: false,
            pkid,
            payload: Bytes::from_static(b"x"),
            props: PublishProps::default(),
        }
    }

    fn actions(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    /// The packets sent, as (first byte, body).
    fn sent(acts: &[Action]) -> Vec<(u8, Vec<u8>)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Send(b) => Some((b[0], b[2..].to_vec())),
                _ => None,
            })
            .collect()
    }

    fn tickets(acts: &[Action]) -> Vec<u64> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Append { ticket: Some(t), .. } | Action::DeleteQos2 { ticket: t, .. } => Some(*t),
                Action::SaveSession { ticket: Some(t) } => Some(*t),
                _ => None,
            })
            .collect()
    }

    fn disconnect(acts: &[Action]) -> Option<Option<u8>> {
        acts.iter().find_map(|a| match a {
            Action::Disconnect { reason, .. } => Some(*reason),
            _ => None,
        })
    }

    #[test]
    fn pubacks_wait_for_their_commits_and_leave_in_arrival_order_mqtt_4_6_0_2() {
        let (mut s, now) = session(Version::V5);
        s.handle(now, publish("a/b", 1, 1));
        s.handle(now, publish("a/b", 1, 2));
        let acts = actions(&mut s);
        assert!(sent(&acts).is_empty(), "nothing acknowledged before its commit");
        let t = tickets(&acts);
        assert_eq!(t.len(), 2);
        s.resolve(t[1], Ok(()));
        assert!(sent(&actions(&mut s)).is_empty(), "the second waits for the first");
        s.resolve(t[0], Ok(()));
        assert_eq!(sent(&actions(&mut s)), vec![(0x40, vec![0, 1]), (0x40, vec![0, 2])]);
    }

    #[test]
    fn a_qos2_retransmission_during_the_commit_gets_its_outcome_and_is_stored_once_mqtt_4_3_3_2() {
        let (mut s, now) = session(Version::V5);
        s.handle(now, publish("a/b", 2, 7));
        s.handle(now, publish("a/b", 2, 7));
        let acts = actions(&mut s);
        assert_eq!(acts.iter().filter(|a| matches!(a, Action::Append { .. })).count(), 1);
        s.resolve(tickets(&acts)[0], Ok(()));
        assert_eq!(sent(&actions(&mut s)), vec![(0x50, vec![0, 7]), (0x50, vec![0, 7])]);
        // Stored: a later copy is acknowledged, not appended again.
        s.handle(now, publish("a/b", 2, 7));
        let acts = actions(&mut s);
        assert!(!acts.iter().any(|a| matches!(a, Action::Append { .. })));
        assert_eq!(sent(&acts), vec![(0x50, vec![0, 7])]);
        // PUBREL deletes the stored id, then PUBCOMP.
        s.handle(now, In::PubRel(7));
        let acts = actions(&mut s);
        assert!(matches!(acts[..], [Action::DeleteQos2 { pkid: 7, .. }]));
        s.resolve(tickets(&acts)[0], Ok(()));
        assert_eq!(sent(&actions(&mut s)), vec![(0x70, vec![0, 7])]);
        assert!(s.qos2_ids().is_empty());
    }

    #[test]
    fn a_qos2_packet_id_whose_commit_failed_is_not_taken_as_received_mqtt_4_3_3_9() {
        let (mut s, now) = session(Version::V5);
        s.handle(now, publish("a/b", 2, 9));
        let t = tickets(&actions(&mut s));
        s.resolve(t[0], Err(reason::QUOTA_EXCEEDED));
        assert_eq!(sent(&actions(&mut s)), vec![(0x50, vec![0, 9, reason::QUOTA_EXCEEDED, 0])]);
        assert!(s.qos2_ids().is_empty());
        s.handle(now, publish("a/b", 2, 9));
        assert!(actions(&mut s).iter().any(|a| matches!(a, Action::Append { .. })), "a new message");
    }

    #[test]
    fn a_pubrel_before_the_commit_is_completed_after_it_mqtt_4_3_3() {
        let (mut s, now) = session(Version::V5);
        s.handle(now, publish("a/b", 2, 3));
        s.handle(now, In::PubRel(3));
        let acts = actions(&mut s);
        assert!(sent(&acts).is_empty());
        s.resolve(tickets(&acts)[0], Ok(()));
        let acts = actions(&mut s);
        assert_eq!(sent(&acts), vec![(0x50, vec![0, 3])], "PUBREC; PUBCOMP once the id is deleted");
        let delete = tickets(&acts);
        assert_eq!(delete.len(), 1);
        s.resolve(delete[0], Ok(()));
        assert_eq!(sent(&actions(&mut s)), vec![(0x70, vec![0, 3])]);
    }

    #[test]
    fn a_publish_to_a_dollar_topic_is_refused_and_the_connection_stays_mqtt_4_7_2_1() {
        for (version, code) in [(Version::V5, vec![0, 1, reason::TOPIC_NAME_INVALID, 0]), (Version::V4, vec![0, 1])] {
            let (mut s, now) = session(version);
            s.handle(now, publish("$TopicA/B", 1, 1));
            s.handle(now, publish("$SYS/broker/x", 0, 0));
            let acts = actions(&mut s);
            assert!(!acts.iter().any(|a| matches!(a, Action::Append { .. })), "nothing stored");
            assert_eq!(sent(&acts), vec![(0x40, code)], "{version:?}: refused (3.1.1: acknowledged, dropped)");
            let counted = acts.iter().filter(|a| matches!(a, Action::Count(Counter::PublishReserved))).count();
            assert_eq!(counted, 2);
            assert!(!s.closing(), "the connection stays");
            s.handle(now, publish("TopicA/B", 1, 2));
            assert!(actions(&mut s).iter().any(|a| matches!(a, Action::Append { .. })));
        }
    }

    #[test]
    fn a_payload_that_is_not_the_utf_8_its_format_indicator_claims_is_refused_0x99_mqtt_3_3_2_3_2() {
        let (mut s, now) = session(Version::V5);
        let with = |qos: u8, pkid: u16, format: Option<u8>, payload: &'static [u8]| {
            let In::Publish { topic, retain, dup, props, .. } = publish("meters/7", qos, pkid) else { unreachable!() };
            let props = PublishProps { payload_format: format, ..props };
            In::Publish { topic, qos, retain, dup, pkid, payload: Bytes::from_static(payload), props }
        };
        s.handle(now, with(1, 1, Some(1), b"\xff\xfe"));
        s.handle(now, with(2, 2, Some(1), b"caf\xc3"));
        s.handle(now, with(0, 0, Some(1), b"\x80"));
        let acts = actions(&mut s);
        assert!(!acts.iter().any(|a| matches!(a, Action::Append { .. })), "nothing stored");
        let code = reason::PAYLOAD_FORMAT_INVALID;
        assert_eq!(sent(&acts), vec![(0x40, vec![0, 1, code, 0]), (0x50, vec![0, 2, code, 0])]);
        let counted = acts.iter().filter(|a| matches!(a, Action::Count(Counter::PayloadFormatInvalid))).count();
        assert_eq!(counted, 3, "the QoS 0 one is dropped and counted");
        assert!(!s.closing(), "the connection stays");
        // UTF-8 with the indicator, and any bytes without it (or with 0), are stored.
        s.handle(now, with(1, 3, Some(1), "café".as_bytes()));
        s.handle(now, with(1, 4, Some(0), b"\xff"));
        s.handle(now, with(1, 5, None, b"\xff"));
        let appended = actions(&mut s).iter().filter(|a| matches!(a, Action::Append { .. })).count();
        assert_eq!(appended, 3);
    }

    #[test]
    fn a_pubrel_for_an_unknown_packet_id_is_0x92_in_v5_and_completed_in_3_1_1() {
        let (mut s, now) = session(Version::V5);
        s.handle(now, In::PubRel(5));
        assert_eq!(sent(&actions(&mut s)), vec![(0x70, vec![0, 5, reason::PACKET_IDENTIFIER_NOT_FOUND, 0])]);
        let (mut s, now) = session(Version::V4);
        s.handle(now, In::PubRel(5));
        assert_eq!(sent(&actions(&mut s)), vec![(0x70, vec![0, 5])]);
    }

    #[test]
    fn more_unacknowledged_publishes_than_the_receive_maximum_is_disconnect_0x93_mqtt_3_3_4_9() {
        let (mut s, now) = session(Version::V5);
        for pkid in 1..=4 {
            s.handle(now, publish("a/b", 1, pkid));
        }
        let t = tickets(&actions(&mut s));
        assert_eq!(t.len(), 4, "up to the Receive Maximum (4)");
        s.handle(now, publish("a/b", 1, 5));
        let acts = actions(&mut s);
        assert!(!acts.iter().any(|a| matches!(a, Action::Append { .. })), "the fifth is not stored");
        assert!(s.closing() && !s.wants_read());
        for t in t {
            s.resolve(t, Ok(()));
        }
        let acts = actions(&mut s);
        assert_eq!(sent(&acts).len(), 4, "the earlier ones are acknowledged first");
        assert_eq!(disconnect(&acts), Some(Some(reason::RECEIVE_MAXIMUM_EXCEEDED)));
        assert!(matches!(s.end(), Some(Err(_))));
    }

    #[test]
    fn pubrecd_qos2_publishes_count_against_the_receive_maximum_until_pubcomp_mqtt_3_3_4_9() {
        let (mut s, now) = session(Version::V5);
        for pkid in 1..=4 {
            s.handle(now, publish("a/b", 2, pkid));
        }
        for t in tickets(&actions(&mut s)) {
            s.resolve(t, Ok(()));
        }
        assert_eq!(sent(&actions(&mut s)).len(), 4, "four PUBRECs");
        s.handle(now, In::PubRel(1));
        let t = tickets(&actions(&mut s));
        s.resolve(t[0], Ok(()));
        assert_eq!(sent(&actions(&mut s)), vec![(0x70, vec![0, 1])], "PUBCOMP 1: one slot free");
        s.handle(now, publish("a/b", 2, 5));
        assert!(!s.closing(), "within the Receive Maximum (3 waiting for PUBREL, 1 new)");
        s.handle(now, publish("a/b", 1, 6));
        assert!(s.closing(), "a fifth while four wait for PUBREL or their commit");
    }

    #[test]
    fn session_expiry_in_disconnect_replaces_the_connects_mqtt_3_14_2_2_2() {
        let mut start = start(Version::V5);
        start.session_expiry_s = 60;
        start.persistent = true;
        let now = Instant::now();
        let mut s = Session::new(start, limits(), now);
        s.handle(now, In::Disconnect { reason: reason::SUCCESS, session_expiry_s: Some(0) });
        assert_eq!(s.end(), Some(&Ok(true)));
        assert!(!s.persistent && s.session_expiry_s == 0, "the session ends with the connection");
        // [MQTT-3.14.2-2]: none at CONNECT, one at DISCONNECT: protocol error (the will goes out).
        let (mut s, now) = session(Version::V5);
        s.handle(now, In::Disconnect { reason: reason::SUCCESS, session_expiry_s: Some(30) });
        assert_eq!(disconnect(&actions(&mut s)), Some(Some(reason::PROTOCOL_ERROR)));
        assert!(matches!(s.end(), Some(Err(_))));
    }

    #[test]
    fn answers_waiting_for_commits_are_bounded_mqtt_4_9() {
        let (mut s, now) = session(Version::V4);
        for pkid in 1..=4 {
            s.handle(now, publish("a/b", 1, pkid));
        }
        let t = tickets(&actions(&mut s));
        // Deliveries queue behind the first PUBACK, up to inflight_messages_max + 16 answers.
        let mut queued = 4;
        while !s.backlogged() {
            assert_eq!(s.publish_out("d", 0, false, b"x", PublishProps::default(), Source::Retained), Sent::Out);
            queued += 1;
        }
        assert_eq!(queued, 4 + 16);
        assert!(!s.wants_read(), "3.1.1: no more packets are read");
        assert!(sent(&actions(&mut s)).is_empty());
        s.resolve(t[0], Ok(()));
        assert!(!s.backlogged() && s.wants_read());
        assert_eq!(sent(&actions(&mut s)).len(), 1, "PUBACK 1; the rest wait for PUBACK 2");
    }

    #[test]
    fn a_refused_publish_closes_a_3_1_1_connection_after_the_earlier_answers() {
        let (mut s, now) = session(Version::V4);
        s.handle(now, publish("a/b", 1, 1));
        s.handle(now, publish("a/b", 1, 2));
        let t = tickets(&actions(&mut s));
        s.resolve(t[1], Err(reason::QUOTA_EXCEEDED));
        s.resolve(t[0], Ok(()));
        let acts = actions(&mut s);
        assert_eq!(sent(&acts), vec![(0x40, vec![0, 1])]);
        assert_eq!(disconnect(&acts), Some(None), "3.1.1: closed without a DISCONNECT");
    }

    #[test]
    fn topic_aliases_mqtt_3_3_2_3_4() {
        let (mut s, now) = session(Version::V5);
        let aliased = |topic: &str, alias| match publish(topic, 0, 0) {
            In::Publish { topic, qos, retain, dup, pkid, payload, .. } => {
                let props = PublishProps { topic_alias: Some(alias), ..PublishProps::default() };
                In::Publish { topic, qos, retain, dup, pkid, payload, props }
            }
            _ => unreachable!(),
        };
        s.handle(now, aliased("a/b", 1));
        s.handle(now, aliased("", 1));
        let topics: Vec<String> = actions(&mut s)
            .into_iter()
            .filter_map(|a| match a {
                Action::Append { msg, .. } => Some(msg.topic),
                _ => None,
            })
            .collect();
        assert_eq!(topics, ["a/b", "a/b"], "the alias stands for the topic");
        // [MQTT-3.3.2-9]: above the Topic Alias Maximum: 0x94.
        s.handle(now, aliased("a/c", 9));
        assert_eq!(disconnect(&actions(&mut s)), Some(Some(reason::TOPIC_ALIAS_INVALID)));
        // An alias never set: protocol error.
        let (mut s, now) = session(Version::V5);
        s.handle(now, aliased("", 2));
        assert_eq!(disconnect(&actions(&mut s)), Some(Some(reason::PROTOCOL_ERROR)));
    }

    #[test]
    fn a_second_connect_is_a_protocol_error_mqtt_3_1_0_2() {
        let (mut s, now) = session(Version::V5);
        let connect = In::Connect {
            client_id: "c1".into(),
            clean: true,
            keep_alive: 0,
            username: None,
            password: None,
            will: None,
            session_expiry_s: 0,
            receive_max: 10,
            max_packet: None,
            topic_alias_max: 0,
        };
        s.handle(now, connect);
        assert_eq!(disconnect(&actions(&mut s)), Some(Some(reason::PROTOCOL_ERROR)));
    }

    #[test]
    fn keep_alive_expires_at_one_and_a_half_times_mqtt_3_1_2_24() {
        let (mut s, now) = session(Version::V5);
        // First the trim of a new session's buffers (`quiet_sessions_give_back_their_queues`).
        assert_eq!(s.poll_timeout(), Some(now + TRIM_AFTER));
        s.handle_timeout(now + TRIM_AFTER);
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(15)));
        s.handle_timeout(now + Duration::from_millis(14_999));
        assert!(!s.closing());
        s.handle(now + Duration::from_secs(10), In::PingReq);
        assert_eq!(sent(&actions(&mut s)), vec![(0xD0, vec![])]);
        s.handle_timeout(now + Duration::from_secs(20));
        assert!(!s.closing(), "a packet restarts the keep-alive");
        s.handle_timeout(now + Duration::from_secs(25));
        assert_eq!(disconnect(&actions(&mut s)), Some(Some(reason::KEEP_ALIVE_TIMEOUT)));
    }

    /// Issue 14's idle memory: a session quiet for `TRIM_AFTER` gives back its emptied queues
    /// (the action queue alone is ~1 KiB once used), and keeps whatever is still in them.
    #[test]
    fn quiet_sessions_give_back_their_queues() {
        let (mut s, now) = session(Version::V4);
        s.handle_timeout(now + TRIM_AFTER);
        let later = now + Duration::from_secs(1);
        s.handle(later, In::PingReq);
        assert_eq!(sent(&actions(&mut s)), vec![(0xD0, vec![])]);
        assert!(s.actions.capacity() > 0 && s.answers.capacity() > 0, "used: allocated");
        assert_eq!(s.poll_timeout(), Some(later + TRIM_AFTER), "the trim is the next timeout");
        s.handle_timeout(later + TRIM_AFTER - Duration::from_millis(1));
        assert!(s.actions.capacity() > 0, "not before the trim delay");
        // A packet pushes the trim back: a busy connection keeps its queues.
        let busy = later + Duration::from_millis(100);
        s.handle(busy, In::PingReq);
        assert_eq!(sent(&actions(&mut s)), vec![(0xD0, vec![])]);
        assert_eq!(s.poll_timeout(), Some(busy + TRIM_AFTER));
        s.handle_timeout(later + TRIM_AFTER);
        assert!(s.actions.capacity() > 0, "pushed back by the packet");
        let later = busy;
        s.handle_timeout(later + TRIM_AFTER);
        assert_eq!((s.actions.capacity(), s.answers.capacity()), (0, 0), "quiet: given back");
        assert!(!s.closing());
        // A publish waiting for its commit keeps its ticket and answer through a trim.
        s.handle(later, publish("a/b", 1, 7));
        let t = tickets(&actions(&mut s));
        s.handle_timeout(later + TRIM_AFTER);
        s.resolve(t[0], Ok(()));
        assert_eq!(sent(&actions(&mut s)), vec![(0x40, vec![0, 7])], "the PUBACK still goes out");
    }

    #[test]
    fn disconnect_ends_the_session_with_or_without_the_will_mqtt_3_14_4_3() {
        let (mut s, now) = session(Version::V5);
        s.handle(now, In::Disconnect { reason: reason::SUCCESS, session_expiry_s: None });
        assert_eq!(s.end(), Some(&Ok(true)));
        let (mut s, now) = session(Version::V5);
        s.handle(now, In::Disconnect { reason: reason::DISCONNECT_WITH_WILL, session_expiry_s: None });
        assert_eq!(s.end(), Some(&Ok(false)));
    }

    #[test]
    fn a_subscribe_is_worked_through_a_filter_per_step_mqtt_3_8_4() {
        let (mut s, now) = session(Version::V5);
        let sub = |f: &str, qos| wire::Subscription { filter: f.into(), qos, ..Default::default() };
        let subs = vec![sub("a/+", 2), sub("a/#/b", 1), sub("c", 1), sub("d", 0), sub("a/+", 1)];
        s.handle(now, In::Subscribe { pkid: 4, subs });
        assert!(!s.wants_read(), "no packet is read before the SUBACK is queued");
        let mut steps = 0;
        while s.step() {
            steps += 1;
        }
        assert_eq!(steps, 5);
        let acts = actions(&mut s);
        let codes = [2, reason::TOPIC_FILTER_INVALID, 1, reason::QUOTA_EXCEEDED, 1];
        let mut suback = vec![0, 4, 0];
        suback.extend(codes);
        assert_eq!(sent(&acts), vec![(0x90, suback)]);
        assert_eq!(s.subs.len(), 2, "within subscriptions_per_client_max; the repeat replaces");
        s.handle(now, In::Unsubscribe { pkid: 5, filters: vec!["c".into(), "x".into()] });
        while s.step() {}
        assert_eq!(sent(&actions(&mut s)), vec![(0xB0, vec![0, 5, 0, 0, reason::NO_SUBSCRIPTION_EXISTED])]);
    }

    #[test]
    fn retain_handling_decides_the_retained_scan_mqtt_3_3_1_9_10_11() {
        let (mut s, now) = session(Version::V5);
        let sub = |f: &str, retain_handling| wire::Subscription {
            filter: f.into(),
            qos: 1,
            retain_handling,
            ..Default::default()
        };
        let subscribe = |s: &mut Session, subs| {
            s.handle(now, In::Subscribe { pkid: 1, subs });
            while s.step() {}
            actions(s);
            s.retained.iter().map(|r| r.filter.clone()).collect::<Vec<_>>()
        };
        assert_eq!(subscribe(&mut s, vec![sub("a/#", 1)]), ["a/#"], "1: a new subscription gets them");
        s.retained.clear();
        assert!(subscribe(&mut s, vec![sub("a/#", 1)]).is_empty(), "1: an existing one does not");
        assert!(subscribe(&mut s, vec![sub("b/#", 2)]).is_empty(), "2: never");
        assert_eq!(subscribe(&mut s, vec![sub("a/#", 0)]), ["a/#"], "0: every time");
    }

    #[test]
    fn the_outbound_window_is_bounded_and_a_puback_frees_it_mqtt_4_9() {
        let (mut s, now) = session(Version::V5);
        let props = PublishProps::default();
        for _ in 0..3 {
            assert_eq!(s.publish_out("t", 1, false, b"x", props.clone(), Source::Retained), Sent::Out);
        }
        assert_eq!(
            s.publish_out("t", 1, false, b"x", props.clone(), Source::Retained),
            Sent::WindowFull,
            "Receive Maximum 3"
        );
        assert_eq!(
            s.publish_out("t", 0, false, b"x", props.clone(), Source::Retained),
            Sent::Out,
            "QoS 0 takes no slot"
        );
        s.handle(now, In::PubAck(1));
        assert_eq!(s.publish_out("t", 1, false, b"x", props.clone(), Source::Retained), Sent::Out);
    }

    #[test]
    fn the_server_assigns_topic_aliases_up_to_its_limit_mqtt_3_3_2_3_4() {
        let (mut s, _) = session(Version::V5);
        let props = PublishProps::default;
        for topic in ["a", "a", "b", "c", "c", "a"] {
            assert_eq!(s.publish_out(topic, 0, false, b"x", props(), Source::Retained), Sent::Out);
        }
        let aliases: Vec<(u8, Vec<u8>)> = sent(&actions(&mut s));
        // Topic (u16 length, name), then the properties: 0x23 alias.
        let expect = |name: &str, alias: Option<u8>| {
            let mut b = (name.len() as u16).to_be_bytes().to_vec();
            b.extend_from_slice(name.as_bytes());
            match alias {
                Some(a) => b.extend_from_slice(&[3, 0x23, 0, a]),
                None => b.push(0),
            }
            b.push(b'x');
            (0x30, b)
        };
        let want = [
            expect("a", Some(1)),
            expect("", Some(1)),
            expect("b", Some(2)),
            expect("c", None),
            expect("c", None),
            expect("", Some(1)),
        ];
        assert_eq!(aliases, want, "two aliases (the limit), then full topics");
    }

    #[test]
    fn a_message_over_the_clients_maximum_packet_size_is_not_sent_mqtt_3_1_2_25() {
        let (mut s, _) = session(Version::V5);
        let props = PublishProps::default();
        assert_eq!(s.publish_out("t", 1, false, &[0; 100], props.clone(), Source::Retained), Sent::TooLarge);
        assert_eq!(s.out.free(), 3, "its packet id is free again");
        assert!(sent(&actions(&mut s)).is_empty());
    }
}
