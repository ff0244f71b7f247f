//! The status page in a real browser (Debian's chromium under playwright-core, driven by
//! `tests/browser/status.js`) against the gateway binary: the page loads and shows a topic that
//! appears after a produce without being reloaded; the mirror link shows down after the receiver
//! stops, with the records produced meanwhile as its backlog, and up again after it restarts,
//! the backlog drained; with `[auth]` on, nothing but the login prompt is
//! served before a login by a user with the `status` right, and a failed login is listed among
//! the refusals. The browser script and this test step through each scenario together over a
//! line-based control socket (no sleeps: each side waits for the other's line).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::support::Daemon;

/// Longest wait for one step of the browser (chromium's start included).
const STEP: Duration = Duration::from_secs(90);

/// A browser script running, and its control connection.
struct Browser {
    script: tokio::task::JoinHandle<anyhow::Result<String>>,
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    out: OwnedWriteHalf,
}

impl Browser {
    /// Starts `tests/browser/status.js` in `mode` with `env`; returns once it connected back.
    async fn open(mode: &str, env: &[(&str, String)]) -> Self {
        let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind control");
        let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        env.push(("MODE".into(), mode.to_string()));
        env.push(("CONTROL".into(), control.local_addr().expect("addr").to_string()));
        let script = tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            tributary_tests::browser::run_script("status.js", &env)
        });
        let mut script = script;
        let conn = tokio::select! {
            c = tokio::time::timeout(STEP, control.accept()) => c.expect("the browser script connects").expect("accept").0,
            r = &mut script => panic!("the browser script ended before connecting: {:?}", r.expect("task")),
        };
        let (rd, out) = conn.into_split();
        Self { script, lines: BufReader::new(rd).lines(), out }
    }

    /// Waits for the script's next line, which must be `expected`.
    async fn expect(&mut self, expected: &str) {
        let line = tokio::time::timeout(STEP, self.lines.next_line()).await;
        match line {
            Ok(Ok(Some(l))) if l == expected => {}
            other => {
                let script = tokio::time::timeout(STEP, &mut self.script).await;
                panic!("expected {expected:?} from the browser, got {other:?}; script: {script:?}");
            }
        }
    }

    async fn send(&mut self, line: &str) {
        self.out.write_all(format!("{line}\n").as_bytes()).await.expect("send to the browser");
    }

    /// Waits for the script to end; its stdout.
    async fn finish(self) -> String {
        drop(self.out);
        let r = tokio::time::timeout(STEP, self.script).await.expect("the browser script ends");
        r.expect("task").unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// A gateway config on free ports with `extra` tables, and the status page refreshing quickly.
fn config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "[storage]\ndata_dir = \"{}\"\ndisk_free_bytes_min = 0\n\n[kafka]\nlisten = \"127.0.0.1:0\"\n\n\
         [mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\nsys_interval_ms = 0\n\n\
         [status]\nrefresh_ms = 250\nhistory_interval_ms = 500\n\n{extra}",
        dir.join("data").display()
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

async fn produce(kafka: &str, topic: &str, n: usize) {
    let producer: rdkafka::producer::FutureProducer =
        crate::support::client_config(kafka).set("acks", "all").create().expect("producer");
    for i in 0..n {
        let value = format!("reading-{i}");
        let rec = rdkafka::producer::FutureRecord::to(topic).key("meter-1").payload(&value);
        producer.send(rec, Duration::from_secs(10)).await.expect("produced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_loads_and_shows_a_new_topic_without_reloading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&config(dir.path(), ""));
    let url = format!("http://{}/", daemon.addr("metrics"));
    let mut browser = Browser::open(
        "live",
        &[("URL", url), ("TOPIC", "fresh-readings".into()), ("VERSION", env!("CARGO_PKG_VERSION").into())],
    )
    .await;
    browser.expect("loaded").await;
    produce(&daemon.addr("kafka"), "fresh-readings", 3).await;
    browser.send("produced").await;
    browser.expect("topic shown").await;
    let out = browser.finish().await;
    assert!(out.contains("records 3"), "{out}");
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_mirror_link_go_down_and_come_back() {
    use crate::mirror::{cloud_config, Cloud, Pki, SITE};
    let pki = Pki::new();
    let (cert, key) = pki.site("site", SITE, None);
    let central = crate::support::KafkaBroker::start().await;
    let cloud_cfg = cloud_config(&pki, &central, "127.0.0.1:0".parse().expect("addr"));
    let cloud = Cloud::start(cloud_cfg.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let mirror = format!(
        "[mirror]\nenabled = true\ncloud = \"{}\"\nserver_name = \"localhost\"\nsite = \"{SITE}\"\n\
         ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\ntopics = [\"meters\"]\n\
         reconnect_backoff_min_ms = 20\nreconnect_backoff_max_ms = 200\n",
        cloud.addr,
        pki.path("ca.pem").display(),
        cert.display(),
        key.display()
    );
    let daemon = Daemon::start(&config(dir.path(), &mirror));
    produce(&daemon.addr("kafka"), "meters", 20).await;
    let mut env = vec![("URL", format!("http://{}/", daemon.addr("metrics")))];
    if let Ok(shots) = std::env::var("TRIBUTARY_STATUS_SCREENSHOTS") {
        env.push(("SCREENSHOTS", shots));
    }
    let mut browser = Browser::open("mirror", &env).await;
    browser.expect("up").await;
    let addr = cloud.addr;
    cloud.stop().await;
    produce(&daemon.addr("kafka"), "meters", 200).await;
    browser.send("stopped").await;
    browser.expect("down").await;
    let cloud = Cloud::restart(tributary_sync::CloudConfig { listen: addr, ..cloud_cfg }).await;
    browser.send("restarted").await;
    browser.expect("up").await;
    browser.finish().await;
    daemon.stop();
    cloud.stop().await;
}

/// GET `path` with `authorization` (a header value, or none); the whole answer.
fn get(addr: &str, path: &str, authorization: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_the_status_page_asks_for_a_login_and_shows_nothing_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let viewer = crate::security::user("viewer", "view-pw", |u| u.status = true);
    let app = crate::security::user("app", "app-pw", |u| {
        u.kafka.write = vec!["*".into()];
        u.kafka.create = vec!["*".into()];
    });
    let hash = |u: &tributary_broker::security::UserConfig| u.password_hash.clone();
    let auth = format!(
        "[auth]\nenabled = true\nfailure_delay_ms = 0\n\n[[auth.users]]\nname = \"viewer\"\npassword_hash = \"{}\"\nstatus = true\n\n\
         [[auth.users]]\nname = \"app\"\npassword_hash = \"{}\"\nkafka.write = [\"*\"]\nkafka.create = [\"*\"]\n",
        hash(&viewer),
        hash(&app)
    );
    let daemon = Daemon::start(&config(dir.path(), &auth));
    let metrics = daemon.addr("metrics");
    // A topic the page must not show before the login.
    let kafka = daemon.addr("kafka");
    let producer: rdkafka::producer::FutureProducer = crate::support::client_config(&kafka)
        .set("acks", "all")
        .set("security.protocol", "SASL_PLAINTEXT")
        .set("sasl.mechanisms", "PLAIN")
        .set("sasl.username", "app")
        .set("sasl.password", "app-pw")
        .create()
        .expect("producer");
    let rec = rdkafka::producer::FutureRecord::to("secret-readings").key("k").payload("v");
    producer.send(rec, Duration::from_secs(10)).await.expect("produced");

    // Raw HTTP: every route of the page is the challenge without a login, and with a login by a
    // user without the status right ("app:app-pw", "viewer:view-pw" in base64).
    for (path, authorization) in
        [("/", None), ("/api/status", None), ("/status.js", None), ("/api/status", Some("Basic YXBwOmFwcC1wdw=="))]
    {
        let a = get(&metrics, path, authorization);
        assert!(a.starts_with("HTTP/1.1 401 "), "{path}: {a}");
        assert!(a.contains("\r\nWWW-Authenticate: Basic realm=\"tributary status\""), "{a}");
        assert!(!a.contains("secret-readings") && !a.contains(env!("CARGO_PKG_VERSION")), "{a}");
    }
    let a = get(&metrics, "/api/status", Some("Basic dmlld2VyOnZpZXctcHc="));
    assert!(a.starts_with("HTTP/1.1 200 ") && a.contains("\"name\":\"secret-readings\""), "{a}");

    let out = Browser::open(
        "auth",
        &[
            ("URL", format!("http://{metrics}/")),
            ("TOPIC", "secret-readings".into()),
            ("USER", "viewer".into()),
            ("PASSWORD", "view-pw".into()),
        ],
    )
    .await
    .finish()
    .await;
    assert!(out.contains("login refused shown"), "{out}");
    let wrong: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("wrong logins "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(wrong > 0, "{out}");
    // The app's login without the right, and the browser's wrong passwords.
    let text = crate::support::http_get(&metrics, "/metrics");
    let failures = format!("tributary_status_auth_failures_total {}\n", 1 + wrong);
    assert!(text.contains(&failures), "{failures:?} in\n{text}");
    daemon.stop();
}
