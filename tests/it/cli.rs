//! The administration CLI (`tributary topics|groups|produce|consume|status`) run as the real
//! program against a broker in this process: topic administration, produce and consume, a
//! consumer group made by librdkafka described with its lag and reset, status, a gateway with
//! `[auth]` on (SASL PLAIN and SCRAM), and the errors an operator sees (gateway not running or
//! not answering, authentication missing or wrong, topic or group missing).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tributary_broker::kafka::{KafkaConfig, KafkaServer};
use tributary_broker::security::{Auth, AuthConfig, KafkaAcl, PasswordHash, UserConfig};
use tributary_broker::Store;
use tributary_broker::TopicTemplate;

use crate::support::{client_config, read_all, storage_config, KafkaBroker};

/// Runs `tributary ARGS --bootstrap-server BOOTSTRAP` with `stdin`.
fn run(bootstrap: &str, args: &[&str], stdin: &str) -> Output {
    run_env(bootstrap, args, stdin, &[])
}

/// As `run`, with environment variables set.
fn run_env(bootstrap: &str, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .args(args)
        .args(["--bootstrap-server", bootstrap])
        .env_remove("TRIBUTARY_BOOTSTRAP")
        .env_remove("TRIBUTARY_USER")
        .env_remove("TRIBUTARY_PASSWORD")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tributary");
    child.stdin.take().expect("piped stdin").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("run tributary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).expect("utf-8 output")
}

/// Runs a command that must succeed; returns its stdout.
fn ok(bootstrap: &str, args: &[&str]) -> String {
    ok_with(bootstrap, args, "")
}

fn ok_with(bootstrap: &str, args: &[&str], stdin: &str) -> String {
    let out = run(bootstrap, args, stdin);
    assert!(out.status.success(), "tributary {args:?} failed: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Runs a command with `--json`; returns the parsed document.
fn json_of(bootstrap: &str, args: &[&str]) -> Value {
    let out = ok(bootstrap, &[args, &["--json"]].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tributary {args:?} --json: {e}:\n{out}"))
}

/// Runs a command that must fail with exit status 1; returns its stderr.
fn fails(bootstrap: &str, args: &[&str]) -> String {
    let out = run(bootstrap, args, "");
    assert_eq!(out.status.code(), Some(1), "tributary {args:?}: stdout {}", text(&out.stdout));
    text(&out.stderr)
}

/// The cells of an aligned text table, after checking every cell starts where its column's
/// header starts.
fn table(out: &str) -> Vec<Vec<String>> {
    let starts = |line: &str| -> Vec<usize> {
        let b = line.as_bytes();
        (0..b.len()).filter(|&i| b[i] != b' ' && (i == 0 || b[i - 1] == b' ')).collect()
    };
    let mut lines = out.lines();
    let header = lines.next().expect("a header line");
    let columns = starts(header);
    let mut rows = Vec::new();
    for line in lines {
        assert!(!line.ends_with(' '), "trailing spaces in {line:?}");
        let cells: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        assert_eq!(starts(line), columns[..cells.len()], "row {line:?} not aligned under {header:?}");
        rows.push(cells);
    }
    rows
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_listed_described_altered_and_deleted() {
    let broker = KafkaBroker::start().await;
    let bs = broker.bootstrap();
    let out = ok(&bs, &["topics", "create", "cli-t", "--partitions", "2", "--config", "retention.ms=60000"]);
    assert_eq!(out, "created topic 'cli-t' with 2 partitions\n");
    let info = broker.store.topic("cli-t").expect("topic created");
    assert_eq!((info.partitions, info.config.get("retention.ms").as_deref()), (2, Some("60000")));
    ok(&bs, &["topics", "create", "other", "--partitions", "1"]);

    assert_eq!(ok(&bs, &["topics", "list"]), "TOPIC  PARTITIONS\ncli-t  2\nother  1\n");
    assert_eq!(
        json_of(&bs, &["topics", "list"]),
        json!([{"name": "cli-t", "partitions": 2}, {"name": "other", "partitions": 1}])
    );

    let described = ok(&bs, &["topics", "describe", "cli-t"]);
    let (partitions, configs) = described.split_once("\n\n").expect("two tables");
    assert_eq!(
        table(partitions),
        [row(&["cli-t", "0", "0", "0", "0"]), row(&["cli-t", "1", "0", "0", "0"])],
        "{described}"
    );
    assert!(partitions.starts_with("TOPIC  PARTITION  LOG-START  HIGH-WATERMARK  RECORDS\n"), "{described}");
    let configs = table(configs);
    assert!(configs.contains(&row(&["cli-t", "retention.ms", "60000", "topic"])), "{described}");
    assert!(configs.contains(&row(&["cli-t", "durability", "fsync", "default"])), "{described}");
    let d = json_of(&bs, &["topics", "describe", "cli-t"]);
    assert_eq!(d[0]["name"], "cli-t");
    assert_eq!(
        d[0]["partitions"][1],
        json!({"partition": 1, "log_start_offset": 0, "high_watermark": 0, "records": 0})
    );
    let retention = d[0]["configs"].as_array().expect("configs").iter().find(|c| c["name"] == "retention.ms").cloned();
    assert_eq!(retention, Some(json!({"name": "retention.ms", "value": "60000", "source": "topic"})));
    let all = json_of(&bs, &["topics", "describe"]);
    assert_eq!(all.as_array().map(Vec::len), Some(2), "describe without a topic covers every topic");

    assert_eq!(ok(&bs, &["topics", "alter", "cli-t", "--partitions", "3"]), "topic 'cli-t' now has 3 partitions\n");
    assert_eq!(broker.store.topic("cli-t").expect("topic").partitions, 3);
    assert_eq!(json_of(&bs, &["topics", "describe", "cli-t"])[0]["partitions"].as_array().map(Vec::len), Some(3));
    let err = fails(&bs, &["topics", "alter", "cli-t", "--partitions", "2"]);
    assert!(err.contains("cannot add partitions to topic 'cli-t'") && err.contains("[InvalidPartitions]"), "{err}");
    let err = fails(&bs, &["topics", "create", "cli-t", "--partitions", "1"]);
    assert!(err.contains("already exists") && err.contains("[TopicAlreadyExists]"), "{err}");
    let err = fails(&bs, &["topics", "create", "bad", "--partitions", "1", "--config", "no.such.key=1"]);
    assert!(err.contains("cannot create topic 'bad'") && err.contains("[InvalidConfig]"), "{err}");

    assert_eq!(json_of(&bs, &["topics", "delete", "cli-t"]), json!({"topic": "cli-t", "deleted": true}));
    assert!(broker.store.topic("cli-t").is_none());
    assert_eq!(ok(&bs, &["topics", "list"]), "TOPIC  PARTITIONS\nother  1\n");
    assert_eq!(ok(&bs, &["topics", "delete", "other"]), "deleted topic 'other'\n");
    assert_eq!(ok(&bs, &["topics", "list"]), "TOPIC  PARTITIONS\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_lines_are_consumed_back() {
    let broker = KafkaBroker::start().await;
    let bs = broker.bootstrap();
    ok(&bs, &["topics", "create", "lines", "--partitions", "1"]);
    let out = ok_with(&bs, &["produce", "lines"], "a\nb\r\nc\n");
    assert_eq!(
        out,
        "produced 3 record(s) to 'lines'\nPARTITION  FIRST-OFFSET  LAST-OFFSET  RECORDS\n0          0             2            3\n"
    );
    let stored: Vec<_> = read_all(&broker.store, "lines", 0).into_iter().map(|r| (r.offset, r.key, r.value)).collect();
    let value = |s: &'static str| Some(bytes::Bytes::from_static(s.as_bytes()));
    assert_eq!(stored, [(0, None, value("a")), (1, None, value("b")), (2, None, value("c"))]);

    assert_eq!(ok(&bs, &["consume", "lines", "--from-beginning", "--max-messages", "3"]), "a\nb\nc\n");
    let out = ok(&bs, &["consume", "lines", "--offset", "1", "--max-messages", "2", "--json"]);
    let records: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(records.len(), 2, "{out}");
    assert_eq!((records[0]["offset"].clone(), records[0]["value"].clone()), (json!(1), json!("b")));
    assert_eq!((records[1]["offset"].clone(), records[1]["value"].clone()), (json!(2), json!("c")));
    assert_eq!(records[1]["key"], Value::Null);

    // A key for every line (no trailing newline on the last one), offsets as JSON.
    let produced: Value =
        serde_json::from_str(&ok_with(&bs, &["produce", "lines", "--key", "k1", "--json"], "d\ne")).expect("json");
    assert_eq!(
        produced,
        json!({"topic": "lines", "records": 2,
               "partitions": [{"partition": 0, "first_offset": 3, "last_offset": 4, "records": 2}]})
    );
    let all = ok(&bs, &["consume", "lines", "--from-beginning", "--exit-at-end", "--print-key"]);
    assert_eq!(all, "null\ta\nnull\tb\nnull\tc\nk1\td\nk1\te\n");
    assert_eq!(ok(&bs, &["consume", "lines", "--exit-at-end"]), "", "by default only new records are read");

    let err = fails(&bs, &["consume", "lines", "--offset", "9", "--max-messages", "1"]);
    assert!(
        err.contains("offset 9 is out of range for partition 0 of topic 'lines' (log start 0, high watermark 5)"),
        "{err}"
    );
    let err = fails(&bs, &["produce", "lines", "--partition", "4"]);
    assert!(err.contains("topic 'lines' has no partition 4"), "{err}");
}

/// A group member made by librdkafka, subscribed to `topic`, that has read `n` records.
fn member(bootstrap: &str, group: &str, topic: &str, n: usize) -> BaseConsumer {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", group)
        .set("client.id", "cli-member")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "100")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut read = 0;
    while read < n {
        assert!(Instant::now() < deadline, "the member read only {read} of {n} records");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => read += 1,
            Some(Err(e)) => panic!("member poll: {e}"),
            None => {}
        }
    }
    consumer
}

/// Leaves the group before the consumer is dropped: librdkafka can hang in close() when a
/// rebalance callback fires inside it (see kafka_groups.rs).
fn leave(consumer: BaseConsumer) {
    consumer.unsubscribe();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && consumer.assignment().is_ok_and(|a| a.count() > 0) {
        let _ = consumer.poll(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_described_with_lag_reset_and_deleted() {
    let broker = KafkaBroker::start_with(KafkaConfig { group_session_timeout_min_ms: 500, ..Default::default() }).await;
    let bs = broker.bootstrap();
    ok(&bs, &["topics", "create", "cli-g", "--partitions", "1"]);
    let lines: String = (0..10).map(|i| format!("{i}\n")).collect();
    ok_with(&bs, &["produce", "cli-g"], &lines);

    let bs1 = bs.clone();
    let consumer = tokio::task::spawn_blocking(move || {
        let c = member(&bs1, "cli-group", "cli-g", 4);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("cli-g", 0, Offset::Offset(4)).expect("tpl");
        c.commit(&tpl, CommitMode::Sync).expect("commit offset 4");
        c
    })
    .await
    .expect("member");

    let d = json_of(&bs, &["groups", "describe", "cli-group"]);
    assert_eq!((d["state"].as_str(), d["protocol_type"].as_str()), (Some("Stable"), Some("consumer")), "{d}");
    assert_eq!(d["members"].as_array().map(Vec::len), Some(1), "{d}");
    assert_eq!(d["members"][0]["client_id"], "cli-member");
    assert_eq!(d["members"][0]["assignment"], json!([{"topic": "cli-g", "partitions": [0]}]));
    let member_id = d["members"][0]["member_id"].as_str().expect("member id").to_string();
    assert_eq!(
        d["offsets"],
        json!([{"topic": "cli-g", "partition": 0, "committed": 4, "high_watermark": 10, "lag": 6,
                "member": member_id, "client_id": "cli-member"}])
    );
    let human = ok(&bs, &["groups", "describe", "cli-group"]);
    let mut parts = human.split("\n\n");
    let title = parts.next().expect("title");
    assert!(title.starts_with("group 'cli-group': Stable, consumer/") && title.ends_with(", 1 member"), "{human}");
    assert_eq!(table(parts.next().expect("members")), [row(&[&member_id, "cli-member", "/127.0.0.1", "cli-g:0"])]);
    assert_eq!(
        table(parts.next().expect("offsets")),
        [row(&["cli-g", "0", "4", "10", "6", &member_id, "cli-member"])],
        "{human}"
    );
    assert_eq!(table(&ok(&bs, &["groups", "list"])), [row(&["cli-group", "Stable", "1", "consumer"])]);

    // Not while the group has a member.
    let err = fails(&bs, &["groups", "reset-offsets", "cli-group", "--topic", "cli-g", "--to-earliest", "--execute"]);
    assert!(
        err.contains("group 'cli-group' is Stable with 1 member(s)") && err.contains("stop its consumers"),
        "{err}"
    );
    let err = fails(&bs, &["groups", "delete", "cli-group"]);
    assert!(err.contains("group 'cli-group' still has members"), "{err}");

    tokio::task::spawn_blocking(move || leave(consumer)).await.expect("leave");
    // The member's LeaveGroup reaches the coordinator on librdkafka's own schedule.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = json_of(&bs, &["groups", "describe", "cli-group"]);
        if d["state"] == "Empty" {
            break;
        }
        assert!(Instant::now() < deadline, "the group never became empty: {d}");
        tokio::task::yield_now().await;
    }

    // A dry run shows the change and makes none.
    let out = run(&bs, &["groups", "reset-offsets", "cli-group", "--topic", "cli-g", "--to-earliest"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(table(&text(&out.stdout)), [row(&["cli-g", "0", "4", "0"])]);
    assert!(text(&out.stderr).contains("dry run"), "{}", text(&out.stderr));
    assert_eq!(json_of(&bs, &["groups", "describe", "cli-group"])["offsets"][0]["committed"], 4);

    let reset =
        json_of(&bs, &["groups", "reset-offsets", "cli-group", "--topic", "cli-g", "--to-earliest", "--execute"]);
    assert_eq!(
        reset,
        json!({"group": "cli-group", "topic": "cli-g", "executed": true,
               "partitions": [{"partition": 0, "current": 4, "new": 0}]})
    );
    let d = json_of(&bs, &["groups", "describe", "cli-group"]);
    assert_eq!((d["offsets"][0]["committed"].clone(), d["offsets"][0]["lag"].clone()), (json!(0), json!(10)), "{d}");
    // OffsetFetch from librdkafka agrees.
    let bs1 = bs.clone();
    let committed = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = client_config(&bs1).set("group.id", "cli-group").create().expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("cli-g", 0);
        let got = c.committed_offsets(tpl, Duration::from_secs(30)).expect("committed offsets");
        got.elements()[0].offset()
    })
    .await
    .expect("offset fetch");
    assert_eq!(committed, Offset::Offset(0));
    let to =
        json_of(&bs, &["groups", "reset-offsets", "cli-group", "--topic", "cli-g", "--to-offset", "99", "--execute"]);
    assert_eq!(to["partitions"][0]["new"], 10, "--to-offset is clamped to the high watermark");
    let latest = json_of(&bs, &["groups", "reset-offsets", "cli-group", "--topic", "cli-g", "--to-latest"]);
    assert_eq!((latest["executed"].clone(), latest["partitions"][0]["new"].clone()), (json!(false), json!(10)));

    assert_eq!(ok(&bs, &["groups", "delete", "cli-group"]), "deleted group 'cli-group'\n");
    assert_eq!(json_of(&bs, &["groups", "list"]), json!([]));
    let err = fails(&bs, &["groups", "describe", "cli-group"]);
    assert_eq!(err, "tributary: group 'cli-group' does not exist\n");
    let err = fails(&bs, &["groups", "delete", "cli-group"]);
    assert_eq!(err, "tributary: group 'cli-group' does not exist\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_topics_records_and_groups() {
    let broker = KafkaBroker::start().await;
    let bs = broker.bootstrap();
    ok(&bs, &["topics", "create", "s1", "--partitions", "1"]);
    ok(&bs, &["topics", "create", "s2", "--partitions", "2"]);
    ok_with(&bs, &["produce", "s1"], "1\n2\n3\n");
    ok_with(&bs, &["produce", "s2", "--partition", "1"], "4\n5\n");
    // A group with a commit: the consumer commits what it printed.
    assert_eq!(ok(&bs, &["consume", "s1", "--from-beginning", "--max-messages", "2", "--group", "sg"]), "1\n2\n");
    assert_eq!(ok(&bs, &["consume", "s1", "--max-messages", "1", "--group", "sg"]), "3\n", "resumes after the commit");

    let s = json_of(&bs, &["status"]);
    assert_eq!(
        (s["reachable"].clone(), s["topics"].clone(), s["partitions"].clone()),
        (json!(true), json!(2), json!(3))
    );
    assert_eq!((s["records"].clone(), s["groups"].clone()), (json!(5), json!(1)), "{s}");
    let apis: BTreeSet<&str> = s["apis"].as_array().expect("apis").iter().filter_map(|a| a["name"].as_str()).collect();
    assert!(apis.contains("Produce") && apis.contains("ApiVersions"), "{apis:?}");

    // The bootstrap address from the environment, and the text form.
    let out = Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
        .arg("status")
        .env("TRIBUTARY_BOOTSTRAP", &bs)
        .output()
        .expect("run status");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let human = text(&out.stdout);
    assert!(human.starts_with(&format!("gateway      {bs} (reachable)\n")), "{human}");
    assert!(human.contains("\nrecords      5\n") && human.contains("\ngroups       1\n"), "{human}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_cause_and_exit_non_zero() {
    // Nothing listens on a port just released.
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let down = free.to_string();
    for args in [&["status"][..], &["topics", "list"], &["groups", "list"], &["consume", "t"]] {
        assert_eq!(
            fails(&down, args),
            format!(
                "tributary: cannot reach the gateway at {down}: connection refused — is `tributary serve` running?\n"
            ),
            "{args:?}"
        );
    }
    // A listener that accepts connections but never answers: the request times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();
    let err = fails(&silent_addr, &["status", "--timeout-ms", "300"]);
    assert_eq!(
        err,
        format!("tributary: the gateway at {silent_addr} did not answer ApiVersions within 300 ms (--timeout-ms)\n")
    );
    drop(silent);

    let broker = KafkaBroker::start().await;
    let bs = broker.bootstrap();
    for args in [
        &["topics", "describe", "nope"][..],
        &["topics", "delete", "nope"],
        &["topics", "alter", "nope", "--partitions", "2"],
        &["produce", "nope"],
        &["consume", "nope"],
        &["groups", "reset-offsets", "g", "--topic", "nope", "--to-latest"],
    ] {
        assert_eq!(fails(&bs, args), "tributary: topic 'nope' does not exist\n", "{args:?}");
    }
    assert!(broker.store.topic("nope").is_none(), "the CLI never creates a topic by asking about it");
    let err = fails(&bs, &["groups", "describe", "nope"]);
    assert_eq!(err, "tributary: group 'nope' does not exist\n");
}

fn user(name: &str, password: &str, kafka: KafkaAcl) -> UserConfig {
    let password_hash = PasswordHash::new(password.as_bytes(), 4096).expect("hash").encode();
    UserConfig { name: name.into(), password_hash, kafka, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_auth_is_administered_as_a_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = storage_config(dir.path());
    let (store, _) = tokio::task::spawn_blocking(move || Store::open(storage)).await.expect("task").expect("store");
    let all = vec!["*".to_string()];
    let admin = KafkaAcl {
        read: all.clone(),
        write: all.clone(),
        create: all.clone(),
        delete: all.clone(),
        groups: all,
        admin: true,
    };
    let reader = KafkaAcl { read: vec!["t-PLAIN".into()], ..Default::default() };
    let users = vec![user("admin", "admin-pw", admin), user("reader", "reader-pw", reader)];
    let auth =
        Auth::new(&AuthConfig { enabled: true, failure_delay_ms: 0, users, anonymous: None }, "auth").expect("auth");
    let cfg = KafkaConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    let template = TopicTemplate { partitions: 1, config: Default::default() };
    let server = KafkaServer::bind_with(cfg, store.clone(), template, auth).await.expect("kafka listener");
    let bs = server.local_addr().expect("addr").to_string();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));

    assert_eq!(
        fails(&bs, &["status"]),
        format!(
            "tributary: the gateway at {bs} requires authentication ([auth] is on): give --user NAME and the \
             password in TRIBUTARY_PASSWORD or --password-file\n"
        )
    );
    let admin_pw = [("TRIBUTARY_PASSWORD", "admin-pw")];
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] {
        let topic = format!("t-{mechanism}");
        let args = ["topics", "create", &topic, "--partitions", "1", "--user", "admin", "--sasl-mechanism", mechanism];
        let out = run_env(&bs, &args, "", &admin_pw);
        assert!(out.status.success(), "{mechanism}: {}", text(&out.stderr));
        assert!(store.topic(&topic).is_some(), "{mechanism}");
    }
    // The user from the environment, the password from a file.
    let file = dir.path().join("password");
    std::fs::write(&file, "admin-pw\n").expect("write password file");
    let out = run_env(
        &bs,
        &["status", "--json", "--password-file", file.to_str().expect("utf-8")],
        "",
        &[("TRIBUTARY_USER", "admin")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["topics"], 3);

    let out = run_env(&bs, &["status", "--user", "admin"], "", &[("TRIBUTARY_PASSWORD", "wrong")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.starts_with(&format!("tributary: authentication to the gateway at {bs} as 'admin' failed: ")), "{err}");
    assert!(err.contains("[SaslAuthenticationFailed]"), "{err}");
    let err = fails(&bs, &["status", "--user", "admin"]);
    assert_eq!(err, "tributary: --user admin: no password (set TRIBUTARY_PASSWORD or give --password-file)\n");

    // A user's rules apply: the reader may read its topic (a record the admin wrote is printed)
    // and nothing more.
    let out = run_env(&bs, &["produce", "t-PLAIN", "--user", "admin"], "written by admin\n", &admin_pw);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reader_pw = [("TRIBUTARY_PASSWORD", "reader-pw")];
    let out =
        run_env(&bs, &["consume", "t-PLAIN", "--from-beginning", "--exit-at-end", "--user", "reader"], "", &reader_pw);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "written by admin\n", "the reader fetched and printed the record");
    let out = run_env(&bs, &["topics", "create", "x", "--partitions", "1", "--user", "reader"], "", &reader_pw);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cannot create topic 'x'") && err.contains("[TopicAuthorizationFailed]"), "{err}");
    let _ = stop.send(true);
    task.await.expect("listener task");
}
