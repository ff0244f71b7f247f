//! systemd integration: the real gateway process against a notification socket the test binds
//! (READY=1 once the listeners are bound, watchdog pings, STOPPING=1 on SIGTERM), and the unit
//! files in `systemd/` checked by `systemd-analyze verify` and `systemd-analyze security`.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};

/// Kills the gateway if the test fails before it stopped it (no orphan keeps running).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The gateway's stderr, collected by a thread so the child never blocks on a full pipe.
fn collect_stderr(child: &mut Child) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("stderr buffer").push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (out, reader)
}

/// The next notification; fails the test (with the gateway's output) if none comes in time.
fn next_message(socket: &UnixDatagram, stderr: &Mutex<String>) -> String {
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification from the gateway ({e}); its output:\n{}", stderr.lock().expect("lock")),
    }
}

/// `name=host:port` from a STATUS line such as `serving: kafka=127.0.0.1:1234 mqtt=127.0.0.1:5678`.
fn address_in(status: &str, name: &str) -> SocketAddr {
    let prefix = format!("{name}=");
    status
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {name} address in {status:?}"))
}

#[test]
fn gateway_notifies_ready_after_binding_feeds_the_watchdog_and_notifies_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notification socket");
    socket.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[storage]\ndata_dir = \"data\"\n[kafka]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\nwebsocket_listen = \"127.0.0.1:0\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tributary-under-test"))
            .args(["serve", "--config", config.to_str().expect("utf-8 path")])
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gateway"),
    );
    let (stderr, reader) = collect_stderr(&mut child.0);

    // A status line while the store opens, then READY; the listeners it names accept connections.
    assert_eq!(next_message(&socket, &stderr), "STATUS=opening the log store");
    let ready = next_message(&socket, &stderr);
    let mut lines = ready.lines();
    assert_eq!(lines.next(), Some("READY=1"), "{ready:?}");
    let status = lines.next().and_then(|l| l.strip_prefix("STATUS=")).unwrap_or_else(|| panic!("{ready:?}"));
    for name in ["kafka", "mqtt"] {
        let addr = address_in(status, name);
        TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{name} listener {addr} not accepting at READY: {e}"));
    }

    // WATCHDOG_USEC = 200 ms: a ping every 100 ms, each after a storage probe.
    for _ in 0..3 {
        assert_eq!(next_message(&socket, &stderr), "WATCHDOG=1");
    }

    let pid = Pid::from_raw(child.0.id() as i32).expect("pid");
    kill_process(pid, Signal::TERM).expect("SIGTERM");
    // Pings sent before the signal may still be queued; then STOPPING, and nothing after it.
    let stopping = loop {
        let m = next_message(&socket, &stderr);
        if m != "WATCHDOG=1" {
            break m;
        }
    };
    assert!(stopping.starts_with("STOPPING=1\nSTATUS="), "{stopping:?}");
    let status = child.0.wait().expect("wait");
    reader.join().expect("stderr reader");
    let out = stderr.lock().expect("lock").clone();
    assert!(status.success(), "gateway exit status {status:?}; output:\n{out}");
    assert!(out.contains("shutdown complete"), "{out}");
    assert!(out.contains("systemd watchdog enabled period_ms=100"), "{out}");
    socket.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 256];
    assert!(socket.recv(&mut buf).is_err(), "no notification after STOPPING (the watchdog stops first)");
}

/// Set (to anything) to let the unit-file check pass on a machine without `systemd-analyze`;
/// without it, a missing `systemd-analyze` fails the test.
const SKIP_SYSTEMD_ANALYZE: &str = "TRIBUTARY_SKIP_SYSTEMD_ANALYZE";

/// `systemd-analyze`, if installed (`.ci/run` installs the `systemd` package).
fn systemd_analyze() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("systemd-analyze")).find(|p| p.is_file()));
    found.flatten()
}

/// A root for `systemd-analyze --root`: the host's stock units (for the targets our units name)
/// and executable stand-ins for the programs in `ExecStart=`, so verify checks our unit files and
/// not what is installed on this machine.
fn unit_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).expect("units dir");
    let stock = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(Path::new)
        .find(|p| p.join("multi-user.target").exists())
        .expect("systemd's stock units are installed with systemd-analyze");
    for entry in std::fs::read_dir(stock).expect("read stock units") {
        let entry = entry.expect("dir entry");
        // Plain unit files only (symlinks and .wants directories are not needed to load ours).
        if entry.file_type().expect("file type").is_file() {
            std::fs::copy(entry.path(), units.join(entry.file_name())).expect("copy stock unit");
        }
    }
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    for program in ["tributary", "tributary-cloud"] {
        let p = bin.join(program);
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").expect("stand-in");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::create_dir_all(root.path().join("etc/systemd/system")).expect("etc units dir");
    root
}

/// Runs `systemd-analyze ARGS --root=ROOT /ROOT/etc/systemd/system/NAME` on `text` installed as
/// `NAME`; returns (exit success, stdout + stderr).
fn analyze(analyze: &Path, root: &Path, name: &str, text: &str, args: &[&str]) -> (bool, String) {
    let path = root.join("etc/systemd/system").join(name);
    std::fs::write(&path, text).expect("write unit");
    let out = Command::new(analyze)
        .args(args)
        .arg(format!("--root={}", root.display()))
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn shipped_unit(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd").join(name)).expect("read unit")
}

#[test]
fn units_pass_systemd_analyze_verify_and_a_broken_unit_does_not() {
    let Some(tool) = systemd_analyze() else {
        // A check that did not run must not pass as if it had: only an explicit opt-out skips it.
        assert!(
            std::env::var_os(SKIP_SYSTEMD_ANALYZE).is_some(),
            "systemd-analyze is not installed (apt-get install systemd); set {SKIP_SYSTEMD_ANALYZE}=1 to skip this check"
        );
        eprintln!("skipped ({SKIP_SYSTEMD_ANALYZE} is set): systemd-analyze is not installed");
        return;
    };
    let root = unit_root();
    for name in ["tributary.service", "tributary-cloud.service"] {
        // verify exits 0 on unknown keys and bad values (it only warns), so any output fails.
        let (ok, out) = analyze(&tool, root.path(), name, &shipped_unit(name), &["verify"]);
        assert!(ok && out.trim().is_empty(), "{name}: systemd-analyze verify:\n{out}");
        // Hardening must not regress: exposure at most 2.5 (systemd counts tenths: 25).
        let (ok, out) =
            analyze(&tool, root.path(), name, &shipped_unit(name), &["security", "--offline=yes", "--threshold=25"]);
        let overall = out.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_default();
        assert!(ok, "{name}: {overall}\n{out}");
    }

    // The same check catches a misspelt value, an unknown key and a missing program.
    let unit = shipped_unit("tributary.service");
    let broken = [
        (unit.replace("Type=notify", "Type=notfy"), "service type"),
        (unit.replace("WatchdogSec=30", "WatchdogSecs=30"), "WatchdogSecs"),
        (unit.replace("/usr/bin/tributary ", "/usr/bin/tributaryd "), "tributaryd"),
    ];
    for (text, expected) in broken {
        assert_ne!(text, unit, "the unit changed: update this test's broken variants");
        let (ok, out) = analyze(&tool, root.path(), "broken.service", &text, &["verify"]);
        assert!(!ok || !out.trim().is_empty(), "a broken unit passed verify ({expected})");
        assert!(out.contains(expected), "verify output does not name {expected:?}:\n{out}");
    }
}
