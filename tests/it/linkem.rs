//! The link emulator (`linkem`, a userspace netem over TUN between a network namespace and the
//! root one) measured from outside, like iperf and ping would: the rate, round trip and loss it
//! was set to, and its clean-up after a killed run. Needs root (network namespaces, TUN).

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use tributary_tests::linkem::{in_netns, Direction, Layout, LinkChild};

const RATE: u64 = 10_000_000;
const RTT: Duration = Duration::from_millis(100);
/// IPv4 + UDP headers: the emulator shapes IP packets.
const HEADERS: usize = 28;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Binds a UDP socket in the site's namespace.
fn site_socket(layout: &Layout) -> anyhow::Result<UdpSocket> {
    let addr = SocketAddr::from((layout.site(), 0));
    in_netns(&layout.name, move || Ok(UdpSocket::bind(addr)?))
}

#[test]
fn the_emulated_link_has_the_rate_round_trip_and_loss_it_was_set_to_each_way() -> anyhow::Result<()> {
    if !is_root() {
        eprintln!("the_emulated_link...: skipped, it needs root (network namespaces and TUN)");
        return Ok(());
    }
    let pid = std::process::id();
    let layout = Layout::new(&format!("lkit{}", pid % 100_000), [10, 79, (pid % 250) as u8])?;
    let binary = Path::new(env!("CARGO_BIN_EXE_linkem"));
    let spec = Direction::wan(RATE, RTT, 0.01, Duration::from_millis(100), 42);
    let ns = Path::new("/var/run/netns").join(&layout.name);

    // A run killed without its clean-up leaves its namespace; the next one starts anyway.
    let mut killed = std::process::Command::new(binary)
        .args(["--name", &layout.name, "--net", &format!("10.79.{}", pid % 250)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(killed.stdout.take().expect("piped")), &mut ready)?;
    assert!(ready.starts_with("ready"), "{ready:?}");
    killed.kill()?;
    killed.wait()?;
    assert!(ns.exists(), "a SIGKILLed emulator cannot remove its namespace");

    let mut link = LinkChild::start(binary, &layout, spec)?;
    let centre = UdpSocket::bind(SocketAddr::from((layout.centre(), 0)))?;
    let site = site_socket(&layout)?;
    let (centre_addr, site_addr) = (centre.local_addr()?, site.local_addr()?);

    // Round trip: 60 small probes from the centre, echoed at the site.
    let echo = site.try_clone()?;
    echo.set_read_timeout(Some(Duration::from_secs(2)))?;
    let echoer = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            if buf[..n] == *b"end" || echo.send_to(&buf[..n], from).is_err() {
                break;
            }
        }
    });
    centre.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut rtts = Vec::new();
    for i in 0u32..60 {
        let sent = Instant::now();
        centre.send_to(&i.to_be_bytes(), site_addr)?;
        let mut buf = [0u8; 64];
        // A probe lost either way times out; a late echo of an earlier one is skipped.
        while let Ok((n, _)) = centre.recv_from(&mut buf) {
            if buf[..n] == i.to_be_bytes() {
                rtts.push(sent.elapsed());
                break;
            }
        }
    }
    centre.send_to(b"end", site_addr)?;
    echoer.join().expect("echo thread");
    rtts.sort();
    let median = rtts[rtts.len() / 2];
    assert!(rtts[0] >= RTT, "fastest round trip {:?} < {RTT:?}", rtts[0]);
    assert!(median < RTT + Duration::from_millis(15), "median round trip {median:?} (set: {RTT:?})");
    assert!(rtts.len() >= 55, "{} of 60 probes answered at 1% loss each way", rtts.len());
    eprintln!("round trip: min {:?}, median {median:?} over {} probes", rtts[0], rtts.len());

    // Loss: 10,000 small datagrams to the site, paced under the rate (no queue drops).
    let before = link.stats()?;
    let counter = site.try_clone()?;
    counter.set_read_timeout(Some(Duration::from_secs(1)))?;
    let counting = std::thread::spawn(move || {
        let (mut n, mut buf) = (0u32, [0u8; 128]);
        while let Ok((len, _)) = counter.recv_from(&mut buf) {
            if buf[..len] == *b"end" {
                break;
            }
            n += 1;
        }
        n
    });
    let sent = 10_000u32;
    for i in 0..sent {
        centre.send_to(&[7u8; 100], site_addr)?;
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // The end marker may be lost too: resend until counted.
    let mut received = None;
    for _ in 0..20 {
        centre.send_to(b"end", site_addr)?;
        std::thread::sleep(Duration::from_millis(150));
        if counting.is_finished() {
            received = Some(counting.join().expect("counting thread"));
            break;
        }
    }
    let received = received.expect("the end marker crossed");
    let d = link.stats()?.since(&before).to_site;
    assert_eq!(d.queue_full, 0, "paced under the rate: {d:?}");
    let loss = 1.0 - f64::from(received) / f64::from(sent);
    eprintln!("loss: {received} of {sent} received ({loss:.4}), {d:?}");
    assert!((0.006..0.014).contains(&loss), "loss {loss:.4} (set: 0.01), {d:?}");

    // Rate: 1400-byte datagrams from the site at twice the rate for 3 s; the centre counts what
    // arrives (IP bytes) between the first and the last.
    let receiver = centre.try_clone()?;
    let receiving = std::thread::spawn(move || {
        let (mut bytes, mut first, mut last, mut buf) = (0usize, None, None, vec![0u8; 2048]);
        while let Ok((len, _)) = receiver.recv_from(&mut buf) {
            if buf[..len] == *b"end" {
                break;
            }
            let now = Instant::now();
            if first.is_none() {
                first = Some(now);
            } else {
                bytes += len + HEADERS;
            }
            last = Some(now);
        }
        (bytes, first, last)
    });
    let before = link.stats()?;
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        // 2 x 10 Mbit/s of 1428-byte packets: one every 571 us, sent in bursts of 10.
        site.send_to(&[9u8; 1400], centre_addr)?;
        i += 1;
        if i % 10 == 0 {
            let due = start + Duration::from_micros(i * 571);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..20 {
        site.send_to(b"end", centre_addr)?;
        std::thread::sleep(Duration::from_millis(150));
        if receiving.is_finished() {
            break;
        }
    }
    let (bytes, first, last) = receiving.join().expect("receiving thread");
    let secs = last.zip(first).map(|(l, f)| (l - f).as_secs_f64()).unwrap_or(0.0);
    let rate = bytes as f64 * 8.0 / secs;
    let d = link.stats()?.since(&before).to_centre;
    eprintln!("rate: {rate:.0} bit/s over {secs:.2} s, {d:?}");
    assert!(d.queue_full > 0, "offered twice the rate, the queue overflowed: {d:?}");
    assert!((rate / RATE as f64 - 1.0).abs() < 0.03, "measured {rate:.0} bit/s over {secs:.2} s (set: {RATE}), {d:?}");

    link.stop()?;
    assert!(!ns.exists(), "the emulator removes its namespace when it ends");
    Ok(())
}
