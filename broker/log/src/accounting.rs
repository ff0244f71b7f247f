//! Checked accounting for byte and count budgets, shared by the store and the protocol front
//! ends: a result below zero (or past `u64::MAX`) is a bookkeeping bug. Debug builds (the tests)
//! stop at it; release builds log it and clamp. The writer's own accounting uses the same rule
//! (`writer::debit`, `writer::apply_delta`), which these name for users outside the store.

/// `total - part`, where `part` was added to `total` before (see the module comment).
pub fn debit(total: u64, part: u64, what: &'static str) -> u64 {
    crate::writer::debit(total, part, what)
}

/// `total + delta` for a signed change of an accounted amount (see [`debit`]).
pub fn apply_delta(total: u64, delta: i64, what: &'static str) -> u64 {
    crate::writer::apply_delta(total, delta, what)
}
