//! The journal's held pages: bytes redb wrote to the database file that are safe in a journal
//! record and not yet written to the file itself, kept as disjoint ranges; a read sees them over
//! the file's bytes.
//!
//! redb rewrites the same few hundred pages commit after commit (its copy-on-write paths, table
//! tree, freed tree and header); held here, each is written to the file once per checkpoint
//! instead of once per commit, and the writer's commit makes no write to the database file.

use std::collections::BTreeMap;

/// Disjoint byte ranges by start offset, each with its bytes.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    ranges: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
}

impl Overlay {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Where the last range ends (0 when empty).
    pub fn end(&self) -> u64 {
        self.ranges.last_key_value().map_or(0, |(s, d)| s + d.len() as u64)
    }

    /// Holds `data` at `offset`, over whatever was held there; ranges it overlaps become one.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        // Every range that overlaps [offset, end): starts before `end` and ends after `offset`.
        let overlapping: Vec<u64> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(s, d)| **s + d.len() as u64 > offset)
            .map(|(s, _)| *s)
            .collect();
        if let [only] = overlapping[..] {
            // The common case: a page rewritten where it was held.
            if only == offset && self.ranges.get(&only).is_some_and(|d| d.len() == data.len()) {
                if let Some(d) = self.ranges.get_mut(&only) {
                    d.copy_from_slice(data);
                }
                return;
            }
        }
        let mut start = offset;
        let mut last = end;
        let mut old = Vec::with_capacity(overlapping.len());
        for s in overlapping {
            if let Some(d) = self.ranges.remove(&s) {
                self.bytes -= d.len();
                start = start.min(s);
                last = last.max(s + d.len() as u64);
                old.push((s, d));
            }
        }
        let mut merged = vec![0u8; (last - start) as usize];
        for (s, d) in old {
            let at = (s - start) as usize;
            merged[at..at + d.len()].copy_from_slice(&d);
        }
        let at = (offset - start) as usize;
        merged[at..at + data.len()].copy_from_slice(data);
        self.bytes += merged.len();
        self.ranges.insert(start, merged);
    }

    /// Copies what is held of [offset, offset + out.len()) into `out` (the rest of `out` is
    /// left as it is); returns whether `out` is wholly covered.
    pub fn read_over(&self, offset: u64, out: &mut [u8]) -> bool {
        read_over(&self.ranges, offset, out)
    }

    /// Forgets every byte at or past `len` (the file was cut there).
    pub fn truncate(&mut self, len: u64) {
        let beyond: Vec<u64> = self.ranges.range(len..).map(|(s, _)| *s).collect();
        for s in beyond {
            if let Some(d) = self.ranges.remove(&s) {
                self.bytes -= d.len();
            }
        }
        if let Some((&s, d)) = self.ranges.range_mut(..len).next_back() {
            let keep = (len - s) as usize;
            if d.len() > keep {
                self.bytes -= d.len() - keep;
                d.truncate(keep);
            }
        }
    }

    /// Every held range in offset order, and the overlay emptied.
    pub fn take(&mut self) -> BTreeMap<u64, Vec<u8>> {
        self.bytes = 0;
        std::mem::take(&mut self.ranges)
    }
}

/// [`Overlay::read_over`] on ranges taken from an overlay (disjoint).
pub(crate) fn read_over(ranges: &BTreeMap<u64, Vec<u8>>, offset: u64, out: &mut [u8]) -> bool {
    let end = offset + out.len() as u64;
    let mut covered = 0u64;
    for (&s, d) in ranges.range(..end).rev() {
        let e = s + d.len() as u64;
        if e <= offset {
            break;
        }
        let (from, to) = (s.max(offset), e.min(end));
        out[(from - offset) as usize..(to - offset) as usize]
            .copy_from_slice(&d[(from - s) as usize..(to - s) as usize]);
        covered += to - from;
    }
    covered == out.len() as u64
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Against a flat model of the file: random writes (pages, runs of pages, unaligned short
    /// ones like redb's header), truncations and reads; every read equals the model's bytes
    /// where the overlay covers them, ranges stay disjoint and the byte count stays exact.
    #[test]
    fn reads_see_the_last_write_of_every_byte() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..200 {
            let mut o = Overlay::default();
            // The model: per byte, the value last written, or None.
            let mut model: Vec<Option<u8>> = vec![None; 64 * 1024];
            for step in 0..200u32 {
                match rng.random_range(0..10) {
                    0 => {
                        let len = rng.random_range(0..model.len() as u64);
                        o.truncate(len);
                        for b in &mut model[len as usize..] {
                            *b = None;
                        }
                    }
                    1..=6 => {
                        let (offset, len) = match rng.random_range(0..3) {
                            0 => (rng.random_range(0..16u64) * 4096, 4096),
                            1 => (rng.random_range(0..12u64) * 4096, 4096 * rng.random_range(1..5)),
                            _ => (rng.random_range(0..60_000u64), rng.random_range(1..700)),
                        };
                        let data: Vec<u8> = (0..len).map(|i| (i as u32 ^ step) as u8).collect();
                        o.write(offset, &data);
                        for (i, b) in data.iter().enumerate() {
                            model[offset as usize + i] = Some(*b);
                        }
                    }
                    _ => {
                        let offset = rng.random_range(0..60_000u64);
                        let len = rng.random_range(1..9000usize).min(model.len() - offset as usize);
                        let mut out = vec![0xEEu8; len];
                        let whole = o.read_over(offset, &mut out);
                        let want = &model[offset as usize..offset as usize + len];
                        for (i, (got, want)) in out.iter().zip(want).enumerate() {
                            match want {
                                Some(w) => assert_eq!(got, w, "byte {} of a read at {offset}", i),
                                None => assert_eq!(*got, 0xEE, "byte {} of a read at {offset}: not held", i),
                            }
                        }
                        assert_eq!(whole, want.iter().all(Option::is_some));
                    }
                }
                let mut prev_end = 0;
                let mut sum = 0;
                for (s, d) in &o.ranges {
                    assert!(*s >= prev_end && !d.is_empty(), "ranges overlap or are empty");
                    prev_end = s + d.len() as u64;
                    sum += d.len();
                }
                assert_eq!(sum, o.bytes());
                assert_eq!(o.end(), prev_end);
                assert_eq!(o.bytes(), model.iter().filter(|b| b.is_some()).count(), "held bytes = written bytes");
            }
        }
    }

    #[test]
    fn a_page_rewritten_in_place_keeps_one_range() {
        let mut o = Overlay::default();
        o.write(8192, &[1; 4096]);
        o.write(8192, &[2; 4096]);
        o.write(0, &[3; 320]);
        assert_eq!(o.ranges.len(), 2);
        assert_eq!(o.bytes(), 4096 + 320);
        let taken = o.take();
        assert_eq!(taken[&8192], vec![2; 4096]);
        assert!(o.is_empty() && o.bytes() == 0);
    }
}
