//! MQTT 5 shared subscriptions (`$share/{group}/{filter}`): a group's common cursors, the
//! messages its members hold unacknowledged, and the ones a departed member gave back, so each
//! message goes to one member and none is lost when a member leaves. Reads go to the store:
//! callers run `take` on the blocking pool, and one call reads a bounded amount.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::storage::batch::StoredRecord;
use crate::storage::Store;

use super::persist::{Cursors, Position};

/// One shared subscription, shared by the sessions subscribed to it.
#[derive(Debug)]
pub(super) struct SharedGroup {
    /// The full `$share/{group}/{filter}` (its identity and stored key).
    pub name: String,
    /// The topic filter after the group name.
    pub filter: String,
    state: Mutex<GroupState>,
}

#[derive(Debug, Default)]
struct GroupState {
    /// Next offset to hand out per (log topic, partition).
    cursors: Cursors,
    /// Handed to a member and not yet acknowledged by it, per partition.
    outstanding: HashMap<(String, i32), BTreeSet<i64>>,
    /// Given back by members that left before acknowledging: handed out first.
    returned: VecDeque<Position>,
    /// When no member session that stored the group is left (ms since the epoch, 0 = never);
    /// `None` until a member stores it.
    deadline: Option<i64>,
}

/// Chunks of the log one `take` reads at most; the caller comes back for the rest.
const TAKE_READS_MAX: usize = 16;
/// Bytes of one such chunk.
const TAKE_READ_BYTES: usize = 64 * 1024;

impl SharedGroup {
    /// A group starting at `cursors` (stored ones, or the log ends for a new subscription).
    pub fn new(name: &str, filter: &str, cursors: Cursors, deadline: Option<i64>) -> Self {
        let state = GroupState { cursors, deadline, ..GroupState::default() };
        Self { name: name.to_string(), filter: filter.to_string(), state: Mutex::new(state) }
    }

    fn state(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The partitions the group reads (for watermark watches).
    pub fn partitions(&self) -> Vec<(String, i32)> {
        self.state().cursors.keys().cloned().collect()
    }

    /// A member session that expires at `deadline_ms` (0 = never) stores the group: the group's
    /// own deadline becomes the later of the two. Returns it, to be stored with the group.
    pub fn extend_deadline(&self, deadline_ms: i64) -> i64 {
        let mut st = self.state();
        let d = st.deadline.map_or(deadline_ms, |cur| super::persist::later_deadline(cur, deadline_ms));
        st.deadline = Some(d);
        d
    }

    /// Takes up to `budget` records for one member: given-back ones first, then new ones from the
    /// cursors of `log_topics` (partitions not seen before start at their log start). Records
    /// `wanted` refuses are passed over. Every record taken is outstanding until `settle`d or
    /// given back. Reads at most `TAKE_READS_MAX` chunks; the flag says whether records may be
    /// left that the reads did not reach.
    pub fn take(
        &self,
        store: &Store,
        log_topics: &[String],
        budget: usize,
        wanted: impl Fn(&str, &StoredRecord) -> bool,
    ) -> (Vec<(Position, StoredRecord)>, bool) {
        let mut st = self.state();
        let mut out = Vec::new();
        let mut reads = 0;
        while out.len() < budget {
            if reads >= TAKE_READS_MAX {
                return (out, true);
            }
            let Some((t, p, off)) = st.returned.pop_front() else { break };
            reads += 1;
            // Gone to retention meanwhile: nothing to hand out, and nothing outstanding.
            let record = store.read_records(&t, p, off, 1).ok().and_then(|rs| rs.into_iter().find(|r| r.offset == off));
            match record {
                Some(r) => out.push(((t, p, off), r)),
                None => remove_outstanding(&mut st, &(t, p, off)),
            }
        }
        for t in log_topics {
            let Some(info) = store.topic(t) else { continue };
            for p in 0..info.partitions as i32 {
                if let Ok(wm) = store.watermarks(t, p) {
                    st.cursors.entry((t.to_string(), p)).or_insert(wm.log_start_offset);
                }
            }
        }
        let keys: Vec<(String, i32)> = st.cursors.keys().cloned().collect();
        for (t, p) in keys {
            while out.len() < budget {
                let Some(&offset) = st.cursors.get(&(t.clone(), p)) else { break };
                let Ok(wm) = store.watermarks(&t, p) else { break };
                if offset >= wm.high_watermark {
                    break;
                }
                if reads >= TAKE_READS_MAX {
                    return (out, true);
                }
                reads += 1;
                let from = offset.max(wm.log_start_offset);
                let Ok(records) = store.read_records(&t, p, from, TAKE_READ_BYTES) else { break };
                let mut next = from;
                for r in records {
                    if r.offset < from {
                        continue;
                    }
                    if out.len() >= budget {
                        break;
                    }
                    next = r.offset + 1;
                    if wanted(&t, &r) {
                        st.outstanding.entry((t.clone(), p)).or_default().insert(r.offset);
                        out.push(((t.clone(), p, r.offset), r));
                    }
                }
                if next == from {
                    break;
                }
                st.cursors.insert((t.clone(), p), next);
            }
        }
        // Given-back records stay outstanding while a member holds them again.
        (out, false)
    }

    /// The member is done with this record (acknowledged, or sent at QoS 0, or dropped).
    pub fn settle(&self, position: &Position) {
        remove_outstanding(&mut self.state(), position);
    }

    /// A member left without acknowledging: the record goes to the next member that takes.
    pub fn give_back(&self, position: Position) {
        self.state().returned.push_back(position);
    }

    /// Where the group would restart after a broker restart: per partition, the lowest record
    /// not yet acknowledged (records after it already acknowledged are delivered again: at least
    /// once, never lost).
    pub fn restart_cursors(&self) -> Cursors {
        let st = self.state();
        let mut c = st.cursors.clone();
        for (key, offsets) in &st.outstanding {
            if let (Some(first), Some(cur)) = (offsets.first(), c.get_mut(key)) {
                *cur = (*cur).min(*first);
            }
        }
        c
    }
}

fn remove_outstanding(st: &mut GroupState, (t, p, off): &Position) {
    let key = (t.clone(), *p);
    if let Some(set) = st.outstanding.get_mut(&key) {
        set.remove(off);
        if set.is_empty() {
            st.outstanding.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_cursor_is_the_lowest_unacknowledged_record() {
        let g = SharedGroup::new("$share/g/a", "a", HashMap::from([(("t".to_string(), 0), 10)]), None);
        {
            let mut st = g.state();
            st.outstanding.entry(("t".to_string(), 0)).or_default().extend([4, 6]);
        }
        assert_eq!(g.restart_cursors()[&("t".to_string(), 0)], 4);
        g.settle(&("t".to_string(), 0, 4));
        assert_eq!(g.restart_cursors()[&("t".to_string(), 0)], 6);
        g.give_back(("t".to_string(), 0, 6));
        assert_eq!(g.restart_cursors()[&("t".to_string(), 0)], 6, "given back is still unacknowledged");
        g.settle(&("t".to_string(), 0, 6));
        assert_eq!(g.restart_cursors()[&("t".to_string(), 0)], 10);
    }

    #[test]
    fn the_group_lives_as_long_as_the_longest_member_session() {
        let g = SharedGroup::new("$share/g/a", "a", HashMap::new(), None);
        assert_eq!(g.extend_deadline(500), 500);
        assert_eq!(g.extend_deadline(300), 500, "a shorter session does not shorten it");
        assert_eq!(g.extend_deadline(900), 900);
        assert_eq!(g.extend_deadline(0), 0, "a session without expiry keeps it for good");
        assert_eq!(g.extend_deadline(1000), 0);
    }
}
