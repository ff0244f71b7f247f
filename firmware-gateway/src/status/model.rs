//! The status page's data: the JSON document `/api/status` answers (built on request from the
//! store, the front ends' counters, the group coordinator, the mirror and the refusal ring),
//! and the bounded history the sparklines draw (per-topic message rates and the mirror's lag,
//! sampled by the gateway every `status.history_interval_ms`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::metrics::Sources;

/// `/api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub version: &'static str,
    pub uptime_s: u64,
    pub now_ms: i64,
    /// How often the page asks again (`status.refresh_ms`).
    pub refresh_ms: u64,
    /// Time between two history samples (`status.history_interval_ms`).
    pub history_interval_ms: u64,
    /// Whether `rate_history` and `lag_history` are filled (`/api/status?history=0` leaves them
    /// empty: the page asks for them once per history interval, not on every refresh).
    pub history_included: bool,
    pub disk: Disk,
    /// At most `status.topics_max`, by name; `topics_total` counts all.
    pub topics: Vec<Topic>,
    pub topics_total: usize,
    pub clients: Clients,
    /// At most `status.groups_max`, by name; `groups_total` counts all.
    pub groups: Vec<Group>,
    pub groups_total: usize,
    /// `None` with the mirror off.
    pub mirror: Option<Mirror>,
    /// Newest first, at most `status.refusals_max`.
    pub refusals: Vec<Refusal>,
    pub refusals_total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    /// Bytes counted against the budget (log and key-value state).
    pub used_bytes: u64,
    /// `storage.max_bytes`.
    pub budget_bytes: u64,
    /// Real size of the database file, if it could be read.
    pub file_bytes: Option<u64>,
    /// Free bytes on the data volume, if they could be read.
    pub free_bytes: Option<u64>,
    /// `storage.disk_free_bytes_min`.
    pub free_min_bytes: u64,
    /// Why writes fail, while they do.
    pub write_fault: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Topic {
    pub name: String,
    pub partitions: u32,
    /// Stored bytes (as stored, compressed).
    pub bytes: u64,
    /// Records between the log start and the high watermark, all partitions.
    pub records: i64,
    /// Records per second over the last history interval (`None` until two samples, or for a
    /// topic beyond `status.history_topics_max`).
    pub rate_per_s: Option<f64>,
    /// Per-interval rates, oldest first (empty for a topic without history).
    pub rate_history: Vec<f64>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Clients {
    /// `None` when that listener is off.
    pub mqtt_connections: Option<u64>,
    pub kafka_connections: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub name: String,
    pub state: String,
    /// Records behind, all committed partitions.
    pub lag: i64,
    pub partitions: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mirror {
    pub link_up: bool,
    pub reconnects: u64,
    pub lag_records: i64,
    pub lag_bytes: u64,
    pub oldest_unmirrored_age_s: f64,
    /// Seconds until the backlog is mirrored at the rate it shrank at over
    /// `mirror.drain_window_ms`; `None` while it does not shrink.
    pub drain_eta_s: Option<f64>,
    /// Records mirrored per second over the same window.
    pub drain_records_per_s: f64,
    /// Lag in records per history sample, oldest first.
    pub lag_history: Vec<i64>,
    pub last_error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub at_ms: i64,
    pub kind: &'static str,
    pub protocol: &'static str,
    pub who: String,
    pub detail: String,
    pub count: u64,
}

/// The sampled history: for each topic (at most `topics_max`) its records per second in each
/// interval, and the mirror's lag; `samples_max` of each, oldest dropped first.
#[derive(Debug)]
pub struct History {
    samples_max: usize,
    topics_max: usize,
    /// By topic: the high watermarks' sum at the last sample, and the rates.
    topics: BTreeMap<String, (i64, VecDeque<f64>)>,
    mirror_lag: VecDeque<i64>,
    last_ms: Option<i64>,
}

impl History {
    pub fn new(samples_max: usize, topics_max: usize) -> Self {
        Self { samples_max, topics_max, topics: BTreeMap::new(), mirror_lag: VecDeque::new(), last_ms: None }
    }

    /// Takes a sample at `now_ms`: each topic's high watermarks' sum (the first `topics_max`
    /// topics by name are followed; topics gone are forgotten), and the mirror's lag.
    pub fn sample(&mut self, now_ms: i64, topics: &BTreeMap<String, i64>, mirror_lag: Option<i64>) {
        self.topics.retain(|name, _| topics.contains_key(name));
        let elapsed_s = self.last_ms.map(|t| (now_ms - t).max(1) as f64 / 1000.0);
        for (name, &total) in topics {
            if let Some((last, rates)) = self.topics.get_mut(name) {
                if let Some(s) = elapsed_s {
                    // A topic deleted and created again between samples starts lower: no negative rate.
                    // Two decimals: the sparklines need no more, and the document stays short.
                    let rate = (total - *last).max(0) as f64 / s;
                    rates.push_back((rate * 100.0).round() / 100.0);
                    if rates.len() > self.samples_max {
                        rates.pop_front();
                    }
                }
                *last = total;
            } else if self.topics.len() < self.topics_max {
                self.topics.insert(name.clone(), (total, VecDeque::new()));
            }
        }
        if let Some(lag) = mirror_lag {
            self.mirror_lag.push_back(lag);
            if self.mirror_lag.len() > self.samples_max {
                self.mirror_lag.pop_front();
            }
        }
        self.last_ms = Some(now_ms);
    }

    pub fn rates(&self, topic: &str) -> Vec<f64> {
        self.topics.get(topic).map(|(_, r)| r.iter().copied().collect()).unwrap_or_default()
    }

    pub fn mirror_lag(&self) -> Vec<i64> {
        self.mirror_lag.iter().copied().collect()
    }
}

/// The figures a history sample takes: each topic's high watermarks' sum, and the mirror's lag.
pub fn sample_figures(src: &Sources) -> (BTreeMap<String, i64>, Option<i64>) {
    let mut totals = BTreeMap::new();
    for t in src.store.topics() {
        let hw: i64 = (0..t.partitions as i32)
            .filter_map(|p| src.store.watermarks(&t.name, p).ok())
            .map(|w| w.high_watermark)
            .sum();
        totals.insert(t.name, hw);
    }
    let lag = src.mirror.as_ref().map(|m| m.lag(&src.store).iter().map(|l| l.lag_records).sum());
    (totals, lag)
}

/// Limits of one snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub topics_max: usize,
    pub groups_max: usize,
    pub refresh_ms: u64,
    pub history_interval_ms: u64,
    /// Fill in the history series.
    pub with_history: bool,
}

/// The document now. Reads the store (runs on the blocking pool).
pub fn snapshot(src: &Sources, history: &History, limits: Limits, uptime_s: u64) -> Snapshot {
    let store = &src.store;
    let s = store.stats();
    let cfg = store.config();
    let disk = Disk {
        used_bytes: s.footprint_bytes + s.kv_bytes,
        budget_bytes: cfg.max_bytes,
        file_bytes: store.disk_usage_bytes().ok(),
        free_bytes: tributary_broker::storage::disk::volume_free_bytes(&cfg.data_dir).ok(),
        free_min_bytes: cfg.disk_free_bytes_min,
        write_fault: store.write_fault(),
    };
    let mut all = store.topics();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let topics_total = all.len();
    let topics = all
        .into_iter()
        .take(limits.topics_max)
        .map(|t| {
            let (mut bytes, mut records) = (0u64, 0i64);
            for p in 0..t.partitions as i32 {
                if let Ok(info) = store.partition_info(&t.name, p) {
                    bytes += info.logical_bytes;
                    records += info.watermarks.high_watermark - info.watermarks.log_start_offset;
                }
            }
            let rates = history.rates(&t.name);
            Topic {
                rate_per_s: rates.last().copied(),
                rate_history: if limits.with_history { rates } else { Vec::new() },
                partitions: t.partitions,
                bytes,
                records,
                retention_ms: t.config.retention_ms,
                retention_bytes: t.config.retention_bytes,
                name: t.name,
            }
        })
        .collect();
    let clients = Clients {
        mqtt_connections: src.mqtt.as_ref().map(|m| m.listener.connections_open.load(Ordering::Relaxed)),
        kafka_connections: src.kafka.as_ref().map(|(k, _)| k.listener.connections_open.load(Ordering::Relaxed)),
    };
    let (mut groups, mut groups_total) = (Vec::new(), 0);
    if let Some((_, coordinator)) = &src.kafka {
        let list = coordinator.list();
        groups_total = list.len();
        for (name, _, state) in list.into_iter().take(limits.groups_max) {
            let lag = coordinator.lag(&name).unwrap_or_default();
            groups.push(Group {
                state: format!("{state:?}"),
                lag: lag.iter().map(|l| l.lag).sum(),
                partitions: lag.len(),
                name,
            });
        }
    }
    let mirror = src.mirror.as_ref().map(|m| {
        let lag = m.lag(store);
        let drain = m.drain().total;
        Mirror {
            link_up: m.link_up.load(Ordering::Relaxed),
            reconnects: m.reconnects.load(Ordering::Relaxed),
            lag_records: lag.iter().map(|l| l.lag_records).sum(),
            lag_bytes: lag.iter().map(|l| l.lag_bytes).sum(),
            oldest_unmirrored_age_s: lag.iter().map(|l| l.oldest_unmirrored_age_ms).max().unwrap_or(0) as f64 / 1e3,
            drain_eta_s: drain.eta_s,
            drain_records_per_s: drain.sent_records_per_s,
            lag_history: if limits.with_history { history.mirror_lag() } else { Vec::new() },
            last_error: m.last_error.lock().map(|e| e.clone()).unwrap_or_default(),
        }
    });
    let refusals = store
        .refusals()
        .recent()
        .into_iter()
        .map(|r| Refusal {
            at_ms: r.at_ms,
            kind: r.kind.as_str(),
            protocol: r.protocol,
            who: r.who,
            detail: r.detail,
            count: r.count,
        })
        .collect();
    Snapshot {
        version: env!("CARGO_PKG_VERSION"),
        uptime_s,
        now_ms: tributary_broker::storage::clock::now_ms(),
        refresh_ms: limits.refresh_ms,
        history_interval_ms: limits.history_interval_ms,
        history_included: limits.with_history,
        disk,
        topics,
        topics_total,
        clients,
        groups,
        groups_total,
        mirror,
        refusals,
        refusals_total: store.refusals().total(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_broker::storage::refusals::RefusalKind;
    use tributary_broker::{NewRecord, StorageConfig, Store, TopicConfig};

    #[test]
    fn history_keeps_rates_per_topic_within_its_limits() {
        let mut h = History::new(3, 2);
        let topics = |v: &[(&str, i64)]| v.iter().map(|(n, x)| (n.to_string(), *x)).collect::<BTreeMap<_, _>>();
        h.sample(0, &topics(&[("a", 0), ("b", 10), ("c", 0)]), Some(5));
        assert!(h.rates("a").is_empty(), "one sample is no rate");
        h.sample(10_000, &topics(&[("a", 100), ("b", 10), ("c", 50)]), Some(7));
        assert_eq!(h.rates("a"), [10.0]);
        assert_eq!(h.rates("b"), [0.0]);
        assert!(h.rates("c").is_empty(), "beyond topics_max = 2: not followed");
        for i in 2..6 {
            h.sample(i * 10_000, &topics(&[("a", 100 + i * 10), ("b", 10)]), Some(i));
        }
        assert_eq!(h.rates("a"), [1.0, 1.0, 1.0], "samples_max = 3, oldest dropped");
        assert_eq!(h.mirror_lag(), [3, 4, 5]);
        // A topic deleted is forgotten, which frees a place for another.
        h.sample(60_000, &topics(&[("a", 200), ("c", 60)]), None);
        h.sample(70_000, &topics(&[("a", 0), ("c", 80)]), None);
        assert_eq!(h.rates("b"), Vec::<f64>::new());
        assert_eq!(h.rates("c"), [2.0]);
        assert_eq!(*h.rates("a").last().expect("rate"), 0.0, "recreated lower: no negative rate");
    }

    #[tokio::test]
    async fn the_document_shows_topics_disk_and_refusals_within_its_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = StorageConfig { data_dir: dir.path().into(), disk_free_bytes_min: 0, ..StorageConfig::default() };
        let (store, _) = Store::open(cfg).expect("open");
        let retained = TopicConfig { retention_ms: Some(3_600_000), ..TopicConfig::default() };
        store.create_topic("meters", 2, retained).await.expect("create");
        store.create_topic("zz-last", 1, TopicConfig::default()).await.expect("create");
        let rec =
            |v: &str| NewRecord { key: None, value: Some(v.to_string().into()), headers: vec![], timestamp_ms: None };
        store.append_records("meters", 1, vec![rec("a"), rec("b"), rec("c")]).await.expect("append");
        store.refusals().record(RefusalKind::Login, "mqtt", "10.0.0.9 user \"x\"", "wrong password");
        let src = Sources::store_only(store.clone());
        let mut history = History::new(10, 10);
        let (totals, lag) = sample_figures(&src);
        assert_eq!(totals["meters"], 3);
        assert_eq!(lag, None, "no mirror");
        history.sample(0, &totals, lag);
        store.append_records("meters", 0, vec![rec("d")]).await.expect("append");
        history.sample(2_000, &sample_figures(&src).0, None);
        let mut limits =
            Limits { topics_max: 1, groups_max: 10, refresh_ms: 2000, history_interval_ms: 2000, with_history: false };
        // Without the history: the latest rate, no series.
        let json = serde_json::to_value(snapshot(&src, &history, limits, 42)).expect("json");
        assert_eq!(
            (&json["topics"][0]["rate_per_s"], &json["history_included"]),
            (&serde_json::json!(0.5), &serde_json::json!(false))
        );
        assert_eq!(json["topics"][0]["rate_history"], serde_json::json!([]));
        limits.with_history = true;
        let snap = snapshot(&src, &history, limits, 42);
        let json = serde_json::to_value(&snap).expect("json");
        assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(json["uptime_s"], 42);
        assert_eq!(json["topics_total"], 2);
        assert_eq!(json["topics"].as_array().expect("topics").len(), 1, "topics_max = 1");
        let t = &json["topics"][0];
        assert_eq!(
            (t["name"].as_str(), t["partitions"].as_u64(), t["records"].as_i64()),
            (Some("meters"), Some(2), Some(4))
        );
        assert!(t["bytes"].as_u64().expect("bytes") > 0, "{t}");
        assert_eq!(t["rate_per_s"], 0.5, "one record in 2 s");
        assert_eq!(t["rate_history"], serde_json::json!([0.5]));
        assert_eq!(t["retention_ms"], 3_600_000);
        assert!(json["disk"]["used_bytes"].as_u64().expect("used") > 0);
        assert_eq!(json["disk"]["budget_bytes"], store.config().max_bytes);
        assert!(json["disk"]["free_bytes"].as_u64().is_some() && json["disk"]["write_fault"].is_null());
        assert!(json["mirror"].is_null() && json["clients"]["mqtt_connections"].is_null());
        let r = &json["refusals"][0];
        assert_eq!(
            (r["kind"].as_str(), r["protocol"].as_str(), r["detail"].as_str()),
            (Some("login"), Some("mqtt"), Some("wrong password"))
        );
        assert_eq!(json["refusals_total"], 1);
        store.close().await.expect("close");
    }
}
