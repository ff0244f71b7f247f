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
