//! systemd integration without libsystemd: `sd_notify` messages (READY, STATUS, STOPPING,
//! WATCHDOG) sent as datagrams to `$NOTIFY_SOCKET`, and a watchdog that is fed only while the
//! storage writer proves it is making progress (a real write through it, `Store::probe`). A
//! writer that answers but cannot write (a full disk, a disk error it is recovering from) still
//! feeds the watchdog: a restart would come back to the same disk and stop reads meanwhile; the
//! fault is shown in the STATUS line instead.
//!
//! The protocol is the one `sd_notify(3)` documents: one datagram of newline-separated
//! `KEY=VALUE` assignments to the Unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract
//! socket when it starts with `@`). systemd identifies the sender by its pid (`NotifyAccess=main`).

use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tributary_broker::Store;

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier named by `$NOTIFY_SOCKET`, or `None` when it is unset (not started by systemd
    /// as a `Type=notify` service).
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(name) if !name.is_empty() => Notifier::new(&name).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the socket `name`: an absolute path, or `@name` for an abstract socket.
    pub fn new(name: &OsStr) -> io::Result<Notifier> {
        let addr = socket_addr(name)?;
        let socket = UnixDatagram::unbound()?;
        // A datagram to a full socket queue would block; never hold up the runtime for long.
        socket.set_write_timeout(Some(Duration::from_secs(1)))?;
        Ok(Notifier { socket, addr })
    }

    /// Sends one message made of `assignments` (see [`message`]).
    pub fn notify(&self, assignments: &[(&str, &str)]) -> io::Result<()> {
        let msg = message(assignments);
        let sent = self.socket.send_to_addr(msg.as_bytes(), &self.addr)?;
        if sent != msg.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "notification datagram truncated"));
        }
        Ok(())
    }

    /// Sends `assignments`, logging (not returning) a failure: notifications are advisory, and a
    /// service manager that misses READY times the start out on its own.
    pub fn notify_or_warn(&self, assignments: &[(&str, &str)]) {
        if let Err(e) = self.notify(assignments) {
            tracing::warn!(error = %e, message = %message(assignments).replace('\n', " "), "systemd notification failed");
        }
    }
}

fn socket_addr(name: &OsStr) -> io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    match name.as_bytes() {
        [b'@', abstract_name @ ..] => abstract_addr(abstract_name),
        [b'/', ..] => SocketAddr::from_pathname(name),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET must be an absolute path or start with '@' (got {name:?})"),
        )),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract NOTIFY_SOCKET names exist only on Linux"))
}

/// The datagram for `assignments`: `KEY=VALUE` lines joined by newlines. A newline inside a value
/// would start a new assignment, so it becomes a space.
pub fn message(assignments: &[(&str, &str)]) -> String {
    let lines: Vec<String> = assignments.iter().map(|(k, v)| format!("{k}={}", v.replace('\n', " "))).collect();
    lines.join("\n")
}

/// How often to feed the watchdog: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)` advises.
/// `None` when the watchdog is off: `usec` unset, zero or unreadable, or `pid` set and naming
/// another process (the variables were meant for someone else).
pub fn watchdog_period(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// The gateway's service-manager session: the notifier (if started by systemd) and the watchdog
/// period (if systemd asked for one).
#[derive(Debug, Default)]
pub struct Service {
    notifier: Option<Arc<Notifier>>,
    watchdog: Option<Duration>,
}

impl Service {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Problems are logged: the
    /// gateway runs the same without a service manager.
    pub fn from_env() -> Service {
        let notifier = match Notifier::from_env() {
            Ok(n) => n.map(Arc::new),
            Err(e) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET is unusable: no systemd notifications");
                None
            }
        };
        let var = |name: &str| std::env::var(name).ok();
        let watchdog =
            watchdog_period(var("WATCHDOG_USEC").as_deref(), var("WATCHDOG_PID").as_deref(), std::process::id());
        if watchdog.is_some() && notifier.is_none() {
            tracing::warn!("WATCHDOG_USEC is set without NOTIFY_SOCKET: the watchdog cannot be fed");
        }
        Service { notifier, watchdog }
    }

    /// Updates the status line `systemctl status` shows.
    pub fn status(&self, status: &str) {
        if let Some(n) = &self.notifier {
            n.notify_or_warn(&[("STATUS", status)]);
        }
    }

    /// Tells systemd the gateway is serving (store open, listeners bound), with a status line.
    pub fn ready(&self, status: &str) {
        if let Some(n) = &self.notifier {
            n.notify_or_warn(&[("READY", "1"), ("STATUS", status)]);
        }
    }

    /// Tells systemd the gateway is shutting down.
    pub fn stopping(&self, status: &str) {
        if let Some(n) = &self.notifier {
            n.notify_or_warn(&[("STOPPING", "1"), ("STATUS", status)]);
        }
    }

    /// Starts feeding the watchdog (if systemd asked for one): a ping every period, each only
    /// after the storage writer answered a [`Store::probe`] within that period. `serving` is the
    /// status line shown while writes work (READY's).
    pub fn spawn_watchdog(&self, store: Store, serving: String) -> Option<JoinHandle<()>> {
        let (notifier, period) = (self.notifier.clone()?, self.watchdog?);
        tracing::info!(period_ms = period.as_millis() as u64, "systemd watchdog enabled");
        Some(tokio::spawn(async move {
            feed_watchdog(&notifier, period, &serving, move || {
                let store = store.clone();
                async move { store.probe().await.map(|fault| fault.map(|e| e.to_string())) }
            })
            .await
        }))
    }
}

/// The STATUS line while the storage writer answers but cannot write.
pub fn fault_status(serving: &str, fault: &str) -> String {
    format!("{serving}; WRITES FAILING: {fault}")
}

/// Every `period`: runs `probe` and sends `WATCHDOG=1` only if it answered within `period`.
/// A stuck writer thus stops the pings and systemd restarts the gateway after `WATCHDOG_USEC`.
/// An answer naming a write fault (`Ok(Some(..))`) is fed too, and the STATUS line shows the
/// fault (see [`fault_status`]) until a probe writes again, when it is `serving` again.
/// Runs until the task is aborted.
pub async fn feed_watchdog<F, Fut, E>(notifier: &Notifier, period: Duration, serving: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<String>, E>>,
    E: std::fmt::Display,
{
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The fault the STATUS line shows now.
    let mut shown: Option<String> = None;
    loop {
        ticks.tick().await;
        match tokio::time::timeout(period, probe()).await {
            Ok(Ok(fault)) if fault == shown => notifier.notify_or_warn(&[("WATCHDOG", "1")]),
            Ok(Ok(fault)) => {
                let status = match &fault {
                    Some(f) => {
                        tracing::warn!(fault = %f, "storage writes fail: shown in the service status");
                        fault_status(serving, f)
                    }
                    None => serving.to_string(),
                };
                notifier.notify_or_warn(&[("WATCHDOG", "1"), ("STATUS", &status)]);
                shown = fault;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "storage liveness probe failed: watchdog not fed"),
            Err(_) => tracing::warn!(
                timeout_ms = period.as_millis() as u64,
                "storage writer did not answer the liveness probe in time: watchdog not fed"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a datagram before the read timeout");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_reach_a_path_socket_in_sd_notify_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        server.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let n = Notifier::new(path.as_os_str()).expect("notifier");
        n.notify(&[("READY", "1"), ("STATUS", "serving\nkafka 127.0.0.1:9092")]).expect("send");
        assert_eq!(recv(&server), "READY=1\nSTATUS=serving kafka 127.0.0.1:9092");
        n.notify(&[("WATCHDOG", "1")]).expect("send");
        assert_eq!(recv(&server), "WATCHDOG=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_names_start_with_at() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tributary-test-{}-{:?}", std::process::id(), std::time::Instant::now());
        let server = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).expect("addr"))
            .expect("bind abstract");
        server.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let n = Notifier::new(OsStr::new(&format!("@{name}"))).expect("notifier");
        n.notify(&[("STOPPING", "1")]).expect("send");
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn relative_or_empty_socket_names_are_refused() {
        for bad in ["notify.sock", ""] {
            let e = Notifier::new(OsStr::new(bad)).expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {e}");
        }
    }

    #[test]
    fn watchdog_period_is_half_of_watchdog_usec_for_our_pid_only() {
        assert_eq!(watchdog_period(Some("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_period(Some("200000"), Some("7"), 7), Some(Duration::from_millis(100)));
        assert_eq!(watchdog_period(Some("200000"), Some("8"), 7), None, "meant for another process");
        assert_eq!(watchdog_period(Some("0"), None, 7), None);
        assert_eq!(watchdog_period(Some("soon"), None, 7), None);
        assert_eq!(watchdog_period(None, Some("7"), 7), None);
    }

    /// A notification socket and `feed_watchdog` (period 15 s, status `serving`) on it, with a
    /// probe made by `probe(call number)`; returns the socket, the feeder and the call count.
    fn feeder<Fut>(
        serving: &'static str,
        probe: impl Fn(usize) -> Fut + Send + 'static,
    ) -> (tempfile::TempDir, tokio::net::UnixDatagram, JoinHandle<()>, Arc<AtomicUsize>)
    where
        Fut: Future<Output = Result<Option<String>, io::Error>> + Send + 'static,
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = tokio::net::UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::new(path.as_os_str()).expect("notifier");
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let feeder = tokio::spawn(async move {
            feed_watchdog(&n, Duration::from_secs(15), serving, move || probe(counted.fetch_add(1, Ordering::SeqCst)))
                .await
        });
        (dir, server, feeder, calls)
    }

    /// A probe that never answers costs its ping; the next one that answers is followed by a ping.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_probe_is_not_followed_by_a_ping() {
        let (_dir, server, feeder, calls) = feeder("serving", |call| async move {
            if call < 2 {
                std::future::pending::<()>().await;
            }
            Ok(None)
        });
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).await.expect("recv");
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        assert_eq!(calls.load(Ordering::SeqCst), 3, "the first ping follows the first probe that answered");
        feeder.abort();
    }

    /// A writer that answers with a write fault (a full disk) keeps the watchdog fed: the fault
    /// goes to the STATUS line once, and the status returns to serving when writes work again.
    #[tokio::test(start_paused = true)]
    async fn a_write_fault_feeds_the_watchdog_and_shows_in_the_status() {
        let (_dir, server, feeder, _) = feeder("serving: kafka=k", |call| {
            let fault = (1..=2).contains(&call).then(|| "disk full".to_string());
            async move { Ok(fault) }
        });
        let mut buf = [0u8; 256];
        let mut next = async || {
            let len = server.recv(&mut buf).await.expect("recv");
            String::from_utf8_lossy(&buf[..len]).into_owned()
        };
        assert_eq!(next().await, "WATCHDOG=1");
        assert_eq!(next().await, "WATCHDOG=1\nSTATUS=serving: kafka=k; WRITES FAILING: disk full");
        assert_eq!(next().await, "WATCHDOG=1", "the same fault is not repeated");
        assert_eq!(next().await, "WATCHDOG=1\nSTATUS=serving: kafka=k");
        assert_eq!(next().await, "WATCHDOG=1");
        feeder.abort();
    }
}
