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
