//! The consumer protocol inside JoinGroup metadata (ConsumerProtocolSubscription): the topics a
//! member subscribes to, read with bounds.

/// Topics of a consumer-protocol subscription (`version, [topic], user_data, ...`), read with
/// bounds checks; empty if it is not one.
pub(super) fn subscribed_topics(metadata: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(count) = metadata.get(2..6).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]])) else { return out };
    let mut at = 6;
    for _ in 0..count.clamp(0, 10_000) {
        let Some(len) = metadata.get(at..at + 2).map(|b| i16::from_be_bytes([b[0], b[1]])) else { break };
        let Some(name) = metadata.get(at + 2..at + 2 + len.max(0) as usize) else { break };
        out.push(String::from_utf8_lossy(name).into_owned());
        at += 2 + len.max(0) as usize;
    }
    out
}
