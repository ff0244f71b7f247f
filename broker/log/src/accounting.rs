//! Checked accounting for byte and count budgets, shared by the store and the protocol front
//! ends: a result below zero (or past `u64::MAX`) is a bookkeeping bug. Debug builds (the tests)
//! stop at it; release builds log it and clamp.

/// `total - part` in the store's byte and count accounting, where `part` was added to `total`
/// before: a result below zero is a bookkeeping bug. Debug builds (the tests) stop at it; release
/// builds log it and clamp at zero rather than take every client's connection down with the
/// process.
pub fn debit(total: u64, part: u64, what: &'static str) -> u64 {
    debug_assert!(part <= total, "{what}: {total} - {part} goes below zero");
    total.checked_sub(part).unwrap_or_else(|| {
        tracing::error!(what, total, part, "store accounting went below zero (a bug): clamped at zero");
        0
    })
}

/// `total + delta` for a signed change of an accounted amount (see [`debit`]).
pub fn apply_delta(total: u64, delta: i64, what: &'static str) -> u64 {
    match u64::try_from(delta) {
        Ok(up) => total.checked_add(up).unwrap_or_else(|| {
            debug_assert!(false, "{what}: {total} + {up} overflows");
            u64::MAX
        }),
        Err(_) => debit(total, delta.unsigned_abs(), what),
    }
}
