//! The one wall clock of the project: milliseconds since the Unix epoch, for record timestamps,
//! commit times, expiry deadlines and lag ages. Durations and deadlines inside a process use
//! `Instant` instead; state machines take `now` from their driver.

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
