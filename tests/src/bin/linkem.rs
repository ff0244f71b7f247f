//! `linkem`: the link emulator as a process (see `tributary_tests::linkem`). Needs root. Sets up
//! namespace `--name` (the site, `{net}.2`) joined to the root namespace (the centre, `{net}.1`)
//! through the emulated link, prints `ready CENTRE SITE`, answers each line on stdin with its
//! counters, and removes the namespace when stdin ends.
//!
//! `linkem --name wan --net 10.77.0 --bits-per-s 10000000 --delay-us 50000 --loss 0.01`

use std::time::Duration;

use clap::Parser;
use tributary_tests::linkem::{serve, Direction, Layout};

#[derive(Debug, Parser)]
#[command(about = "A userspace netem over TUN: rate, delay, loss and a tail-drop queue per direction")]
struct Args {
    /// The site's network namespace; TUN devices `{name}c` and `{name}s`.
    #[arg(long, default_value = "linkem")]
    name: String,
    /// The link's first three octets: centre `.1`, site `.2`.
    #[arg(long, default_value = "10.77.0")]
    net: String,
    /// Bottleneck rate per direction, bits/s of IP packets.
    #[arg(long, default_value_t = 10_000_000)]
    bits_per_s: u64,
    /// One-way delay per direction, microseconds (the round trip is twice this).
    #[arg(long, default_value_t = 50_000)]
    delay_us: u64,
    /// Random loss per packet and direction, 0..1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// The bottleneck's queue per direction, bytes (tail drop); default: 100 ms at the rate.
    #[arg(long)]
    queue_bytes_max: Option<u64>,
    /// Seed of the loss pattern (the way back uses seed + 1).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let octets: Vec<u8> = a.net.split('.').map(str::parse).collect::<Result<_, _>>()?;
    let net: [u8; 3] = octets.try_into().map_err(|_| anyhow::anyhow!("--net: three octets, like 10.77.0"))?;
    let layout = Layout::new(&a.name, net)?;
    let delay = Duration::from_micros(a.delay_us);
    let mut spec = Direction::wan(a.bits_per_s, delay * 2, a.loss, Duration::from_millis(100), a.seed);
    if let Some(q) = a.queue_bytes_max {
        spec.queue_bytes_max = q;
    }
    let back = Direction { seed: a.seed.wrapping_add(1), ..spec };
    serve(&layout, spec, back)
}
