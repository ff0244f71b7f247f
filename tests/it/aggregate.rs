//! Aggregation at the edge, end to end: MQTT clients (rumqttc), one per device, publish JSON
//! readings with event times in the payload into a gateway (the real binary) whose
//! `[[aggregate]]` entry derives a topic of 2 s tumbling windows; an rdkafka consumer reads the
//! derived topic, and every result is checked against the same windows computed here from what
//! was published. The gateway is SIGKILLed twice mid-stream (once right after results were read,
//! once right after readings that close windows were acknowledged) and restarted: every window's
//! result must be in the derived topic exactly once.
//!
//! The readings are sent in phases so which ones are late does not depend on how the devices'
//! publishes interleave: each phase is acknowledged (PUBACK after the commit) before the next
//! starts. Phase A of window k: readings in its first 400 ms, and readings for window k-1 before
//! its end (within the 500 ms lateness, so kept); phase B: readings from 600 ms on (stream time
//! passes the end of k-1 + 500 ms: k-1 closes); then readings for window k-1 again (late: dropped),
//! a payload that is not JSON and one without a field (skipped).

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::support::{client_config, http_get, Daemon};

const WINDOW_MS: i64 = 2000;
const LATENESS_MS: i64 = 500;
/// Aligned to the window (and the epoch).
const BASE_MS: i64 = 1_700_000_000_000;
const DEVICES: usize = 3;
const WINDOWS: i64 = 6;

/// One reading as published: device, event time, kw, volts.
#[derive(Debug, Clone, Copy)]
struct Reading {
    device: usize,
    ts: i64,
    kw: f64,
    volts: f64,
}

impl Reading {
    fn payload(&self) -> String {
        format!(r#"{{"ts": {}, "kw": {}, "volts": {}}}"#, self.ts, self.kw, self.volts)
    }
}

/// What one phase publishes: JSON readings the aggregator keeps, readings it drops as late,
/// and payloads it skips as invalid, per device.
#[derive(Debug, Default)]
struct Phase {
    kept: Vec<Reading>,
    late: Vec<Reading>,
    invalid: Vec<(usize, String)>,
}

fn reading(rng: &mut impl rand::Rng, device: usize, ts: i64) -> Reading {
    // Quarters: sums and means are exact in f64 whatever the order of addition.
    Reading {
        device,
        ts,
        kw: f64::from(rng.random_range(0..400)) / 4.0,
        volts: f64::from(rng.random_range(900..1000)) / 4.0,
    }
}

/// The phases of window `k` (see the module comment); `k == WINDOWS` is the flush: one reading
/// far ahead that closes every window before it.
fn phases(rng: &mut impl rand::Rng, k: i64) -> Vec<Phase> {
    let start = BASE_MS + k * WINDOW_MS;
    if k == WINDOWS {
        return vec![Phase { kept: vec![reading(rng, 0, start + 3 * WINDOW_MS + 600)], ..Phase::default() }];
    }
    let mut a = Phase::default();
    let mut b = Phase::default();
    let mut after = Phase::default();
    for d in 0..DEVICES {
        let dt = d as i64 * 10;
        a.kept.push(reading(rng, d, start + dt));
        a.kept.push(reading(rng, d, start + 300 + dt));
        if k > 0 {
            // For the previous window, before its end: out of order, within the lateness.
            a.kept.push(reading(rng, d, start - 100 - dt));
        }
        b.kept.push(reading(rng, d, start + 600 + dt));
        b.kept.push(reading(rng, d, start + 1500 + dt));
        if k > 0 {
            after.late.push(reading(rng, d, start - 50 - dt));
        }
        after.invalid.push((d, "not json".to_string()));
        after.invalid.push((d, format!(r#"{{"ts": {}, "kw": 1}}"#, start + 700 + dt)));
    }
    vec![a, b, after]
}

/// One device's MQTT connection: publishes QoS 1 and counts PUBACKs.
struct Device {
    client: AsyncClient,
    acks: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Device {
    fn connect(port: u16, d: usize) -> Self {
        let mut o = MqttOptions::new(format!("meter-{d}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut ev) = AsyncClient::new(o, 64);
        let (tx, acks) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(e) = ev.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = e {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            }
        });
        Self { client, acks }
    }
}

/// Publishes a phase from every device and returns once each publish was acknowledged (so is
/// in the log).
async fn publish(devices: &mut [Device], phase: &Phase) {
    let mut sent = vec![0usize; devices.len()];
    let json = phase.kept.iter().chain(&phase.late).map(|r| (r.device, r.payload()));
    for (d, payload) in json.chain(phase.invalid.iter().cloned()) {
        let topic = format!("meters/dev-{d}/reading");
        devices[d].client.publish(topic, QoS::AtLeastOnce, false, payload).await.expect("publish");
        sent[d] += 1;
    }
    for (dev, n) in devices.iter_mut().zip(sent) {
        for _ in 0..n {
            tokio::time::timeout(Duration::from_secs(30), dev.acks.recv())
                .await
                .expect("PUBACK within 30 s")
                .expect("connection up");
        }
    }
}

/// The expected result of one window, computed from the kept readings alone.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    count: u64,
    /// Per field (kw, volts): min, max, mean, last.
    fields: [[f64; 4]; 2],
}

fn expected(kept: &[Reading]) -> BTreeMap<(String, i64), Expected> {
    let mut groups: BTreeMap<(String, i64), Vec<Reading>> = BTreeMap::new();
    for r in kept {
        let start = r.ts - r.ts.rem_euclid(WINDOW_MS);
        groups.entry((format!("dev-{}", r.device), start)).or_default().push(*r);
    }
    let flush_window = kept.iter().map(|r| r.ts).max().map(|t| t - t.rem_euclid(WINDOW_MS));
    groups
        .into_iter()
        .filter(|((_, start), _)| Some(*start) != flush_window)
        .map(|(k, rs)| {
            let field = |f: fn(&Reading) -> f64| {
                let values: Vec<f64> = rs.iter().map(f).collect();
                let last = rs.iter().max_by_key(|r| r.ts).map(f).unwrap_or(f64::NAN);
                [
                    values.iter().copied().fold(f64::INFINITY, f64::min),
                    values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    values.iter().sum::<f64>() / values.len() as f64,
                    last,
                ]
            };
            (k, Expected { count: rs.len() as u64, fields: [field(|r| r.kw), field(|r| r.volts)] })
        })
        .collect()
}

/// Reads the derived topic from the start until every key of `want` was seen and the end of
/// the partition is reached; returns every result read, as (key, window_start) -> results.
fn read_results(
    bootstrap: &str,
    want: &BTreeMap<(String, i64), Expected>,
) -> BTreeMap<(String, i64), Vec<serde_json::Value>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::Message;
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", "aggregate-check")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("readings.2s", 0, rdkafka::Offset::Beginning).expect("offset");
    consumer.assign(&tpl).expect("assign");
    let mut got: BTreeMap<(String, i64), Vec<serde_json::Value>> = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(std::time::Instant::now() < deadline, "results missing after 60 s: have {:?}", got.keys());
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let key = String::from_utf8(m.key().expect("key").to_vec()).expect("utf-8 key");
                let v: serde_json::Value = serde_json::from_slice(m.payload().expect("value")).expect("JSON value");
                let start = v["window_start"].as_i64().expect("window_start");
                assert_eq!(m.timestamp().to_millis(), Some(start + WINDOW_MS), "timestamp = window end");
                got.entry((key, start)).or_default().push(v);
            }
            Some(Err(KafkaError::PartitionEOF(_))) if want.keys().all(|k| got.contains_key(k)) => return got,
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => panic!("consume: {e}"),
        }
    }
}

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let text = format!(
        "[storage]\ndata_dir = {:?}\ndisk_free_bytes_min = 0\n\n[kafka]\nlisten = \"127.0.0.1:0\"\n\n\
         [mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n\n\
         [[mqtt.routes]]\nfilter = \"meters/+/reading\"\ntopic = \"readings\"\nkey = \"{{1}}\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\n\
         [[aggregate]]\nsource = \"readings\"\nderived = \"readings.2s\"\nwindow_ms = {WINDOW_MS}\n\
         lateness_ms = {LATENESS_MS}\nfields = [\"kw\", \"volts\"]\ntime_field = \"ts\"\n\
         # Only emissions store the state: a restart reads again from the last one.\n\
         checkpoint_interval_ms = \"1h\"\n",
        dir.join("data").to_str().expect("utf-8")
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn mqtt_port(d: &Daemon) -> u16 {
    d.addr("mqtt").rsplit(':').next().and_then(|p| p.parse().ok()).expect("mqtt port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_readings_become_window_results_once_each_across_sigkills() {
    let mut rng = crate::support::seeded_rng("aggregate");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config(dir.path());
    let mut daemon = Daemon::start(&path);
    let mut devices: Vec<Device> = (0..DEVICES).map(|d| Device::connect(mqtt_port(&daemon), d)).collect();
    let mut kept = Vec::new();
    for k in 0..=WINDOWS {
        for phase in phases(&mut rng, k) {
            publish(&mut devices, &phase).await;
            kept.extend(phase.kept.iter().copied());
        }
        let restart = match k {
            // Results of windows 0 and 1 read, then a crash: nothing may be emitted again.
            2 => {
                let bootstrap = daemon.addr("kafka");
                let mut want = expected(&kept);
                want.retain(|(_, start), _| *start < BASE_MS + 2 * WINDOW_MS);
                assert_eq!(want.len(), 2 * DEVICES);
                let got = tokio::task::spawn_blocking(move || read_results(&bootstrap, &want)).await.expect("read");
                assert_eq!(got.len(), 2 * DEVICES, "windows 0 and 1 closed, no other yet: {:?}", got.keys());
                true
            }
            // Right after window 3 closed by acknowledged readings: its results may or may not
            // be out yet.
            4 => true,
            _ => false,
        };
        if restart {
            drop(devices);
            daemon.kill();
            daemon = Daemon::start(&path);
            devices = (0..DEVICES).map(|d| Device::connect(mqtt_port(&daemon), d)).collect();
        }
    }
    let want = expected(&kept);
    assert_eq!(want.len(), WINDOWS as usize * DEVICES);
    let bootstrap = daemon.addr("kafka");
    let check = want.clone();
    let got = tokio::task::spawn_blocking(move || read_results(&bootstrap, &check)).await.expect("read");
    for ((key, start), results) in &got {
        assert_eq!(results.len(), 1, "window {start} of {key} emitted {} times: {results:?}", results.len());
        let v = &results[0];
        let e = want.get(&(key.clone(), *start)).unwrap_or_else(|| panic!("unexpected window {start} of {key}: {v}"));
        assert_eq!(v["window_end"].as_i64(), Some(start + WINDOW_MS));
        assert_eq!(v["count"].as_u64(), Some(e.count), "{key} {start}: {v}");
        for (i, name) in ["kw", "volts"].iter().enumerate() {
            let f = &v["fields"][name];
            let actual = ["min", "max", "mean", "last"].map(|s| f[s].as_f64().unwrap_or(f64::NAN));
            assert_eq!(actual, e.fields[i], "{key} window {start} field {name}: {v}");
        }
    }
    assert_eq!(got.len(), want.len(), "every closed window has a result");
    // The last run read the last phases (late and invalid readings among them) and counts them.
    let metrics = http_get(&daemon.addr("metrics"), "/metrics");
    for reason in ["late", "invalid"] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("tributary_aggregate_skipped_total") && l.contains(&format!("reason=\"{reason}\"")))
            .unwrap_or_else(|| panic!("no skipped {reason} metric:\n{metrics}"));
        let n: u64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a count");
        assert!(n > 0, "{line}");
    }
    assert!(metrics.contains("tributary_aggregate_results_out_total{derived=\"readings.2s\",source=\"readings\"}"));
    drop(devices);
    daemon.stop();
}

/// The smart-meter workload (200 meters, a reading every 10 s for an hour, lz4) aggregated into
/// 15-minute windows in process, with a restart in the middle of the second window (the
/// aggregator stopped once its state with every reading so far was checkpointed, the store
/// closed and opened again, the rest of the hour appended): every result matches the windows
/// computed here from the stored readings, each once; prints raw against derived bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_meter_hour_aggregates_to_one_result_per_meter_and_quarter() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use tributary_broker::aggregate::{run, AggregateConfig, AggregateStats};
    use tributary_broker::{Codec, Store, TopicConfig};
    use tributary_tests::workload::{fleets, ingest, TOPIC};

    const METERS: usize = 200;
    const QUARTER_MS: i64 = 15 * 60_000;
    let start_ms = 1_700_000_100_000 - 1_700_000_100_000 % QUARTER_MS;
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = crate::support::storage_config(dir.path());
    let open = |cfg: tributary_broker::StorageConfig| async move {
        tokio::task::spawn_blocking(move || Store::open(cfg)).await.expect("open task").expect("open store").0
    };
    let store = open(storage.clone()).await;
    let lz4 = TopicConfig { compression: Codec::Lz4, ..TopicConfig::default() };
    store.create_topic(TOPIC, 1, lz4.clone()).await.expect("create source");
    // One appender: the log is in event-time order, so no reading is late (several appenders
    // drift apart in time by more than the lateness, and their readings are rightly dropped).
    let mut fleet = fleets(METERS, 1, start_ms, 10_000);
    let readings = (METERS * 360) as u64;
    // 25 minutes first: the first window closes, the second is open when the restart comes.
    let first = (METERS * 150) as u64;
    ingest(&store, &mut fleet, first, 500, 1).await.expect("ingest");
    let fields = ["import_kwh", "export_kwh", "power_factor", "freq_hz"];
    let cfg = AggregateConfig {
        source: TOPIC.into(),
        derived: "meters.15m".into(),
        window_ms: QUARTER_MS as u64,
        lateness_ms: 60_000,
        fields: fields.iter().map(|f| f.to_string()).collect(),
        checkpoint_interval_ms: 10,
        records_per_step_max: 1000,
        ..AggregateConfig::default()
    };
    // Windows 0..3 close (the last reading, at 59:50, is not past the fourth's end + 1 min).
    let want_results = 3 * METERS as i64;
    let aggregate = |store: &Store| {
        let stats = Arc::new(AggregateStats::default());
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(cfg.clone(), store.clone(), lz4.clone(), stats.clone(), async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
        (stats, stop_tx, task)
    };
    let began = std::time::Instant::now();
    let (stats, stop, task) = aggregate(&store);
    // Until the state covering all of it is stored (a checkpoint: no window closed since the
    // first one's results); a condition polled with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while stats.position_stored.load(Ordering::Relaxed) < first {
        assert!(std::time::Instant::now() < deadline, "state never stored: {stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stats.results_out.load(Ordering::Relaxed), METERS as u64, "the first window only");
    stop.send(true).expect("stop");
    task.await.expect("aggregator task");
    store.close().await.expect("close");
    let store = open(storage).await;
    ingest(&store, &mut fleet, readings - first, 500, 1).await.expect("ingest");
    let (stats2, stop, task) = aggregate(&store);
    let until = |store: Store, n: i64| async move {
        loop {
            let hw = store.watermarks("meters.15m", 0).map_or(0, |w| w.high_watermark);
            if hw >= n {
                return;
            }
            let _ = store.wait_for_data("meters.15m", 0, hw, Duration::from_secs(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), until(store.clone(), want_results)).await.expect("all windows");
    let secs = began.elapsed().as_secs_f64();
    // Everything read: no more results may follow (a duplicate would come before the last).
    while stats2.position_stored.load(Ordering::Relaxed) < readings {
        let _ = store.wait_for_data("meters.15m", 0, want_results, Duration::from_millis(50)).await;
    }
    stop.send(true).expect("stop");
    task.await.expect("aggregator task");
    assert_eq!(stats2.skipped_invalid.load(Ordering::Relaxed), 0);
    assert_eq!(stats.skipped_late.load(Ordering::Relaxed) + stats2.skipped_late.load(Ordering::Relaxed), 0);

    // The same windows computed from the stored readings.
    // Per (key, window start): the count and per field min, max, sum, last, last's time.
    type Window = (u64, Vec<[f64; 5]>);
    let mut expected: BTreeMap<(String, i64), Window> = BTreeMap::new();
    for r in crate::support::read_all(&store, TOPIC, 0) {
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().expect("value")).expect("JSON");
        let window = r.timestamp - r.timestamp.rem_euclid(QUARTER_MS);
        let key = String::from_utf8(r.key.as_deref().expect("key").to_vec()).expect("utf-8");
        let e = expected.entry((key, window)).or_insert_with(|| (0, Vec::new()));
        e.0 += 1;
        for (i, f) in fields.iter().enumerate() {
            let x = v[f].as_f64().expect("number");
            match e.1.get_mut(i) {
                // min, max, sum, last, last's time
                Some(a) => {
                    *a = [
                        a[0].min(x),
                        a[1].max(x),
                        a[2] + x,
                        if r.timestamp >= a[4] as i64 { x } else { a[3] },
                        a[4].max(r.timestamp as f64),
                    ]
                }
                None => e.1.push([x, x, x, x, r.timestamp as f64]),
            }
        }
    }
    let results = crate::support::read_all(&store, "meters.15m", 0);
    assert_eq!(results.len() as i64, want_results, "one result per meter and closed window, none twice");
    let mut seen = std::collections::BTreeSet::new();
    for r in &results {
        let key = String::from_utf8(r.key.as_deref().expect("key").to_vec()).expect("utf-8");
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().expect("value")).expect("JSON");
        let start = v["window_start"].as_i64().expect("start");
        assert!(seen.insert((key.clone(), start)), "{key} {start} twice");
        let (count, aggs) = &expected[&(key.clone(), start)];
        assert_eq!(v["count"].as_u64(), Some(*count), "{key} {start}");
        for (i, f) in fields.iter().enumerate() {
            let a = aggs[i];
            let got = ["min", "max", "mean", "last"].map(|s| v["fields"][f][s].as_f64().expect("number"));
            let want = [a[0], a[1], a[2] / *count as f64, a[3]];
            // serde_json (without its float_roundtrip feature) may parse a printed f64 one ulp off.
            let close = got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= w.abs() * 1e-15);
            assert!(close, "{key} {start} {f}: got {got:?}, want {want:?}");
        }
    }
    let raw = store.partition_info(TOPIC, 0).expect("source");
    let derived = store.partition_info("meters.15m", 0).expect("derived");
    // Per quarter hour: the raw hour holds 4 windows, the derived topic the 3 closed ones.
    let (raw_q, derived_q) = (raw.logical_bytes / 4, derived.logical_bytes / 3);
    eprintln!(
        "smart meters, {METERS} every 10 s: per 15 min raw {} records {raw_q} B stored (lz4), derived {METERS} \
         results {derived_q} B stored (lz4): {:.0}x fewer bytes; restart after {first} of {readings} \
         readings; {readings} readings aggregated in {secs:.2} s (debug build, restart included)",
        readings / 4,
        raw_q as f64 / derived_q as f64
    );
    store.close().await.expect("close");
}
