//! Latest-first catch-up, sans-I/O: when a compacted topic of `mirror.latest_first_topics` has a
//! backlog, its live stream (`{site}.{topic}.live`, the preview of `fresh.rs`) first sends the
//! backlog's compacted view: the latest record of every key among the unsent records (what
//! Kafka's compaction would keep of them, tombstones included), in offset order; then it goes on
//! as a fresh tail. This module owns that view's decisions ([`LatestView`]), fed with `now`; the
//! gateway's driver (`gateway.rs`, `LiveSender`) does the reads and the sends.
//!
//! The view covers `[from, to)`: `from` is where the receiver's copy of the live stream ends or
//! where the ordered stream is, whichever is further; `to` is the high watermark when the
//! backlog was seen. It is built in *windows*: a window maps key -> latest offset
//! (`LatestKeys`, at most `mirror.latest_first_map_bytes_max`, reading batches in order from the
//! window's start), then reads the same batches again and sends, of each, the records that are
//! their key's latest in the window (the stored batch rewritten with only them, source offsets
//! unchanged: `batch::retain_records`). When every key fits, there is one window and the view
//! is exact; when not, a window ends at the batch whose keys would overflow the map and the next
//! one starts there, so a key may go once per window (each later value after its earlier one).
//!
//! `{site}.{topic}` is untouched: every record, in order, exactly once. On the preview each
//! record goes at most once: the view sends in strictly increasing offsets, the fresh tail
//! afterwards starts at `to`, the next backlog's view (once this backlog is over) starts where the
//! tail is, and a new session starts where the receiver's copy ends. A central
//! consumer gets the current state of the backlog's keys from the preview alone; the latest value
//! of a key is its record with the highest source offset (header `tributary.offset`) among
//! `{site}.{topic}` and the preview. The ordered stream goes on meanwhile at its share of the
//! link: records it sends while the view runs may go on the preview too; once it has sent
//! everything below `to`, the view has nothing to add and stops. Compaction on the gateway may
//! remove a record the view mapped as its key's latest, when a later record of the key exists:
//! that one goes in a later window, or, if it came after the view began (at or past `to`), on the
//! fresh tail while it is fresh, else only in `{site}.{topic}`.

use tributary_log::batch::{BatchError, BatchHeader};
use tributary_log::keymap::LatestKeys;

/// One partition's compacted view of its backlog: where it stands and what it does next.
#[derive(Debug)]
pub struct LatestView {
    keys: LatestKeys,
    state: State,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    windows: u64,
    keys_mapped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No backlog seen yet.
    Waiting,
    /// Mapping the window that starts at `from`: the batches below `at` are in the map.
    Map { from: i64, at: i64, to: i64 },
    /// Sending the window `[from, end)`: its next read is at `at`.
    Emit { from: i64, at: i64, end: i64, to: i64 },
    /// Over (or nothing to do): the live stream goes on from `to` as a fresh tail.
    Done { to: i64 },
}

/// What the view does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewStep {
    /// Nothing for the view now (no backlog yet, or this backlog's view is over): the fresh
    /// tail decides.
    Wait,
    /// Read batches from `from` and offer each to [`LatestView::map`], until it says stop.
    Map { from: i64 },
    /// Read batches from `from` and offer each to [`LatestView::emit`], until it says stop.
    Emit { from: i64 },
    /// The view is over (said once per view): the live stream continues from `to` as a fresh
    /// tail, until the backlog is over; the next backlog starts a new view.
    Done { to: i64 },
}

/// What to do with one batch read during a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (after [`LatestView::emit`]: send the records [`LatestView::keep`] selects).
    Next,
    /// Below the position (the batch holding it was offered before): nothing of it goes.
    Skip,
    /// The phase is over at this batch: ask [`LatestView::step`] again.
    Stop,
}

impl LatestView {
    /// `limit_bytes`: the map's memory (`mirror.latest_first_map_bytes_max`).
    pub fn new(limit_bytes: u64) -> Self {
        Self {
            keys: LatestKeys::new(limit_bytes),
            state: State::Waiting,
            started_ms: None,
            finished_ms: None,
            windows: 0,
            keys_mapped: 0,
        }
    }

    /// The next step, given whether the partition has a backlog (`FreshTail::backlog`), where
    /// the live stream's receiver copy ends (`live_next`), the ordered stream's position, the
    /// high watermark and `now`.
    pub fn step(
        &mut self,
        backlog: bool,
        live_next: i64,
        ordered_sent: i64,
        high_watermark: i64,
        now_ms: i64,
    ) -> ViewStep {
        match self.state {
            State::Waiting if !backlog => ViewStep::Wait,
            State::Waiting => {
                let from = live_next.max(ordered_sent);
                if from >= high_watermark {
                    self.state = State::Done { to: from };
                    return ViewStep::Done { to: from };
                }
                self.started_ms = Some(now_ms);
                self.state = State::Map { from, at: from, to: high_watermark };
                ViewStep::Map { from }
            }
            State::Map { to, .. } | State::Emit { to, .. } if ordered_sent >= to => {
                // The ordered stream sent it all meanwhile: nothing left to preview.
                self.finish(to, now_ms);
                ViewStep::Done { to }
            }
            State::Map { at, .. } => ViewStep::Map { from: at },
            State::Emit { end, at, to, .. } if at >= end => {
                self.keys.clear();
                if end >= to {
                    self.finish(to, now_ms);
                    return ViewStep::Done { to };
                }
                self.state = State::Map { from: end, at: end, to };
                ViewStep::Map { from: end }
            }
            State::Emit { at, .. } => ViewStep::Emit { from: at },
            State::Done { .. } if !backlog => {
                // That backlog is over: the next one (a link that keeps up, then falls behind
                // again) gets a view of its own, from where the preview is then.
                self.state = State::Waiting;
                self.started_ms = None;
                self.finished_ms = None;
                self.windows = 0;
                self.keys_mapped = 0;
                ViewStep::Wait
            }
            // The fresh tail follows this backlog.
            State::Done { .. } => ViewStep::Wait,
        }
    }

    fn finish(&mut self, to: i64, now_ms: i64) {
        self.keys.clear();
        self.state = State::Done { to };
        if self.started_ms.is_some() {
            self.finished_ms = Some(now_ms);
        }
    }

    /// A stored batch read at the mapping position.
    pub fn map(&mut self, batch: &[u8], decompressed_limit: u64) -> Result<Verdict, BatchError> {
        let State::Map { from, at, to } = self.state else { return Ok(Verdict::Stop) };
        let h = BatchHeader::parse(batch)?;
        if h.next_offset() <= at {
            return Ok(Verdict::Skip);
        }
        if h.base_offset >= to {
            // Past the view: the window ends at its end.
            self.end_window(from, to, to);
            return Ok(Verdict::Stop);
        }
        if !self.keys.admit(batch, from, decompressed_limit)? {
            // The map is full: this window ends before the batch, the next one starts there.
            self.end_window(from, h.base_offset.max(at), to);
            return Ok(Verdict::Stop);
        }
        let at = h.next_offset();
        if at >= to {
            self.end_window(from, to, to);
            return Ok(Verdict::Stop);
        }
        self.state = State::Map { from, at, to };
        Ok(Verdict::Next)
    }

    /// Nothing is stored from the read position to the view's end (compaction or retention
    /// removed it meanwhile): the phase is over.
    pub fn nothing_stored(&mut self) {
        match self.state {
            State::Map { from, to, .. } => self.end_window(from, to, to),
            State::Emit { from, end, to, .. } => self.state = State::Emit { from, at: end, end, to },
            State::Waiting | State::Done { .. } => {}
        }
    }

    fn end_window(&mut self, from: i64, end: i64, to: i64) {
        debug_assert!(end > from || self.keys.is_empty(), "a window holds at least one batch");
        self.windows += 1;
        self.keys_mapped += self.keys.len() as u64;
        self.state = State::Emit { from, at: from, end, to };
    }

    /// A stored batch `[base, next_offset)` read at the sending position: `Next` to send what
    /// [`Self::keep`] selects of it, `Stop` when it is past the window.
    pub fn emit(&mut self, base: i64, next_offset: i64) -> Verdict {
        let State::Emit { from, at, end, to } = self.state else { return Verdict::Stop };
        if base >= end {
            self.state = State::Emit { from, at: end, end, to };
            return Verdict::Stop;
        }
        if next_offset <= at {
            return Verdict::Skip;
        }
        self.state = State::Emit { from, at: next_offset.min(end), end, to };
        Verdict::Next
    }

    /// Whether the record of `key` at `offset` (of the batch just offered to [`Self::emit`])
    /// goes on the preview: it is its key's latest in the window. Keyless records have no
    /// latest (compacted topics refuse them).
    pub fn keep(&self, key: Option<&[u8]>, offset: i64) -> bool {
        let State::Emit { from, end, .. } = self.state else { return false };
        offset >= from && offset < end && key.is_some_and(|k| self.keys.is_latest(k, offset))
    }

    /// Whether no view has started since the last backlog ended (or ever).
    pub fn waiting(&self) -> bool {
        self.state == State::Waiting
    }

    /// Whether the view has started and not ended.
    pub fn running(&self) -> bool {
        matches!(self.state, State::Map { .. } | State::Emit { .. })
    }

    /// Windows mapped so far (1 for a backlog whose keys fit the map).
    pub fn windows(&self) -> u64 {
        self.windows
    }

    /// Keys mapped so far, summed over the windows.
    pub fn keys_mapped(&self) -> u64 {
        self.keys_mapped
    }

    /// From the backlog seen to the view's last record sent: the time the preview took to
    /// hold the current state (`None` until a view that started is over).
    pub fn time_to_current_ms(&self) -> Option<i64> {
        Some(self.finished_ms? - self.started_ms?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use tributary_log::batch::{encode_batch, retain_records, NewRecord, Retained};
    use tributary_log::keymap::ENTRY_OVERHEAD_BYTES;
    use tributary_log::{Codec, TimestampKind};

    use super::*;

    const LIMIT: u64 = 1 << 20;

    /// Stored batches from offset 0, one per `&[key]` (`None` value: a tombstone for keys ending
    /// in `!`).
    fn log(batches: &[&[&str]]) -> Vec<Vec<u8>> {
        let mut base = 0;
        batches
            .iter()
            .map(|keys| {
                let records: Vec<NewRecord> = keys
                    .iter()
                    .map(|k| match k.strip_suffix('!') {
                        Some(k) => NewRecord { key: Some(Bytes::from(k.to_string())), ..NewRecord::default() },
                        None => NewRecord::new(Some(Bytes::from(k.to_string())), format!("{k}@{base}")),
                    })
                    .collect();
                let with_ts: Vec<_> = records.iter().map(|r| (r, 1_700_000_000_000)).collect();
                let mut out = Vec::new();
                encode_batch(&with_ts, base, Codec::Lz4, TimestampKind::CreateTime, 0, &mut out).expect("encode");
                base += keys.len() as i64;
                out
            })
            .collect()
    }

    fn header(b: &[u8]) -> BatchHeader {
        BatchHeader::parse(b).expect("header")
    }

    /// The driver without I/O: reads up to `per_read` batches from a position (the batch holding
    /// it first, as the store's fetch does) until the view is over; the records it sent, as
    /// (offset, key, tombstone), and the windows.
    fn run(
        view: &mut LatestView,
        log: &[Vec<u8>],
        per_read: usize,
        live_next: i64,
        ordered_sent: impl Fn(usize) -> i64,
    ) -> Vec<(i64, String, bool)> {
        let hw = log.last().map_or(0, |b| header(b).next_offset());
        let mut sent = Vec::new();
        for round in 0..10_000 {
            let at = |from: i64| log.iter().position(|b| header(b).next_offset() > from);
            match view.step(true, live_next, ordered_sent(round), hw, round as i64) {
                ViewStep::Wait => unreachable!("a backlog"),
                ViewStep::Done { .. } => return sent,
                ViewStep::Map { from } => {
                    let Some(i) = at(from) else {
                        view.nothing_stored();
                        continue;
                    };
                    for b in log[i..].iter().take(per_read) {
                        if view.map(b, LIMIT).expect("map") == Verdict::Stop {
                            break;
                        }
                    }
                }
                ViewStep::Emit { from } => {
                    let Some(i) = at(from) else {
                        view.nothing_stored();
                        continue;
                    };
                    for b in log[i..].iter().take(per_read) {
                        let h = header(b);
                        match view.emit(h.base_offset, h.next_offset()) {
                            Verdict::Stop => break,
                            Verdict::Skip => continue,
                            Verdict::Next => {}
                        }
                        let kept = retain_records(b, LIMIT, |r, offset| view.keep(r.key, offset)).expect("retain");
                        let out = match kept {
                            Retained::All => b.clone(),
                            Retained::Some { batch, .. } => batch,
                            Retained::None => continue,
                        };
                        for r in tributary_log::batch::decode_records(&out, LIMIT).expect("decode") {
                            let key = String::from_utf8(r.key.expect("key").to_vec()).expect("utf-8");
                            sent.push((r.offset, key, r.value.is_none()));
                        }
                    }
                }
            }
        }
        panic!("the view never ended");
    }

    /// The compacted view of `[from, to)` as Kafka's cleaner keeps it: key -> (offset, tombstone).
    fn compacted(log: &[Vec<u8>], from: i64) -> BTreeMap<String, (i64, bool)> {
        let mut out = BTreeMap::new();
        for b in log {
            for r in tributary_log::batch::decode_records(b, LIMIT).expect("decode") {
                if r.offset >= from {
                    let key = String::from_utf8(r.key.expect("key").to_vec()).expect("utf-8");
                    out.insert(key, (r.offset, r.value.is_none()));
                }
            }
        }
        out
    }

    /// What a consumer of the preview ends with: per key, the record with the highest offset.
    fn state(sent: &[(i64, String, bool)]) -> BTreeMap<String, (i64, bool)> {
        let mut out = BTreeMap::new();
        for (offset, key, tombstone) in sent {
            let e = out.entry(key.clone()).or_insert((*offset, *tombstone));
            if *offset >= e.0 {
                *e = (*offset, *tombstone);
            }
        }
        out
    }

    fn strictly_increasing(sent: &[(i64, String, bool)]) -> bool {
        sent.windows(2).all(|w| w[0].0 < w[1].0)
    }

    #[test]
    fn nothing_before_a_backlog_then_the_view_of_the_unsent_range() {
        let mut v = LatestView::new(LIMIT);
        assert_eq!(v.step(false, 0, 10, 100, 0), ViewStep::Wait);
        assert_eq!(v.step(false, 0, 10, 100, 0), ViewStep::Wait, "still no backlog");
        // Where the receiver's preview ends or the ordered stream is, whichever is further.
        assert_eq!(v.step(true, 40, 10, 100, 5), ViewStep::Map { from: 40 });
        assert!(v.running());
        let mut v = LatestView::new(LIMIT);
        assert_eq!(v.step(true, 0, 100, 100, 0), ViewStep::Done { to: 100 }, "nothing unsent");
        assert_eq!(v.time_to_current_ms(), None, "no view ran");
    }

    #[test]
    fn one_window_sends_the_latest_record_of_every_key_tombstones_included_in_offset_order() {
        let log = log(&[&["a", "b", "a"], &["c", "b"], &["a!", "d"], &["c", "e"]]);
        let mut v = LatestView::new(LIMIT);
        let sent = run(&mut v, &log, 2, 0, |_| 0);
        assert_eq!(
            sent,
            vec![
                (4, "b".into(), false),
                (5, "a".into(), true),
                (6, "d".into(), false),
                (7, "c".into(), false),
                (8, "e".into(), false)
            ]
        );
        assert_eq!(state(&sent), compacted(&log, 0), "exactly the compacted view");
        assert_eq!((v.windows(), v.keys_mapped()), (1, 5));
        assert!(v.time_to_current_ms().is_some_and(|ms| ms > 0));
    }

    #[test]
    fn a_resume_point_inside_a_batch_leaves_out_the_records_below_it() {
        let log = log(&[&["a", "b", "a", "c"], &["b"]]);
        let mut v = LatestView::new(LIMIT);
        // The receiver's preview ends at 2 (a link cut in an earlier view): from 2 on.
        let sent = run(&mut v, &log, 1, 2, |_| 0);
        assert_eq!(sent, vec![(2, "a".into(), false), (3, "c".into(), false), (4, "b".into(), false)]);
        assert_eq!(state(&sent), compacted(&log, 2));
    }

    #[test]
    fn keys_over_the_map_s_memory_go_in_windows_each_later_value_after_the_earlier() {
        // Room for three one-byte keys (each keyed record of a batch charged as if new, before
        // the map grows): the batch whose key would be a fourth charge starts a new window.
        let limit = 3 * (1 + ENTRY_OVERHEAD_BYTES);
        let log = log(&[&["a"], &["b"], &["a"], &["c"], &["b"], &["c"], &["a"]]);
        let mut v = LatestView::new(limit);
        let sent = run(&mut v, &log, 3, 0, |_| 0);
        // [0,4) a b a c -> b@1 a@2 c@3; [4,7) b c a -> all three.
        assert_eq!(
            sent.iter().map(|(o, k, _)| (*o, k.as_str())).collect::<Vec<_>>(),
            vec![(1, "b"), (2, "a"), (3, "c"), (4, "b"), (5, "c"), (6, "a")]
        );
        assert!(strictly_increasing(&sent));
        assert_eq!(state(&sent), compacted(&log, 0), "the latest value wins in the end");
        assert_eq!(v.windows(), 2);
    }

    #[test]
    fn the_view_stops_once_the_ordered_stream_has_sent_all_of_it() {
        let log = log(&[&["a"], &["b"], &["a"], &["c"]]);
        let mut v = LatestView::new(LIMIT);
        // The ordered stream is at 1 when the view starts and everything is sent by round 2.
        let sent = run(&mut v, &log, 1, 0, |round| if round >= 2 { 4 } else { 1 });
        assert!(sent.is_empty(), "still mapping when the ordered stream finished: {sent:?}");
        assert_eq!(v.step(true, 0, 4, 4, 9), ViewStep::Wait, "over: the fresh tail follows");
    }

    #[test]
    fn each_backlog_gets_its_own_view_from_where_the_preview_then_ends() {
        let log = log(&[&["a"], &["b"], &["a"], &["c"], &["b"], &["a"]]);
        let mut v = LatestView::new(LIMIT);
        // The first backlog: [0, 6) while the ordered stream is at 0.
        let sent = run(&mut v, &log[..3], 2, 0, |_| 0);
        assert_eq!(sent.iter().map(|(o, k, _)| (*o, k.as_str())).collect::<Vec<_>>(), vec![(1, "b"), (2, "a")]);
        assert_eq!(v.step(true, 3, 1, 6, 10), ViewStep::Wait, "that backlog still drains: the fresh tail runs");
        assert!(!v.waiting() && !v.running());
        // The link keeps up, then falls behind again with the preview at 5: a new view of [5, 6).
        assert_eq!(v.step(false, 5, 6, 6, 11), ViewStep::Wait);
        assert!(v.waiting());
        assert_eq!(v.time_to_current_ms(), None, "a new view");
        let sent = run(&mut v, &log, 2, 5, |_| 3);
        assert_eq!(sent, vec![(5, "a".into(), false)], "never below the preview's end");
        assert_eq!((v.windows(), v.keys_mapped()), (1, 1), "this view's own counts");
    }

    /// Random logs, map sizes and read sizes: the preview's offsets strictly increase (each
    /// record once), each one is its key's latest within its window, and the state it leaves is
    /// the compacted view of the range.
    #[test]
    fn any_log_and_any_map_size_end_in_the_compacted_view_with_each_record_once() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let keys = 1 + next(20);
            let batches: Vec<Vec<String>> = (0..1 + next(30))
                .map(|_| {
                    (0..1 + next(6))
                        .map(|_| format!("k{}{}", next(keys), if next(10) == 0 { "!" } else { "" }))
                        .collect()
                })
                .collect();
            let refs: Vec<Vec<&str>> = batches.iter().map(|b| b.iter().map(String::as_str).collect()).collect();
            let refs: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
            let log = log(&refs);
            let limit = (1 + next(8)) * (3 + ENTRY_OVERHEAD_BYTES);
            let resume = next(4) as i64;
            let mut v = LatestView::new(limit);
            let sent = run(&mut v, &log, 1 + next(4) as usize, resume, |_| 0);
            assert!(strictly_increasing(&sent), "{sent:?}");
            assert_eq!(state(&sent), compacted(&log, resume), "log {batches:?}, limit {limit}");
            assert!(sent.iter().all(|(o, _, _)| *o >= resume));
            // A key at most once per window; with one window, exactly the compacted view.
            let mut per_key: BTreeMap<&str, u64> = BTreeMap::new();
            for (_, k, _) in &sent {
                *per_key.entry(k).or_default() += 1;
            }
            assert!(per_key.values().all(|n| *n <= v.windows()), "{per_key:?} in {} windows", v.windows());
            if v.windows() == 1 {
                assert_eq!(sent.len(), compacted(&log, resume).len());
            }
        }
    }
}
