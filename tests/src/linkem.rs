//! `linkem`, the project's link emulator (a userspace netem): a network namespace (the site)
//! joined to the root namespace (the centre) only through two TUN devices whose IP packets this
//! emulator forwards with a rate limit (the bottleneck, one per direction), a one-way delay, random
//! loss per packet (seeded) and a bounded tail-drop queue. Every protocol crossing it (the mirror's
//! QUIC, MirrorMaker 2's TCP) sees the same loss, and the kernel's TCP does its own congestion
//! response. Owns: the per-direction shaping state machine ([`Shaper`], no I/O, fed with `now`),
//! the namespace and TUN set-up and its forwarding threads ([`serve`], run by the `linkem` binary
//! as root), the client's handle on that child process ([`LinkChild`]: ready, counters, clean-up)
//! and [`in_netns`] to create a socket inside the site namespace.
//!
//! Addresses: the centre is `{net}.1` on TUN `{name}c` in the root namespace, the site is `{net}.2`
//! on TUN `{name}s` in namespace `{name}`; each reaches the other only through the emulator.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What one direction of the link does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Direction {
    /// The bottleneck's rate in bits per second (IP packets, headers included), > 0.
    pub bits_per_s: u64,
    /// One-way propagation delay added after the bottleneck.
    pub delay: Duration,
    /// Probability that a packet is lost (before the queue, as netem drops), 0..1.
    pub loss: f64,
    /// The bottleneck's queue: a packet that would find more bytes than this waiting is dropped
    /// (tail drop).
    pub queue_bytes_max: u64,
    /// Seed of the loss pattern.
    pub seed: u64,
}

impl Direction {
    /// `bits_per_s`, half of `rtt`, `loss`, and a queue of `queue` at that rate.
    pub fn wan(bits_per_s: u64, rtt: Duration, loss: f64, queue: Duration, seed: u64) -> Self {
        let queue_bytes_max = (bits_per_s as f64 / 8.0 * queue.as_secs_f64()) as u64;
        Self { bits_per_s, delay: rtt / 2, loss, queue_bytes_max, seed }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.bits_per_s == 0 {
            bail!("bits_per_s must be > 0");
        }
        if !(0.0..1.0).contains(&self.loss) {
            bail!("loss must be in 0..1, not {}", self.loss);
        }
        if self.queue_bytes_max < 1500 {
            bail!("queue_bytes_max must hold a packet (>= 1500), not {}", self.queue_bytes_max);
        }
        Ok(())
    }
}

/// What became of one packet offered to a [`Shaper`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered to the other side at this time.
    Deliver(Instant),
    /// Lost at random.
    Lost,
    /// Dropped at the tail of the full queue.
    QueueFull,
}

/// One direction's bottleneck: loss, a FIFO served at the rate, then the delay. No I/O; `now`
/// is given, so it is tested without a clock.
#[derive(Debug)]
pub struct Shaper {
    spec: Direction,
    rng: StdRng,
    /// When the bottleneck has sent everything accepted so far.
    free_at: Option<Instant>,
}

impl Shaper {
    pub fn new(spec: Direction) -> Self {
        Self { spec, rng: StdRng::seed_from_u64(spec.seed), free_at: None }
    }

    fn serialisation(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.spec.bits_per_s as f64)
    }

    /// A packet of `len` bytes arrives at `now`. Deliveries come out in arrival order, at
    /// non-decreasing times.
    pub fn offer(&mut self, now: Instant, len: usize) -> Verdict {
        if self.spec.loss > 0.0 && self.rng.random::<f64>() < self.spec.loss {
            return Verdict::Lost;
        }
        let start = self.free_at.map_or(now, |f| f.max(now));
        let waiting = (start - now).as_secs_f64() * self.spec.bits_per_s as f64 / 8.0;
        if waiting + len as f64 > self.spec.queue_bytes_max as f64 {
            return Verdict::QueueFull;
        }
        let done = start + self.serialisation(len as u64);
        self.free_at = Some(done);
        Verdict::Deliver(done + self.spec.delay)
    }
}

/// One direction's counters (IP packets and their bytes, headers included).
#[derive(Debug, Default)]
pub struct Counters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub lost: AtomicU64,
    pub queue_full: AtomicU64,
    pub delivered_packets: AtomicU64,
    pub delivered_bytes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Packets and bytes that entered the link (what the sender put on the wire).
    pub packets: u64,
    pub bytes: u64,
    pub lost: u64,
    pub queue_full: u64,
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
}

impl DirStats {
    fn fields(&self) -> [u64; 6] {
        [self.packets, self.bytes, self.lost, self.queue_full, self.delivered_packets, self.delivered_bytes]
    }

    /// The counts since `before`.
    pub fn since(&self, before: &DirStats) -> DirStats {
        let (a, b) = (self.fields(), before.fields());
        let d: Vec<u64> = a.iter().zip(b).map(|(a, b)| a.saturating_sub(b)).collect();
        DirStats {
            packets: d[0],
            bytes: d[1],
            lost: d[2],
            queue_full: d[3],
            delivered_packets: d[4],
            delivered_bytes: d[5],
        }
    }
}

impl Counters {
    fn snapshot(&self) -> DirStats {
        DirStats {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            queue_full: self.queue_full.load(Ordering::Relaxed),
            delivered_packets: self.delivered_packets.load(Ordering::Relaxed),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Both directions' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub to_centre: DirStats,
    pub to_site: DirStats,
}

impl LinkStats {
    fn line(&self) -> String {
        let f: Vec<String> =
            self.to_centre.fields().iter().chain(self.to_site.fields().iter()).map(u64::to_string).collect();
        format!("stats {}", f.join(" "))
    }

    fn parse(line: &str) -> anyhow::Result<Self> {
        let rest = line.trim().strip_prefix("stats ").with_context(|| format!("linkem said {line:?}"))?;
        let n: Vec<u64> = rest.split(' ').map(str::parse).collect::<Result<_, _>>().context("linkem stats")?;
        if n.len() != 12 {
            bail!("linkem stats: {line:?}");
        }
        let dir = |o: usize| DirStats {
            packets: n[o],
            bytes: n[o + 1],
            lost: n[o + 2],
            queue_full: n[o + 3],
            delivered_packets: n[o + 4],
            delivered_bytes: n[o + 5],
        };
        Ok(Self { to_centre: dir(0), to_site: dir(6) })
    }

    /// The counts since `before`.
    pub fn since(&self, before: &LinkStats) -> LinkStats {
        LinkStats { to_centre: self.to_centre.since(&before.to_centre), to_site: self.to_site.since(&before.to_site) }
    }
}

/// The emulated link's layout.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The site's namespace; the TUN devices are `{name}c` (centre) and `{name}s` (site).
    pub name: String,
    /// The first three octets of the link's /30-like pair: centre `.1`, site `.2`.
    pub net: [u8; 3],
}

impl Layout {
    pub fn new(name: &str, net: [u8; 3]) -> anyhow::Result<Self> {
        // IFNAMSIZ is 16 with the NUL; a letter is appended.
        if name.is_empty() || name.len() > 14 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("link name {name:?}: 1 to 14 ASCII letters, digits or '-'");
        }
        Ok(Self { name: name.into(), net })
    }

    pub fn centre(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 1)
    }

    pub fn site(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 2)
    }

    fn centre_dev(&self) -> String {
        format!("{}c", self.name)
    }

    fn site_dev(&self) -> String {
        format!("{}s", self.name)
    }
}

/// Runs `f` on a thread that first moved into network namespace `name` (made by `ip netns add`):
/// sockets it creates live there for good, whichever thread uses them later, and threads it
/// starts (a tokio runtime's workers) are in that namespace too.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = Path::new("/var/run/netns").join(name);
    let ns = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    std::thread::spawn(move || {
        rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
            .context("setns into the site's network namespace")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("in_netns: the thread panicked"))?
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Deletes namespace `name` if it exists (left by a killed run: its TUN devices went with the
/// emulator's process, the namespace did not).
pub fn remove_netns(name: &str) -> anyhow::Result<()> {
    if Path::new("/var/run/netns").join(name).exists() {
        ip(&["netns", "delete", name])?;
    }
    Ok(())
}

/// A TUN device (IP packets, no packet information header), gone when the file closes.
#[allow(unsafe_code)]
fn open_tun(dev: &str) -> anyhow::Result<File> {
    // <linux/if_tun.h>: _IOW('T', 202, int).
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").context("open /dev/net/tun")?;
    let mut req =
        IfReq { name: [0; libc::IFNAMSIZ], flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short, pad: [0; 22] };
    assert!(dev.len() < libc::IFNAMSIZ, "checked by Layout::new");
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (name, flags, padding to its 40 bytes),
    // which `IfReq` is, alive and exclusively borrowed for the call; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {dev}"));
    }
    Ok(file)
}

/// Forwards packets read from `from` to `to` through a [`Shaper`]: a reader thread and a
/// writer thread that releases each packet at its delivery time. The channel between them
/// holds at most what the shaper accepted and has not delivered: the queue
/// (`queue_bytes_max`) plus the delay's worth at the rate.
fn forward(mut from: File, mut to: File, spec: Direction, counters: Arc<Counters>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let c = counters.clone();
    std::thread::spawn(move || {
        let mut shaper = Shaper::new(spec);
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = match from.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            c.packets.fetch_add(1, Ordering::Relaxed);
            c.bytes.fetch_add(n as u64, Ordering::Relaxed);
            match shaper.offer(Instant::now(), n) {
                Verdict::Deliver(at) => {
                    if tx.send((at, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Verdict::Lost => {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                }
                Verdict::QueueFull => {
                    c.queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((at, packet)) = rx.recv() {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            // A packet the kernel refuses (the device going down) is lost like on a wire.
            if to.write(&packet).is_ok() {
                counters.delivered_packets.fetch_add(1, Ordering::Relaxed);
                counters.delivered_bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
        }
    });
}

/// The `linkem` process: sets the link up (removing a namespace a killed run left), prints
/// `ready`, then answers each line on stdin with a `stats ...` line; at the end of stdin (the
/// client gone, killed or not) it deletes the namespace and returns. Needs root.
pub fn serve(layout: &Layout, to_centre: Direction, to_site: Direction) -> anyhow::Result<()> {
    to_centre.validate().context("to the centre")?;
    to_site.validate().context("to the site")?;
    remove_netns(&layout.name)?;
    ip(&["netns", "add", &layout.name])?;
    let result = serve_in(layout, to_centre, to_site);
    let removed = remove_netns(&layout.name);
    result.and(removed)
}

fn serve_in(layout: &Layout, to_centre: Direction, to_site: Direction) -> anyhow::Result<()> {
    let (centre, site) = (layout.centre().to_string(), layout.site().to_string());
    let (cdev, sdev) = (layout.centre_dev(), layout.site_dev());
    let centre_tun = open_tun(&cdev)?;
    let sdev2 = sdev.clone();
    let site_tun = in_netns(&layout.name, move || open_tun(&sdev2))?;
    // No IPv6 on the link: its router solicitations would be the only other traffic.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{cdev}/disable_ipv6"), "1");
    ip(&["addr", "add", &centre, "peer", &site, "dev", &cdev])?;
    ip(&["link", "set", &cdev, "up"])?;
    let n = layout.name.as_str();
    let dev6 = format!("net.ipv6.conf.{sdev}.disable_ipv6=1");
    let _ = Command::new("ip").args(["netns", "exec", n, "sysctl", "-qw", &dev6]).output();
    ip(&["-n", n, "addr", "add", &site, "peer", &centre, "dev", &sdev])?;
    ip(&["-n", n, "link", "set", &sdev, "up"])?;
    ip(&["-n", n, "link", "set", "lo", "up"])?;
    let (up, down) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
    forward(site_tun.try_clone()?, centre_tun.try_clone()?, to_centre, up.clone());
    forward(centre_tun, site_tun, to_site, down.clone());
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {centre} {site}")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        line?;
        let stats = LinkStats { to_centre: up.snapshot(), to_site: down.snapshot() };
        writeln!(out, "{}", stats.line())?;
        out.flush()?;
    }
    Ok(())
}

/// A running `linkem` child process.
#[derive(Debug)]
pub struct LinkChild {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub layout: Layout,
}

impl LinkChild {
    /// Starts `binary` (the `linkem` build) for `layout`, the same spec each way (seeds differ),
    /// and waits until the link is up.
    pub fn start(binary: &Path, layout: &Layout, spec: Direction) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(["--name", &layout.name])
            .arg("--net")
            .arg(format!("{}.{}.{}", layout.net[0], layout.net[1], layout.net[2]))
            .arg("--bits-per-s")
            .arg(spec.bits_per_s.to_string())
            .arg("--delay-us")
            .arg(spec.delay.as_micros().to_string())
            .arg("--loss")
            .arg(spec.loss.to_string())
            .arg("--queue-bytes-max")
            .arg(spec.queue_bytes_max.to_string())
            .arg("--seed")
            .arg(spec.seed.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let stdin = child.stdin.take().context("linkem stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("linkem stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.starts_with("ready ") {
            let status = child.wait()?;
            bail!("linkem did not start ({status}); it said {line:?}");
        }
        Ok(Self { child, stdin, stdout, layout: layout.clone() })
    }

    /// The counters so far.
    pub fn stats(&mut self) -> anyhow::Result<LinkStats> {
        self.stdin.write_all(b"\n")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        LinkStats::parse(&line)
    }

    /// Ends the emulator (it removes the namespace) and waits for it.
    pub fn stop(self) -> anyhow::Result<()> {
        let Self { mut child, stdin, .. } = self;
        drop(stdin);
        let status = child.wait()?;
        if !status.success() {
            bail!("linkem exited with {status}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(loss: f64) -> Direction {
        Direction::wan(10_000_000, Duration::from_millis(100), loss, Duration::from_millis(100), 7)
    }

    #[test]
    fn the_bottleneck_serves_at_its_rate_then_adds_the_delay() {
        let mut s = Shaper::new(spec(0.0));
        let t0 = Instant::now();
        // 1250-byte packets at 10 Mbit/s: 1 ms each.
        let times: Vec<Instant> = (0..50)
            .map(|_| match s.offer(t0, 1250) {
                Verdict::Deliver(at) => at,
                v => panic!("{v:?}"),
            })
            .collect();
        assert_eq!(times[0] - t0, Duration::from_millis(51));
        let last = times[49] - t0;
        assert!(last > Duration::from_micros(99_990) && last < Duration::from_micros(100_010), "{last:?}");
        // Idle since: the next one waits for no one.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(s.offer(later, 1250), Verdict::Deliver(later + Duration::from_millis(51)));
    }

    #[test]
    fn a_full_queue_drops_the_tail_and_takes_packets_again_as_it_drains() {
        let mut s = Shaper::new(spec(0.0));
        let t0 = Instant::now();
        // 100 ms at 10 Mbit/s = 125,000 bytes: 100 packets of 1250.
        let accepted = (0..150).filter(|_| matches!(s.offer(t0, 1250), Verdict::Deliver(_))).count();
        assert_eq!(accepted, 100);
        assert_eq!(s.offer(t0, 1250), Verdict::QueueFull);
        assert!(matches!(s.offer(t0 + Duration::from_millis(2), 1250), Verdict::Deliver(_)));
    }

    #[test]
    fn loss_is_the_set_fraction_and_the_seed_repeats_it() {
        let pattern = |seed| {
            let mut d = spec(0.01);
            d.seed = seed;
            let mut s = Shaper::new(d);
            let t0 = Instant::now();
            (0..100_000u32)
                .map(|i| s.offer(t0 + Duration::from_millis(u64::from(i)), 100) == Verdict::Lost)
                .collect::<Vec<bool>>()
        };
        let a = pattern(1);
        let lost = a.iter().filter(|l| **l).count();
        assert!((900..1100).contains(&lost), "{lost} of 100000");
        assert_eq!(a, pattern(1));
        assert_ne!(a, pattern(2));
    }

    #[test]
    fn stats_cross_the_pipe_intact() {
        let s = LinkStats {
            to_centre: DirStats {
                packets: 1,
                bytes: 2,
                lost: 3,
                queue_full: 4,
                delivered_packets: 5,
                delivered_bytes: 6,
            },
            to_site: DirStats {
                packets: 7,
                bytes: 8,
                lost: 9,
                queue_full: 10,
                delivered_packets: 11,
                delivered_bytes: 12,
            },
        };
        assert_eq!(LinkStats::parse(&s.line()).ok(), Some(s));
        assert_eq!(s.since(&s), LinkStats::default());
    }
}
