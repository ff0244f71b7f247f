//! The gateway's backfill driver: reads requests from [`REQUESTS_TOPIC`] (from the position kept
//! in the store), resolves their times to offsets once and stores them with that position in one
//! commit, keeps each partition's [`Plan`] and the centre's position (the receiver's `Mirrored`,
//! stored too), and streams the planned ranges on a partition stream named after the topic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tributary_log::batch::BatchHeader;
use tributary_log::{Store, StoreError, TopicConfig};

use super::{request_key, Accepted, PartRange, Plan, Request, Verdict, POSITION_KEY, REQUESTS_TOPIC, SPACE};
use crate::fresh::{Class, LinkShare};
use crate::gateway::{send_batch, MirrorError};
use crate::protocol::Data;

/// Backfill requests and plans of one gateway: at most `requests_max` requests waiting to be sent
/// (a request's slot is free once its ranges are sent, or when it was refused), as many done ones
/// kept for status (the oldest forgotten), and `ranges_max` ranges per partition
/// (`mirror.backfill_requests_max`, `mirror.backfill_ranges_max`).
#[derive(Debug, Default)]
pub struct Backfills {
    state: Mutex<State>,
    /// Wakes the backfill senders when plans change.
    changed: Notify,
    /// Stored batch bytes and records' offsets sent on backfill streams.
    pub batch_bytes_sent: AtomicU64,
    /// Offsets planned but deleted by retention before they were sent.
    pub deleted: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    requests_max: usize,
    ranges_max: usize,
    accepted: BTreeMap<i64, Accepted>,
    plans: BTreeMap<(String, i32), Plan>,
    /// Every range planned so far per partition (what the centre has or will have of it).
    history: BTreeMap<(String, i32), Plan>,
    /// The centre holds the backfilled records of a partition below this (its `Mirrored`).
    sent: BTreeMap<(String, i32), i64>,
    /// Retention deleted a planned partition's records below this before they were sent: they
    /// can never go (one entry per planned partition; found again by the sender after a start,
    /// so not stored).
    deleted: BTreeMap<(String, i32), i64>,
}

/// One request as `tributary mirror status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillStatus {
    pub id: i64,
    pub topic: String,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Why it was refused (nothing sent).
    pub refused: Option<String>,
    /// Offsets below what the centre held when it came (not sent).
    pub below: i64,
    pub sent: i64,
    /// Offsets retention deleted before they were sent (never sent).
    pub deleted: i64,
    pub total: i64,
}

/// The key of a partition's centre position: the topic length-prefixed, so no two
/// (topic, partition) pairs share a key.
fn sent_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = b"sent/".to_vec();
    k.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    k.extend_from_slice(topic.as_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The key of a partition's planned ranges (`history`).
fn ranges_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = sent_key(topic, partition);
    k[..5].copy_from_slice(b"rang/");
    k
}

fn parse_partition_key(k: &[u8], prefix: &[u8]) -> Option<(String, i32)> {
    let rest = k.strip_prefix(prefix)?;
    let n = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(rest.get(2..2 + n)?).ok()?.to_string();
    let partition = i32::from_be_bytes(rest.get(2 + n..6 + n)?.try_into().ok()?);
    Some((topic, partition))
}

impl State {
    /// How far a request's partition is settled: what the centre holds, or what retention
    /// deleted before it went, whichever reaches further.
    fn settled(&self, topic: &str, partition: i32) -> Option<i64> {
        let key = (topic.to_string(), partition);
        match (self.sent.get(&key), self.deleted.get(&key)) {
            (None, None) => None,
            (a, b) => Some((*a.unwrap_or(&i64::MIN)).max(*b.unwrap_or(&i64::MIN))),
        }
    }

    /// A request with nothing left to send: refused, or its ranges sent (or below the centre's
    /// position when it came, or deleted by retention before they went).
    fn done(&self, a: &Accepted) -> bool {
        match a.verdict {
            Verdict::Refused(_) => true,
            Verdict::Accepted => {
                let (settled, total) = a.progress(|p| self.settled(&a.request.topic, p));
                settled >= total
            }
        }
    }

    /// Requests holding a slot (not done).
    fn pending(&self) -> usize {
        self.accepted.values().filter(|a| !self.done(a)).count()
    }

    /// The oldest done requests past `requests_max` done ones, with `adding` kept too: to forget.
    fn excess_done(&self, adding: Option<&Accepted>) -> Vec<i64> {
        let mut done: Vec<i64> = self.accepted.values().chain(adding).filter(|a| self.done(a)).map(|a| a.id).collect();
        done.sort_unstable();
        done.truncate(done.len().saturating_sub(self.requests_max));
        done
    }
}

impl Backfills {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads the stored requests and positions, and plans what is left of them.
    pub fn load(&self, store: &Store, requests_max: usize, ranges_max: usize) -> Result<(), StoreError> {
        let mut st = self.lock();
        *st = State { requests_max, ranges_max, ..State::default() };
        for (k, v) in store.kv_scan(SPACE, b"sent/", usize::MAX)? {
            if let (Some(key), Ok(b)) = (parse_partition_key(&k, b"sent/"), <[u8; 8]>::try_from(v.as_slice())) {
                st.sent.insert(key, i64::from_be_bytes(b));
            }
        }
        for (k, v) in store.kv_scan(SPACE, b"rang/", usize::MAX)? {
            if let Some(key) = parse_partition_key(&k, b"rang/") {
                st.history.insert(key, Plan::decode(&v, ranges_max));
            }
        }
        // At most `requests_max` pending and as many done ones are stored.
        for (_, v) in store.kv_scan(SPACE, b"request/", requests_max.saturating_mul(2))? {
            let Some(a) = Accepted::decode(&v) else { continue };
            for p in &a.parts {
                let key = (a.request.topic.clone(), p.partition);
                let sent = st.sent.get(&key).copied().unwrap_or(0);
                let limit = st.ranges_max;
                // Within the limit when it was accepted; merged ranges only ever take fewer.
                let _ = st.plans.entry(key).or_insert_with(|| Plan::new(limit)).add(p.from + p.below, p.to, sent);
            }
            st.accepted.insert(a.id, a);
        }
        Ok(())
    }

    /// Partitions with ranges left to send.
    pub fn partitions(&self) -> Vec<(String, i32)> {
        self.lock().plans.iter().filter(|(_, p)| !p.is_empty()).map(|(k, _)| k.clone()).collect()
    }

    /// Whether a partition has a backfill plan (sent or not).
    pub fn planned(&self, topic: &str, partition: i32) -> bool {
        self.lock().plans.contains_key(&(topic.to_string(), partition))
    }

    fn next(&self, topic: &str, partition: i32, at: i64) -> Option<(i64, i64)> {
        self.lock().plans.get(&(topic.to_string(), partition)).and_then(|p| p.next(at))
    }

    /// Retention deleted a planned partition's records below `log_start` before they were sent:
    /// they can never go. Ranges wholly below it leave the plan, and requests this settles are
    /// done (their slots free: else a request whose range retention took held its slot for
    /// good); done ones past the history's bound are forgotten in the store.
    pub async fn deleted_before_sent(
        &self,
        store: &Store,
        topic: &str,
        partition: i32,
        log_start: i64,
    ) -> Result<(), StoreError> {
        let gone = {
            let mut st = self.lock();
            let key = (topic.to_string(), partition);
            let Some(plan) = st.plans.get_mut(&key) else { return Ok(()) };
            plan.prune(log_start);
            let mark = st.deleted.entry(key).or_insert(i64::MIN);
            if log_start <= *mark {
                return Ok(());
            }
            *mark = log_start;
            st.excess_done(None)
        };
        if !gone.is_empty() {
            store.kv_write(SPACE, gone.iter().map(|id| (request_key(*id), None)).collect()).await?;
            let mut st = self.lock();
            for id in gone {
                st.accepted.remove(&id);
            }
        }
        self.changed.notify_waiters();
        Ok(())
    }

    /// The centre holds a backfilled partition below `offset`: stored, for status and restarts.
    /// Requests this completes free their slots; done ones past the history's bound are
    /// forgotten, in the same commit.
    pub async fn mirrored(&self, store: &Store, topic: &str, partition: i32, offset: i64) -> Result<(), StoreError> {
        let gone = {
            let mut st = self.lock();
            let key = (topic.to_string(), partition);
            // The receiver names the partition: one no request planned is not kept (the
            // positions stay one per planned partition, whatever names a peer sends).
            let Some(plan) = st.plans.get_mut(&key) else { return Ok(()) };
            plan.prune(offset);
            let e = st.sent.entry(key).or_insert(0);
            if offset <= *e {
                return Ok(());
            }
            *e = offset;
            st.excess_done(None)
        };
        let mut writes = vec![(sent_key(topic, partition), Some(offset.to_be_bytes().to_vec()))];
        writes.extend(gone.iter().map(|id| (request_key(*id), None)));
        store.kv_write(SPACE, writes).await?;
        let mut st = self.lock();
        for id in gone {
            st.accepted.remove(&id);
        }
        Ok(())
    }

    /// Every request kept, with its progress.
    pub fn status(&self) -> Vec<BackfillStatus> {
        let st = self.lock();
        st.accepted
            .values()
            .map(|a| {
                let (sent, total) = a.progress(|p| st.sent.get(&(a.request.topic.clone(), p)).copied());
                let (settled, _) = a.progress(|p| st.settled(&a.request.topic, p));
                BackfillStatus {
                    id: a.id,
                    topic: a.request.topic.clone(),
                    from_ms: a.request.from_ms,
                    to_ms: a.request.to_ms,
                    refused: match &a.verdict {
                        Verdict::Refused(why) => Some(why.clone()),
                        Verdict::Accepted => None,
                    },
                    below: a.parts.iter().map(|p| p.below).sum(),
                    sent,
                    deleted: settled - sent,
                    total,
                }
            })
            .collect()
    }

    /// Decides on the request at `id` (offset in [`REQUESTS_TOPIC`]) and stores the outcome with
    /// the next read position in one commit.
    async fn accept(
        &self,
        store: &Store,
        mirrored: &(dyn Fn(&str) -> bool + Sync),
        id: i64,
        request: Option<Request>,
    ) -> Result<(), StoreError> {
        let refuse = |request: Request, why: &str| Accepted {
            id,
            request,
            verdict: Verdict::Refused(why.to_string()),
            parts: Vec::new(),
        };
        let full = {
            let st = self.lock();
            st.pending() >= st.requests_max
        };
        let accepted = match request {
            None => refuse(Request { topic: String::new(), from_ms: 0, to_ms: 0 }, "malformed request"),
            Some(r) if full => refuse(r, "mirror.backfill_requests_max reached"),
            Some(r) if mirrored(&r.topic) => refuse(r, "the topic is mirrored: all of it goes anyway"),
            // `__` topics (this requests topic, `__sys`) are the gateway's own: never mirrored.
            Some(r) if r.topic.starts_with("__") => refuse(r, "an internal topic is never sent"),
            Some(r) => match store.topic(&r.topic) {
                None => refuse(r, "no such topic"),
                Some(info) => {
                    let mut parts = Vec::new();
                    for p in 0..info.partitions as i32 {
                        let (s, t, pp) = (store.clone(), r.topic.clone(), p);
                        let (from_ms, to_ms) = (r.from_ms, r.to_ms);
                        let (from, to) = tokio::task::spawn_blocking(move || {
                            let hw = s.watermarks(&t, pp)?.high_watermark;
                            let at =
                                |ms| Ok::<_, StoreError>(s.offset_for_timestamp(&t, pp, ms)?.map_or(hw, |(o, _)| o));
                            Ok::<_, StoreError>((at(from_ms)?, at(to_ms)?))
                        })
                        .await
                        .map_err(|e| StoreError::Corrupt(format!("backfill lookup task: {e}")))??;
                        if from < to {
                            parts.push(PartRange { partition: p, from, to, below: 0 });
                        }
                    }
                    // Plan every partition, or none (over the ranges limit: refused).
                    let mut st = self.lock();
                    let st = &mut *st;
                    let (mut plans, mut history) = (st.plans.clone(), st.history.clone());
                    let mut refused = None;
                    for part in &mut parts {
                        let key = (r.topic.clone(), part.partition);
                        let sent = st.sent.get(&key).copied().unwrap_or(0);
                        let limit = st.ranges_max;
                        let done = history.entry(key.clone()).or_insert_with(|| Plan::new(limit));
                        // Below the centre's position: sent already if an earlier range covered
                        // it, else never sendable into the ordered remote topic.
                        let under = (part.to.min(sent) - part.from).max(0);
                        part.below = under - done.covered(part.from, part.from + under);
                        let planned =
                            plans.entry(key).or_insert_with(|| Plan::new(limit)).add(part.from, part.to, sent);
                        if let Err(e) = planned.and_then(|_| done.add(part.from.max(sent), part.to, 0)) {
                            refused = Some(format!("mirror.backfill_ranges_max: {e}"));
                        }
                    }
                    match refused {
                        Some(why) => refuse(r, &why),
                        None => {
                            st.plans = plans;
                            st.history = history;
                            Accepted { id, request: r, verdict: Verdict::Accepted, parts }
                        }
                    }
                }
            },
        };
        if let Verdict::Refused(why) = &accepted.verdict {
            tracing::warn!(id, topic = %accepted.request.topic, reason = %why, "backfill request refused");
        } else {
            tracing::info!(id, topic = %accepted.request.topic, from_ms = accepted.request.from_ms,
                to_ms = accepted.request.to_ms, "backfill request accepted");
        }
        // Beyond the limit only the read position is stored: any client that may write to the
        // requests topic could otherwise grow the store by one refused request per record.
        let mut writes = vec![(POSITION_KEY.to_vec(), Some((id + 1).to_be_bytes().to_vec()))];
        if !full {
            writes.push((request_key(id), Some(accepted.encode())));
        }
        let gone = {
            let st = self.lock();
            for p in &accepted.parts {
                if let Some(h) = st.history.get(&(accepted.request.topic.clone(), p.partition)) {
                    writes.push((ranges_key(&accepted.request.topic, p.partition), Some(h.encode())));
                }
            }
            // The oldest done requests past the history's bound go in the same commit.
            let gone = st.excess_done((!full).then_some(&accepted));
            writes.extend(gone.iter().map(|id| (request_key(*id), None)));
            gone
        };
        store.kv_write(SPACE, writes).await?;
        let mut st = self.lock();
        if !full {
            st.accepted.insert(id, accepted);
        }
        for id in gone {
            st.accepted.remove(&id);
        }
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }
}

/// Creates [`REQUESTS_TOPIC`] if absent, loads the stored requests, then reads new requests as
/// they are appended, deciding each once (the read position is stored with each decision).
pub async fn follow_requests(
    stats: Arc<crate::gateway::MirrorStats>,
    store: Store,
    mirrored: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    requests_max: usize,
    ranges_max: usize,
) -> Result<(), StoreError> {
    let backfills = stats.backfills.clone();
    match store.create_topic(REQUESTS_TOPIC, 1, TopicConfig::default()).await {
        Ok(()) | Err(StoreError::TopicExists(_)) => {}
        Err(e) => return Err(e),
    }
    {
        let (b, s) = (backfills.clone(), store.clone());
        tokio::task::spawn_blocking(move || b.load(&s, requests_max, ranges_max))
            .await
            .map_err(|e| StoreError::Corrupt(format!("backfill load task: {e}")))??;
    }
    backfills.changed.notify_waiters();
    let mut next = store
        .kv_get(SPACE, POSITION_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, i64::from_be_bytes);
    let mut watch = store.watch(REQUESTS_TOPIC, 0)?;
    loop {
        let wm = store.watermarks(REQUESTS_TOPIC, 0)?;
        next = next.max(wm.log_start_offset);
        if next >= wm.high_watermark {
            if !watch.changed().await {
                return Err(StoreError::UnknownTopic(REQUESTS_TOPIC.to_string()));
            }
            continue;
        }
        let (records, after) = store.read_records_next(REQUESTS_TOPIC, 0, next, 64 * 1024)?;
        for r in records {
            let request = Request::parse(r.key.as_deref(), r.value.as_deref());
            backfills.accept(&store, &*mirrored, r.offset, request).await?;
            stats.changed();
        }
        next = next.max(after);
    }
}

/// Streams one partition's planned backfill ranges from the offset the cloud asked for (whole
/// stored batches; none between ranges), within its credit and the ordered share of the cap.
pub(crate) struct BackfillSender {
    pub conn: quinn::Connection,
    pub store: Store,
    pub topic: String,
    pub partition: i32,
    pub credit: Arc<crate::gateway::Credit>,
    pub read_bytes_max: u64,
    pub backfills: Arc<Backfills>,
    pub bucket: Arc<Mutex<LinkShare>>,
}

impl BackfillSender {
    pub async fn run(self, from: i64) -> Result<(), MirrorError> {
        let mut stream = self.conn.open_uni().await?;
        stream.write_all(&Data::Open { topic: self.topic.clone(), partition: self.partition }.encode_header()).await?;
        let mut next = from;
        loop {
            let credit = self.credit.wait().await;
            let changed = self.backfills.changed.notified();
            let Some((at, end)) = self.backfills.next(&self.topic, self.partition, next) else {
                // Nothing (more) planned: wait for a request, with a look now and then.
                let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
                continue;
            };
            let max = credit.min(self.read_bytes_max) as usize;
            let (store, topic, partition) = (self.store.clone(), self.topic.clone(), self.partition);
            let read = tokio::task::spawn_blocking(move || store.fetch(&topic, partition, at, max))
                .await
                .map_err(|e| MirrorError::Refused(format!("store read task: {e}")))?;
            let fetched = match read {
                Ok(f) => f,
                Err(StoreError::OffsetOutOfRange { log_start_offset, .. }) if log_start_offset > at => {
                    // Retention deleted planned records before they went: counted, passed over,
                    // and the requests they settle are done.
                    let lost = (log_start_offset.min(end) - at).max(0) as u64;
                    self.backfills.deleted.fetch_add(lost, Ordering::Relaxed);
                    self.backfills
                        .deleted_before_sent(&self.store, &self.topic, self.partition, log_start_offset)
                        .await?;
                    next = log_start_offset;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if fetched.data.is_empty() {
                next = end.max(fetched.next_offset);
                continue;
            }
            let mut rest: Bytes = fetched.data;
            next = at;
            while !rest.is_empty() {
                let h = BatchHeader::parse(&rest).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let batch = rest.split_to(h.total_len().min(rest.len()));
                if h.base_offset >= end {
                    // Past the range (whatever holes lie before it): the next range, if any.
                    next = next.max(end);
                    break;
                }
                next = h.next_offset();
                if h.is_control() {
                    continue;
                }
                let len = send_batch(&self.bucket, Class::Ordered, &mut stream, batch).await?;
                self.credit.spend(len);
                self.backfills.batch_bytes_sent.fetch_add(len, Ordering::Relaxed);
            }
            if next <= at {
                next = end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_log::StorageConfig;

    /// A flood of requests past `mirror.backfill_requests_max` (any Kafka client with write
    /// rights to the requests topic can produce one) leaves the store holding at most that
    /// many requests; the read position still moves past each.
    #[tokio::test]
    async fn requests_past_the_limit_are_not_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            StorageConfig { data_dir: dir.path().to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() };
        let (store, _) = Store::open(config).expect("open");
        let b = Backfills::default();
        b.load(&store, 2, 4).expect("load");
        for id in 0..10 {
            b.accept(&store, &|_| false, id, None).await.expect("decided");
        }
        assert_eq!(store.kv_scan(SPACE, b"request/", usize::MAX).expect("scan").len(), 2);
        let position = store.kv_get(SPACE, POSITION_KEY).expect("kv").expect("position");
        assert_eq!(position, 10i64.to_be_bytes().to_vec());
        assert_eq!(b.status().len(), 2);
    }

    /// A request's slot is free once its ranges are sent (it was never freed: after
    /// `mirror.backfill_requests_max` requests every later one was refused for good), and the
    /// done ones kept for status are as many at most, the oldest forgotten in the store too.
    #[tokio::test]
    async fn a_request_s_slot_is_freed_once_its_ranges_are_sent_and_done_ones_kept_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            StorageConfig { data_dir: dir.path().to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() };
        let (store, _) = Store::open(config).expect("open");
        store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
        let append = |n: usize| {
            let records = (0..n).map(|i| tributary_log::batch::NewRecord::new(Some("k"), format!("v{i}"))).collect();
            store.append_records("t", 0, records)
        };
        append(10).await.expect("append");
        let b = Backfills::default();
        b.load(&store, 2, 4).expect("load");
        let all = || Some(Request { topic: "t".into(), from_ms: 0, to_ms: i64::MAX });
        let ids = |b: &Backfills| b.status().iter().map(|s| (s.id, s.refused.is_some())).collect::<Vec<_>>();
        b.accept(&store, &|_| false, 0, all()).await.expect("decided");
        b.accept(&store, &|_| false, 1, all()).await.expect("decided");
        b.accept(&store, &|_| false, 2, all()).await.expect("decided");
        assert_eq!(ids(&b), [(0, false), (1, false)], "the third is refused while two wait");
        // The centre has the range: both requests are done, their slots free.
        b.mirrored(&store, "t", 0, 10).await.expect("mirrored");
        append(10).await.expect("append");
        b.accept(&store, &|_| false, 3, all()).await.expect("decided");
        assert_eq!(ids(&b), [(0, false), (1, false), (3, false)], "a freed slot takes a new request");
        assert_eq!(b.partitions(), [("t".to_string(), 0)], "its new records are planned");
        // Three done: the oldest is forgotten, in memory and in the store.
        b.mirrored(&store, "t", 0, 20).await.expect("mirrored");
        assert_eq!(ids(&b), [(1, false), (3, false)]);
        let stored = store.kv_scan(SPACE, b"request/", usize::MAX).expect("scan");
        assert_eq!(stored.len(), 2);
        let reloaded = Backfills::default();
        reloaded.load(&store, 2, 4).expect("reload");
        assert_eq!(ids(&reloaded), [(1, false), (3, false)]);
    }

    /// A request whose range retention deleted before it went is done, its slot free (it held
    /// the slot for good before: nothing was sent, so the centre never confirmed the range).
    #[tokio::test]
    async fn a_request_whose_range_retention_deleted_before_it_went_frees_its_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            StorageConfig { data_dir: dir.path().to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() };
        let (store, _) = Store::open(config).expect("open");
        store.create_topic("t", 1, TopicConfig::default()).await.expect("create");
        let records = (0..10).map(|i| tributary_log::batch::NewRecord::new(Some("k"), format!("v{i}"))).collect();
        store.append_records("t", 0, records).await.expect("append");
        let b = Backfills::default();
        b.load(&store, 1, 4).expect("load");
        let all = || Some(Request { topic: "t".into(), from_ms: 0, to_ms: i64::MAX });
        b.accept(&store, &|_| false, 0, all()).await.expect("decided");
        b.accept(&store, &|_| false, 1, all()).await.expect("decided");
        assert_eq!(b.status().len(), 1, "one slot, taken: the second is refused (and not kept)");
        // Retention takes 0..6 before anything went: the rest is still to send.
        store.delete_records("t", 0, 6).await.expect("delete");
        b.deleted_before_sent(&store, "t", 0, 6).await.expect("noted");
        let s = &b.status()[0];
        assert_eq!((s.sent, s.deleted, s.total), (0, 6, 10));
        assert_eq!(b.next("t", 0, 6), Some((6, 10)));
        b.accept(&store, &|_| false, 2, all()).await.expect("decided");
        assert_eq!(b.status().len(), 1, "still pending: 6..10 can go");
        // Then all of it.
        store.delete_records("t", 0, 10).await.expect("delete");
        b.deleted_before_sent(&store, "t", 0, 10).await.expect("noted");
        let s = &b.status()[0];
        assert_eq!((s.sent, s.deleted, s.total), (0, 10, 10));
        assert_eq!(b.next("t", 0, 10), None, "nothing left to send");
        b.accept(&store, &|_| false, 3, all()).await.expect("decided");
        let last = b.status().into_iter().find(|s| s.id == 3).expect("kept");
        assert_eq!(last.refused, None, "the slot is free again");
    }

    /// `Mirrored` for a partition no request planned (the receiver is a peer) keeps nothing.
    #[tokio::test]
    async fn a_position_for_an_unplanned_partition_is_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            StorageConfig { data_dir: dir.path().to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() };
        let (store, _) = Store::open(config).expect("open");
        let b = Backfills::default();
        b.load(&store, 8, 4).expect("load");
        for i in 0..100 {
            b.mirrored(&store, &format!("t{i}"), 0, 5).await.expect("mirrored");
        }
        assert!(store.kv_scan(SPACE, b"sent/", usize::MAX).expect("scan").is_empty());
        assert!(b.lock().sent.is_empty());
    }

    /// The gateway's internal topics (`__`: this requests topic, `__sys`) never leave it, not
    /// even on request.
    #[tokio::test]
    async fn a_request_for_an_internal_topic_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            StorageConfig { data_dir: dir.path().to_path_buf(), disk_free_bytes_min: 0, ..StorageConfig::default() };
        let (store, _) = Store::open(config).expect("open");
        store.create_topic("__sys", 1, TopicConfig::default()).await.expect("create");
        store
            .append_records("__sys", 0, vec![tributary_log::batch::NewRecord::new(Some("k"), "v")])
            .await
            .expect("append");
        let b = Backfills::default();
        b.load(&store, 8, 4).expect("load");
        let r = Request { topic: "__sys".into(), from_ms: 0, to_ms: i64::MAX };
        b.accept(&store, &|_| false, 0, Some(r)).await.expect("decided");
        assert!(b.status()[0].refused.is_some(), "{:?}", b.status());
        assert!(b.partitions().is_empty());
    }
}
