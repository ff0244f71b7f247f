//! New connections per source address: a token bucket per IP address (rate per second, burst of
//! one second's worth) in a bounded map, so a flood from one address is refused cheaply while
//! other addresses keep connecting. Sans-I/O: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-address token buckets. `rate_per_s == 0` turns the limit off.
#[derive(Debug)]
pub struct ConnectionRateLimit {
    rate_per_s: f64,
    addresses_max: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl ConnectionRateLimit {
    pub fn new(rate_per_s: u32, addresses_max: u32) -> Self {
        Self {
            rate_per_s: f64::from(rate_per_s),
            addresses_max: addresses_max.max(1) as usize,
            buckets: HashMap::new(),
        }
    }

    /// Whether a new connection from `ip` may proceed (and takes its token).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate_per_s <= 0.0 {
            return true;
        }
        let (rate, burst) = (self.rate_per_s, self.rate_per_s.max(1.0));
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.addresses_max {
            // Forget addresses whose bucket has refilled (they are as good as new); if every
            // tracked address is still limited, forget the one seen longest ago.
            self.buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
            if self.buckets.len() >= self.addresses_max {
                if let Some(oldest) = self.buckets.iter().min_by_key(|(_, b)| b.at).map(|(ip, _)| *ip) {
                    self.buckets.remove(&oldest);
                }
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_address_is_limited_others_are_not() {
        let mut l = ConnectionRateLimit::new(5, 100);
        let t = Instant::now();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert_eq!((0..20).filter(|_| l.allow(a, t)).count(), 5, "a burst of one second's worth");
        assert!(l.allow(b, t), "another address is unaffected");
        assert!(!l.allow(a, t + Duration::from_millis(100)));
        assert!(l.allow(a, t + Duration::from_millis(250)), "refills at the rate");
        assert!(ConnectionRateLimit::new(0, 1).allow(a, t), "0 = off");
    }

    #[test]
    fn the_map_stays_bounded() {
        let mut l = ConnectionRateLimit::new(1, 3);
        let t = Instant::now();
        for i in 0..100u8 {
            l.allow([10, 0, 0, i].into(), t);
            assert!(l.tracked() <= 3);
        }
        // A limited address stays limited while others come and go within the bound.
        let mut l = ConnectionRateLimit::new(1, 3);
        let a: IpAddr = [10, 0, 0, 1].into();
        assert!(l.allow(a, t));
        assert!(!l.allow(a, t));
        l.allow([10, 0, 0, 2].into(), t);
        assert!(!l.allow(a, t));
    }
}
