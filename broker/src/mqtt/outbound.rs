//! The outbound in-flight window of one session, without I/O: packet ids for QoS 1/2 messages
//! sent to the client and the messages still waiting for PUBACK, or PUBREC then PUBCOMP. The
//! window never holds more than its limit (the client's Receive Maximum and
//! `mqtt.inflight_messages_max`), and taking a packet id never spins: it fails when the window is
//! full and otherwise looks at no more ids than there are messages in flight.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

/// Messages in flight by packet id, at most `limit` of them.
#[derive(Debug)]
pub(super) struct Window<T> {
    limit: usize,
    next: u16,
    inflight: HashMap<u16, T>,
}

impl<T> Window<T> {
    /// A window of `limit` messages (1 to 65,535: packet ids are 1..=65,535).
    pub fn new(limit: usize) -> Self {
        Self { limit: limit.clamp(1, usize::from(u16::MAX)), next: 1, inflight: HashMap::new() }
    }

    /// Gives back the map's capacity when nothing is in flight.
    pub fn trim(&mut self) {
        if self.inflight.is_empty() {
            self.inflight = HashMap::new();
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Messages that may still be sent before the window is full.
    pub fn free(&self) -> usize {
        self.limit.saturating_sub(self.inflight.len())
    }

    pub fn is_full(&self) -> bool {
        self.free() == 0
    }

    /// Puts `entry` in flight under a free packet id, or gives it back when the window is full.
    /// As fewer than 65,535 ids are in use, a free one is found within `len() + 1` steps.
    pub fn insert(&mut self, entry: T) -> Result<u16, T> {
        if self.is_full() {
            return Err(entry);
        }
        for _ in 0..=self.inflight.len() {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if let Entry::Vacant(slot) = self.inflight.entry(id) {
                slot.insert(entry);
                return Ok(id);
            }
        }
        // Unreachable: fewer than `limit` <= 65,535 ids are taken, so one of len()+1 distinct
        // consecutive ids is free.
        debug_assert!(false, "no free packet id with {} in flight", self.inflight.len());
        Err(entry)
    }

    /// Puts `entry` back in flight under the packet id it had (a resumed session), if that id is
    /// free and the window has room.
    pub fn insert_with_id(&mut self, id: u16, entry: T) -> Result<(), T> {
        if id == 0 || self.is_full() {
            return Err(entry);
        }
        match self.inflight.entry(id) {
            Entry::Vacant(slot) => {
                slot.insert(entry);
                Ok(())
            }
            Entry::Occupied(_) => Err(entry),
        }
    }

    pub fn get_mut(&mut self, id: u16) -> Option<&mut T> {
        self.inflight.get_mut(&id)
    }

    pub fn remove(&mut self, id: u16) -> Option<T> {
        self.inflight.remove(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, &T)> {
        self.inflight.iter().map(|(id, m)| (*id, m))
    }

    pub fn retain(&mut self, keep: impl FnMut(&u16, &mut T) -> bool) {
        self.inflight.retain(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_bounds_what_is_in_flight() {
        let mut w = Window::new(3);
        let ids: Vec<u16> = (0..3).map(|i| w.insert(i).expect("room")).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(w.insert(9), Err(9), "full: refused, nothing spins");
        assert_eq!(w.remove(2), Some(1));
        assert_eq!(w.insert(4), Ok(4), "ids go on rising, never reusing one just acknowledged at once");
        assert_eq!((w.len(), w.free()), (3, 0));
    }

    #[test]
    fn a_full_window_of_every_packet_id_refuses_at_once() {
        let mut w = Window::new(usize::MAX);
        assert_eq!(w.limit(), 65_535);
        for i in 0..65_535u32 {
            w.insert(i).expect("a free id");
        }
        assert!(w.is_full());
        // The loop that used to spin forever at 65,535 in flight now answers at once.
        assert_eq!(w.insert(7), Err(7));
        assert_eq!(w.remove(40_000), Some(39_999));
        assert_eq!(w.insert(7), Ok(40_000), "the one free id is found");
        assert!(w.iter().all(|(id, _)| id != 0), "0 is never a packet id");
    }

    #[test]
    fn ids_in_use_are_skipped_and_0_is_never_used() {
        let mut w = Window::new(10);
        w.insert_with_id(1, 'a').expect("resumed id");
        w.insert_with_id(2, 'b').expect("resumed id");
        assert_eq!(w.insert_with_id(2, 'c'), Err('c'), "an id in use is not taken twice");
        assert_eq!(w.insert('d'), Ok(3), "1 and 2 are in use");
        assert_eq!(w.insert_with_id(0, 'e'), Err('e'));
        w.insert_with_id(65_535, 'f').expect("resumed id");
        let mut w2 = Window::new(2);
        w2.next = 65_535;
        assert_eq!(w2.insert('x'), Ok(65_535));
        assert_eq!(w2.insert('y'), Ok(1), "wraps to 1, skipping 0");
    }
}
