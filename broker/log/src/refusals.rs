//! Recent refusals: a bounded ring of what was refused to whom (failed logins, denied publishes,
//! writes refused for a full disk or a write fault), for the operator's status page. Each is
//! also counted in the metrics where it happens; this keeps the last few with their details.
//! A refusal equal to the newest one (same kind, protocol, who and detail) only bumps its count
//! and time, so one client retrying in a loop takes one slot, not the whole ring.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

/// Entries kept until the gateway sets its configured limit (`status.refusals_max`).
pub const REFUSALS_MAX_DEFAULT: usize = 64;
/// Bytes kept of `who` and `detail` (client ids, user names and topics are client strings).
pub const REFUSAL_TEXT_BYTES_MAX: usize = 160;

/// What was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// A failed login (MQTT CONNECT, Kafka SASL, the status page).
    Login,
    /// A publish or produce the user's rules do not allow.
    Publish,
    /// Writes refused by the store: disk full, or a write fault (the store retries).
    Storage,
}

impl RefusalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::Login => "login",
            RefusalKind::Publish => "publish",
            RefusalKind::Storage => "storage",
        }
    }
}

/// One refusal (or a run of equal ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Wall-clock time of the latest occurrence, Unix milliseconds.
    pub at_ms: i64,
    pub kind: RefusalKind,
    /// `mqtt`, `kafka`, `http` or `store`.
    pub protocol: &'static str,
    /// The peer, client id or user (client strings cut to [`REFUSAL_TEXT_BYTES_MAX`]).
    pub who: String,
    pub detail: String,
    /// Equal refusals in a row.
    pub count: u64,
}

#[derive(Debug)]
struct Ring {
    limit: usize,
    entries: VecDeque<Refusal>,
    total: u64,
}

/// The ring, shared by the store's writer and the front ends (through `Store::refusals`).
#[derive(Debug)]
pub struct Refusals(Mutex<Ring>);

impl Default for Refusals {
    fn default() -> Self {
        Self::new(REFUSALS_MAX_DEFAULT)
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Refusals {
    pub fn new(limit: usize) -> Self {
        Self(Mutex::new(Ring { limit, entries: VecDeque::with_capacity(limit.min(1024)), total: 0 }))
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the number of entries kept (the oldest beyond it go at once).
    pub fn set_limit(&self, limit: usize) {
        let mut r = self.ring();
        r.limit = limit;
        while r.entries.len() > limit {
            r.entries.pop_front();
        }
    }

    /// Records a refusal now.
    pub fn record(&self, kind: RefusalKind, protocol: &'static str, who: &str, detail: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        self.record_at(now, kind, protocol, who, detail);
    }

    /// Records a refusal at `at_ms`.
    pub fn record_at(&self, at_ms: i64, kind: RefusalKind, protocol: &'static str, who: &str, detail: &str) {
        let who = cut(who, REFUSAL_TEXT_BYTES_MAX);
        let detail = cut(detail, REFUSAL_TEXT_BYTES_MAX);
        let mut r = self.ring();
        r.total += 1;
        if let Some(last) = r.entries.back_mut() {
            if last.kind == kind && last.protocol == protocol && last.who == who && last.detail == detail {
                last.count += 1;
                last.at_ms = at_ms;
                return;
            }
        }
        if r.limit == 0 {
            return;
        }
        while r.entries.len() >= r.limit {
            r.entries.pop_front();
        }
        r.entries.push_back(Refusal { at_ms, kind, protocol, who, detail, count: 1 });
        debug_assert!(r.entries.len() <= r.limit);
    }

    /// The kept refusals, newest first.
    pub fn recent(&self) -> Vec<Refusal> {
        self.ring().entries.iter().rev().cloned().collect()
    }

    /// Refusals recorded since the start (repeats included, also those no longer kept).
    pub fn total(&self) -> u64 {
        self.ring().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_up_to_its_limit_and_coalesces_repeats() {
        let r = Refusals::new(3);
        for i in 0..5 {
            r.record_at(i, RefusalKind::Login, "mqtt", &format!("client-{i}"), "wrong password");
        }
        let who: Vec<_> = r.recent().into_iter().map(|x| x.who).collect();
        assert_eq!(who, ["client-4", "client-3", "client-2"], "newest first, oldest dropped");
        // The same refusal again bumps the newest entry instead of taking a slot.
        r.record_at(9, RefusalKind::Login, "mqtt", "client-4", "wrong password");
        let recent = r.recent();
        assert_eq!(recent.len(), 3);
        assert_eq!((recent[0].count, recent[0].at_ms), (2, 9));
        assert_eq!(recent[2].who, "client-2", "a repeat evicts nothing");
        // Differing in any part is a new entry.
        r.record_at(10, RefusalKind::Publish, "mqtt", "client-4", "wrong password");
        assert_eq!(r.recent()[0].kind, RefusalKind::Publish);
        assert_eq!(r.total(), 7);
        r.set_limit(1);
        assert_eq!(r.recent().len(), 1);
        r.set_limit(0);
        r.record_at(11, RefusalKind::Storage, "store", "", "disk full");
        assert!(r.recent().is_empty(), "limit 0 keeps nothing");
    }

    #[test]
    fn client_strings_are_cut_at_a_character_boundary() {
        let r = Refusals::new(2);
        let long = "é".repeat(REFUSAL_TEXT_BYTES_MAX);
        r.record_at(0, RefusalKind::Publish, "mqtt", &long, &long);
        let got = &r.recent()[0];
        assert!(got.who.len() <= REFUSAL_TEXT_BYTES_MAX && got.who.len() >= REFUSAL_TEXT_BYTES_MAX - 1);
        assert!(got.who.chars().all(|c| c == 'é') && got.detail == got.who);
    }
}
