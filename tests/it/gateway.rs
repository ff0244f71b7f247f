//! The gateway process: starts on built-in defaults with no config file, shuts down cleanly on
//! SIGTERM and SIGINT (the next open needs no repair), refuses a bad config naming the key.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use rustix::process::{kill_process, Pid, Signal};
use tributary_broker::{StorageConfig, Store};

fn gateway(dir: &std::path::Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gateway")
}

/// Reads stderr until a line contains `needle`; returns everything read.
/// A gateway serving Kafka, MQTT and metrics on free ports, data in `dir/data`.
struct Serving {
    child: Child,
    log: BufReader<std::process::ChildStderr>,
    kafka: std::net::SocketAddr,
    metrics: String,
}

fn serve_on_free_ports(dir: &std::path::Path) -> Serving {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\ndisk_free_bytes_min = 0\n[kafka]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\nsys_interval_ms = 0\n",
            dir.join("data").to_str().expect("utf-8")
        ),
    )
    .expect("write config");
    let mut child = gateway(dir, &["serve", "--config", config.to_str().expect("utf-8")]);
    let (log, seen) = wait_for(&mut child, "tributary gateway ready");
    let named = |name: &str| {
        let a = seen.split(&format!("{name}=")).nth(1).and_then(|r| r.split_whitespace().next());
        a.unwrap_or_else(|| panic!("{name} address in {seen}")).to_string()
    };
    let kafka = named("kafka").parse().expect("address");
    Serving { metrics: named("metrics"), child, log, kafka }
}

fn wait_for(child: &mut Child, needle: &str) -> (BufReader<std::process::ChildStderr>, String) {
    let mut reader = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "gateway exited before printing {needle:?}; output:\n{seen}");
        seen.push_str(&line);
        if line.contains(needle) {
            return (reader, seen);
        }
    }
}

fn stop(child: &mut Child, signal: Signal) -> String {
    let (mut reader, _) = wait_for(child, "tributary gateway ready");
    let pid = Pid::from_raw(child.id() as i32).expect("pid");
    kill_process(pid, signal).expect("signal");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).expect("read stderr");
    let status = child.wait().expect("wait");
    assert!(status.success(), "gateway exit status {status:?}; output:\n{rest}");
    rest
}

#[test]
fn starts_on_defaults_and_stops_cleanly_on_sigterm_and_sigint() {
    let dir = tempfile::tempdir().expect("tempdir");
    for signal in [Signal::TERM, Signal::INT] {
        let mut child = gateway(dir.path(), &["serve"]);
        let out = stop(&mut child, signal);
        assert!(out.contains("shutdown complete"), "{out}");
    }
    let data = dir.path().join("tributary-data");
    assert!(data.join("tributary.redb").exists(), "data lives in ./tributary-data by default");
    let (store, report) =
        Store::open(StorageConfig { data_dir: data, disk_free_bytes_min: 0, ..StorageConfig::default() })
            .expect("open after clean shutdown");
    assert!(!report.repaired, "a clean shutdown leaves nothing to repair");
    assert_eq!(store.stats().journal_replayed_records, 0, "nor anything in the journal to replay");
    store.close_blocking().expect("close");
}

#[test]
fn bad_config_stops_startup_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[storage]\nmax_bytes = 10\n").expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .args(["serve", "--config", path.to_str().expect("utf-8")])
        .current_dir(dir.path())
        .output()
        .expect("run gateway");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("storage.max_bytes"), "{err}");
    assert!(!dir.path().join("tributary-data").exists(), "nothing is created when the config is bad");
}

#[test]
fn shipped_config_file_starts_the_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/gateway.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .args(["config", "check", shipped])
        .current_dir(dir.path())
        .output()
        .expect("run config check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The shipped file as is, but on free ports so parallel tests do not collide on 9092, 1883
    // and the metrics endpoint's 9464.
    let mut text = std::fs::read_to_string(shipped).expect("read shipped config");
    for port in [9092, 1883, 9464] {
        let listen = format!("listen = \"127.0.0.1:{port}\"");
        assert!(text.contains(&listen), "the shipped config listens on {port}");
        text = text.replace(&listen, "listen = \"127.0.0.1:0\"");
    }
    let copy = dir.path().join("gateway.toml");
    std::fs::write(&copy, text).expect("write");
    let mut child = gateway(dir.path(), &["serve", "--config", copy.to_str().expect("utf-8")]);
    stop(&mut child, Signal::TERM);
}

/// Graceful shutdown of the Kafka front end (the shared listener's drain): a produce (acks=all)
/// whose first bytes arrived before SIGTERM is still read, written to the log and answered; the
/// connection closes only after its response, a fetch parked in a long poll (20 s, longer than
/// the listener's 5 s shutdown wait) is answered at once, an idle connection is closed at once,
/// the process exits cleanly, and the acknowledged records are in the log after a restart.
#[test]
fn kafka_requests_begun_before_sigterm_are_answered_and_kept() {
    use crate::kafka_protocol::{batch, fetch_req, produce_req, produce_result};
    use crate::support::RawKafka;
    use kafka_protocol::messages::{metadata_request, FetchRequest, MetadataRequest, ProduceRequest, TopicName};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let Serving { mut child, mut log, kafka: addr, metrics } = serve_on_free_ports(dir.path());

    let mut c = RawKafka::connect(addr);
    let md = MetadataRequest::default()
        .with_topics(Some(vec![
            metadata_request::MetadataRequestTopic::default().with_name(Some(TopicName("drain".to_string().into())))
        ]))
        .with_allow_auto_topic_creation(true);
    assert_eq!(c.call(&md, 4).topics[0].error_code, 0);
    assert_eq!(produce_result(&c.call(&produce_req("drain", 0, batch(3, None), -1), 7)), (0, 0));
    let mut idle = RawKafka::connect(addr);
    // A consumer at the end of the log, long-polling.
    let mut consumer = RawKafka::connect(addr);
    let fetch_corr = consumer.send(&fetch_req(&[("drain", 0, 3)], 20_000, 1, 1 << 20, 1 << 20), 11);
    // Half of the next produce arrives, then the gateway is told to stop.
    let (corr, frame) = c.frame(&produce_req("drain", 0, batch(5, None), -1), 7);
    let half = frame.len() / 2;
    c.write(&frame[..half]);
    // The gateway has read the size prefix and waits for the rest (the request has begun), and
    // the fetch is parked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = crate::support::http_get(&metrics, "/metrics");
        if text.contains("\ntributary_kafka_frames_reading 1\n")
            && text.contains("\ntributary_kafka_fetches_waiting 1\n")
        {
            // Topic creation and the first produce were durable commits, through the journal.
            let journaled = text
                .lines()
                .find_map(|l| l.strip_prefix("tributary_store_journal_records_total "))
                .and_then(|v| v.parse::<u64>().ok());
            assert!(journaled.is_some_and(|n| n >= 2), "journal records {journaled:?}");
            // Written unbuffered (O_DIRECT | O_DSYNC): the test's temporary directory is on a
            // file system that takes it, as a gateway's data directory is.
            let unbuffered = text
                .lines()
                .find_map(|l| l.strip_prefix("tributary_store_journal_unbuffered_records_total "))
                .and_then(|v| v.parse::<u64>().ok());
            assert!(unbuffered.is_some_and(|n| n >= 2), "journal records written unbuffered: {unbuffered:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the half request and the parked fetch within 20 s:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = Pid::from_raw(child.id() as i32).expect("pid");
    kill_process(pid, Signal::TERM).expect("SIGTERM");
    let mut line = String::new();
    while !line.contains("kafka listener closed") {
        line.clear();
        let n = log.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "the gateway exited without waiting for its Kafka connections");
    }
    assert!(std::net::TcpStream::connect(addr).is_err(), "a stopping listener accepts nothing new");
    assert!(idle.recv_frame().is_none(), "an idle connection is closed at once");
    let fetched = consumer.recv::<FetchRequest>(11, fetch_corr);
    let p = &fetched.responses[0].partitions[0];
    assert_eq!((p.error_code, p.high_watermark), (0, 3), "the parked fetch is answered, empty");
    assert!(consumer.recv_frame().is_none(), "then its connection closes");
    c.write(&frame[half..]);
    let answer = c.recv::<ProduceRequest>(7, corr);
    assert_eq!(produce_result(&answer), (0, 3), "the produce begun before SIGTERM is answered");
    assert!(c.recv_frame().is_none(), "then the connection closes");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut log, &mut rest).expect("read stderr");
    let status = child.wait().expect("wait");
    assert!(status.success(), "gateway exit status {status:?}; output:\n{rest}");
    assert!(rest.contains("shutdown complete"), "{rest}");

    let (store, report) =
        Store::open(StorageConfig { data_dir: data, disk_free_bytes_min: 0, ..StorageConfig::default() })
            .expect("open after the shutdown");
    assert!(!report.repaired, "a clean shutdown leaves nothing to repair");
    let values: Vec<Vec<u8>> =
        crate::support::read_all(&store, "drain", 0).into_iter().map(|r| r.value.expect("value").to_vec()).collect();
    assert_eq!(values.len(), 8, "both acknowledged batches are in the log");
    assert_eq!(values[3..], (0..5).map(|i| format!("value-{i}").into_bytes()).collect::<Vec<_>>()[..]);
    store.close_blocking().expect("close");
}

/// Accept errors are survived (the shared listener's backoff; its schedule is unit-tested in
/// `listener.rs`): with the gateway's
/// file-descriptor limit lowered (`prlimit RLIMIT_NOFILE`) to a few above what it holds, a burst
/// of connections makes accepting fail with EMFILE; the failures are counted
/// (`tributary_accept_errors_total`), and once the burst is closed and the limit restored the
/// gateway serves new connections as before.
#[test]
fn accept_errors_are_counted_and_survived() {
    use crate::support::{http_get, RawKafka};
    use kafka_protocol::messages::ApiVersionsRequest;
    use rustix::process::{prlimit, Resource, Rlimit};
    let dir = tempfile::tempdir().expect("tempdir");
    let Serving { mut child, mut log, kafka: addr, metrics } = serve_on_free_ports(dir.path());
    let pid = Pid::from_raw(child.id() as i32).expect("pid");
    let open = std::fs::read_dir(format!("/proc/{}/fd", child.id())).expect("fds").count() as u64;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits");
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse::<u64>().ok());
    let before = prlimit(Some(pid), Resource::Nofile, Rlimit { current: Some(open + 4), maximum: hard })
        .expect("lower RLIMIT_NOFILE");
    // More connections than descriptors are left: the kernel completes them all (the backlog),
    // the gateway's accepts fail once its descriptors run out.
    let burst: Vec<std::net::TcpStream> =
        (0..16).map(|_| std::net::TcpStream::connect(addr).expect("connect")).collect();
    let mut line = String::new();
    while !line.contains("kafka accept failed") {
        line.clear();
        assert!(log.read_line(&mut line).expect("read stderr") > 0, "the gateway exited");
    }
    std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    drop(burst);
    prlimit(Some(pid), Resource::Nofile, before).expect("restore RLIMIT_NOFILE");
    let mut probe = RawKafka::connect(addr);
    let answer = probe.call(&ApiVersionsRequest::default(), 0);
    assert_eq!(answer.error_code, 0, "served once descriptors are free again");
    let text = http_get(&metrics, "/metrics");
    let errors: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tributary_accept_errors_total{protocol=\"kafka\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Kafka accept-error counter in:\n{text}"));
    assert!(errors > 0, "EMFILE accepts are counted");
    kill_process(pid, Signal::TERM).expect("SIGTERM");
    assert!(child.wait().expect("wait").success(), "clean shutdown");
}
