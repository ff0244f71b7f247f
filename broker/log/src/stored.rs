//! One stored batch as the tables hold it: written as a head in `LOG` and pieces in
//! `LOG_PIECES` (`tables::layout`), read back whole, removed with its pieces, and what it costs
//! on disk. Every reader and writer of batches goes through here, so whole batches (small ones,
//! and every batch of a database written before pieces existed) and batches in pieces are one
//! thing to the rest of the store.

use redb::{ReadableTable, Table};

use crate::batch::BatchHeader;
use crate::error::StoreError;
use crate::tables::{footprint, layout, split_footprint, split_value, TIME_INDEX_INTERVAL_BYTES, VALUE_PREFIX_LEN};

pub(crate) type LogTable<'t> = Table<'t, (u64, u64), &'static [u8]>;
pub(crate) type PiecesTable<'t> = Table<'t, (u64, u64, u8), &'static [u8]>;

/// The base offset of the batch where the last `TIME_INDEX_INTERVAL_BYTES` of a partition's
/// batches below offset `before` begin (the newest batches whose lengths reach it, or all of
/// them), with the bytes of the batches from there on; it reads one batch head more than
/// `TIME_INDEX_INTERVAL_BYTES` / 61 at most (a batch is at least 61 bytes); `None` if there is no
/// such batch. The batches that raised the running max timestamp past the time index's newest
/// entry are all in that range (see `tables::TIME_INDEX`).
pub(crate) fn tail_region_start(
    log: &impl ReadableTable<(u64, u64), &'static [u8]>,
    pkey: u64,
    before: u64,
) -> Result<Option<(u64, u64)>, StoreError> {
    let mut bytes = 0u64;
    let mut start = None;
    for e in log.range((pkey, 0u64)..(pkey, before))?.rev() {
        let (k, v) = e?;
        let (_, head) = split_value(v.value())?;
        let h = BatchHeader::parse(head).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        bytes += h.total_len() as u64;
        start = Some((k.value().1, bytes));
        if bytes >= TIME_INDEX_INTERVAL_BYTES {
            break;
        }
    }
    Ok(start)
}

/// What storing or removing one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoredBatch {
    /// The batch's bytes (without the append-time prefix).
    pub batch_len: u64,
    /// Disk bytes it costs (`tables::footprint` of a whole value, `Layout::footprint` of pieces).
    pub footprint: u64,
}

/// Stores `value` (append time, then the batch) at `(pkey, base)`. A batch already there must
/// have been removed (`remove_batch`) first: its pieces would stay.
pub(crate) fn put_batch(
    log: &mut LogTable<'_>,
    pieces: &mut PiecesTable<'_>,
    pkey: u64,
    base: u64,
    value: &[u8],
) -> Result<StoredBatch, StoreError> {
    debug_assert!(value.len() > VALUE_PREFIX_LEN, "a stored value holds its prefix and a batch");
    let l = layout(value.len());
    let replaced = log.insert((pkey, base), &value[..l.head])?.is_some();
    debug_assert!(!replaced, "batch ({pkey:#x}, {base}) stored over another");
    let mut at = l.head;
    for (i, len) in l.pieces.iter().enumerate() {
        pieces.insert((pkey, base, i as u8), &value[at..at + len])?;
        at += len;
    }
    let footprint = if l.pieces.is_empty() { footprint(value.len()) } else { l.footprint() };
    Ok(StoredBatch { batch_len: (value.len() - VALUE_PREFIX_LEN) as u64, footprint })
}

/// Removes the batch at `(pkey, base)` with its pieces; `None` if there is none. The footprint
/// returned is the one `put_batch` counted for it, from the lengths actually stored.
pub(crate) fn remove_batch(
    log: &mut LogTable<'_>,
    pieces: &mut PiecesTable<'_>,
    pkey: u64,
    base: u64,
) -> Result<Option<StoredBatch>, StoreError> {
    let head_len = match log.remove((pkey, base))? {
        Some(v) => v.value().len(),
        None => return Ok(None),
    };
    let mut lens = Vec::new();
    for i in 0..=u8::MAX {
        match pieces.remove((pkey, base, i))? {
            Some(v) => lens.push(v.value().len()),
            None => break,
        }
    }
    let batch_len = (head_len.saturating_sub(VALUE_PREFIX_LEN) + lens.iter().sum::<usize>()) as u64;
    let footprint = if lens.is_empty() { footprint(head_len) } else { split_footprint(head_len, lens) };
    Ok(Some(StoredBatch { batch_len, footprint }))
}

/// Calls `part` with the batch's bytes in order: the head's (`head`, the batch part of the LOG
/// value), then its pieces'. Returns the batch's length; a batch whose pieces do not add up to
/// the length in its header is corrupt.
fn for_each_part(
    pieces: &impl ReadableTable<(u64, u64, u8), &'static [u8]>,
    pkey: u64,
    base: u64,
    head: &[u8],
    mut part: impl FnMut(&[u8]),
) -> Result<usize, StoreError> {
    let h = BatchHeader::parse(head).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let total = h.total_len();
    part(head);
    if head.len() >= total {
        return Ok(head.len());
    }
    let mut len = head.len();
    for e in pieces.range((pkey, base, 0u8)..=(pkey, base, u8::MAX))? {
        let (_, v) = e?;
        part(v.value());
        len += v.value().len();
    }
    if len != total {
        return Err(StoreError::Corrupt(format!(
            "batch ({pkey:#x}, {base}): its pieces hold {len} bytes, its header says {total}"
        )));
    }
    Ok(len)
}

/// Appends the whole batch whose head is `head` (the batch part of its LOG value) to `out`.
pub(crate) fn read_batch_into(
    pieces: &impl ReadableTable<(u64, u64, u8), &'static [u8]>,
    pkey: u64,
    base: u64,
    head: &[u8],
    out: &mut bytes::BytesMut,
) -> Result<usize, StoreError> {
    for_each_part(pieces, pkey, base, head, |p| out.extend_from_slice(p))
}

/// The whole batch whose head is `head`: borrowed when whole, assembled from its pieces
/// otherwise.
pub(crate) fn read_batch<'h>(
    pieces: &impl ReadableTable<(u64, u64, u8), &'static [u8]>,
    pkey: u64,
    base: u64,
    head: &'h [u8],
) -> Result<std::borrow::Cow<'h, [u8]>, StoreError> {
    let h = BatchHeader::parse(head).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if head.len() >= h.total_len() {
        return Ok(std::borrow::Cow::Borrowed(head));
    }
    let mut whole = Vec::with_capacity(h.total_len());
    for_each_part(pieces, pkey, base, head, |p| whole.extend_from_slice(p))?;
    Ok(std::borrow::Cow::Owned(whole))
}
