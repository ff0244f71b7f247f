//! Delayed will messages (MQTT 5 Will Delay Interval), without I/O: one queue ordered by due time
//! for the whole listener, bounded by `mqtt.delayed_wills_max` and `mqtt.delayed_will_bytes_max`.
//! A will that does not fit is handed back to be published at once (the client is gone; a will
//! is never dropped). A client that reconnects before its will is due cancels it.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

#[derive(Debug)]
pub(super) struct WillQueue<W> {
    by_due: BTreeMap<(Instant, u64), (String, usize, W)>,
    by_client: HashMap<String, (Instant, u64)>,
    bytes: usize,
    seq: u64,
    count_max: usize,
    bytes_max: usize,
}

impl<W> WillQueue<W> {
    pub fn new(count_max: usize, bytes_max: usize) -> Self {
        Self { by_due: BTreeMap::new(), by_client: HashMap::new(), bytes: 0, seq: 0, count_max, bytes_max }
    }

    pub fn len(&self) -> usize {
        self.by_due.len()
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Schedules `client`'s will for `due` (replacing one it had), or hands it back when the
    /// queue is at a limit.
    pub fn schedule(&mut self, client: &str, due: Instant, bytes: usize, will: W) -> Result<(), W> {
        // A client has one will; an earlier one was cancelled by its reconnect already.
        let _ = self.cancel(client);
        if self.by_due.len() >= self.count_max || self.bytes + bytes > self.bytes_max {
            return Err(will);
        }
        self.seq += 1;
        self.by_due.insert((due, self.seq), (client.to_string(), bytes, will));
        self.by_client.insert(client.to_string(), (due, self.seq));
        self.bytes += bytes;
        Ok(())
    }

    /// The client is back: its will is not published.
    pub fn cancel(&mut self, client: &str) -> Option<W> {
        let at = self.by_client.remove(client)?;
        let (_, bytes, will) = self.by_due.remove(&at)?;
        self.bytes -= bytes;
        Some(will)
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.by_due.keys().next().map(|(due, _)| *due)
    }

    /// The next will due at `now`, with its client.
    pub fn pop_due(&mut self, now: Instant) -> Option<(String, W)> {
        let (&(due, seq), _) = self.by_due.iter().next()?;
        if due > now {
            return None;
        }
        let (client, bytes, will) = self.by_due.remove(&(due, seq))?;
        self.by_client.remove(&client);
        self.bytes -= bytes;
        Some((client, will))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wills_come_due_in_order_and_a_return_cancels_one() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut q = WillQueue::new(10, 1000);
        q.schedule("b", t0 + s(20), 10, 'b').expect("room");
        q.schedule("a", t0 + s(10), 10, 'a').expect("room");
        q.schedule("c", t0 + s(30), 10, 'c').expect("room");
        assert_eq!(q.next_due(), Some(t0 + s(10)));
        assert_eq!(q.pop_due(t0 + s(5)), None, "nothing due yet");
        assert_eq!(q.cancel("b"), Some('b'), "b reconnected");
        assert_eq!(q.pop_due(t0 + s(60)), Some(("a".to_string(), 'a')));
        assert_eq!(q.pop_due(t0 + s(60)), Some(("c".to_string(), 'c')));
        assert_eq!(q.pop_due(t0 + s(60)), None);
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }

    #[test]
    fn limits_hand_the_will_back_and_a_client_has_one_will() {
        let t0 = Instant::now();
        let mut q = WillQueue::new(2, 100);
        q.schedule("a", t0, 60, 1).expect("room");
        assert_eq!(q.schedule("b", t0, 41, 2), Err(2), "over delayed_will_bytes_max");
        q.schedule("b", t0, 40, 3).expect("room");
        assert_eq!(q.schedule("c", t0, 1, 4), Err(4), "over delayed_wills_max");
        q.schedule("a", t0, 10, 5).expect("a's new will replaces its old one");
        assert_eq!((q.len(), q.bytes()), (2, 50));
        assert_eq!(q.cancel("a"), Some(5));
    }
}
