//! Sparse offset and time indexes of one segment.
//!
//! An entry is added for the first batch after every `interval_bytes` of segment data, so a
//! lookup lands at most one interval before the batch it wants and a read scans forward from
//! there. Both indexes live in memory; a closed segment's are written next to it in one file
//! (`<base>.index`) ending in a CRC-32C. A missing, short or corrupt index file is not an error:
//! the segment is scanned and the index rebuilt.
//!
//! Invariants: entries are in ascending relative offset and position; time entries are in
//! ascending timestamp (each one raises the segment's maximum).

use crate::batch::BatchHeader;

const INDEX_MAGIC: &[u8; 4] = b"PYX1";
const OFFSET_ENTRY_BYTES: usize = 8;
const TIME_ENTRY_BYTES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    /// The segment's largest timestamp up to and including this batch.
    pub timestamp: i64,
    pub relative_offset: u32,
    pub position: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentIndex {
    base_offset: i64,
    interval_bytes: u32,
    offsets: Vec<OffsetEntry>,
    times: Vec<TimeEntry>,
    last_offset_entry_position: Option<u32>,
    last_time_entry_position: Option<u32>,
    /// The largest batch max timestamp in the segment, or -1 when it is empty.
    pub max_timestamp: i64,
}

impl SegmentIndex {
    pub fn new(base_offset: i64, interval_bytes: u32) -> SegmentIndex {
        assert!(interval_bytes > 0, "index interval must be positive");
        SegmentIndex {
            base_offset,
            interval_bytes,
            offsets: Vec::new(),
            times: Vec::new(),
            last_offset_entry_position: None,
            last_time_entry_position: None,
            max_timestamp: -1,
        }
    }

    /// Gives back the room the entry vectors grew into: a sealed segment's index takes no
    /// more entries, and the indexes of every segment stay in memory.
    pub fn shrink_to_fit(&mut self) {
        self.offsets.shrink_to_fit();
        self.times.shrink_to_fit();
    }

    /// Records a batch written at `position` of the segment.
    pub fn on_batch(&mut self, header: &BatchHeader, position: u32) {
        let relative_offset = u32::try_from(header.base_offset - self.base_offset)
            .expect("a segment spans fewer than 2^32 offsets");
        let due = |last: Option<u32>| last.is_none_or(|last| position - last >= self.interval_bytes);
        if due(self.last_offset_entry_position) {
            if let Some(last) = self.offsets.last() {
                assert!(relative_offset > last.relative_offset, "offset index must grow");
            }
            self.offsets.push(OffsetEntry { relative_offset, position });
            self.last_offset_entry_position = Some(position);
        }
        if header.max_timestamp > self.max_timestamp {
            self.max_timestamp = header.max_timestamp;
            if due(self.last_time_entry_position) {
                self.times.push(TimeEntry { timestamp: header.max_timestamp, relative_offset, position });
                self.last_time_entry_position = Some(position);
            }
        }
    }

    /// The position of the last indexed batch at or before `offset`, or 0.
    pub fn position_for_offset(&self, offset: i64) -> u32 {
        let relative = offset - self.base_offset;
        let at = self.offsets.partition_point(|e| i64::from(e.relative_offset) <= relative);
        at.checked_sub(1).map_or(0, |i| self.offsets[i].position)
    }

    /// A position from which a forward scan finds the first batch whose max timestamp is at or
    /// after `timestamp`: every batch before it has a smaller one.
    pub fn position_for_timestamp(&self, timestamp: i64) -> u32 {
        let at = self.times.partition_point(|e| e.timestamp < timestamp);
        at.checked_sub(1).map_or(0, |i| self.times[i].position)
    }

    /// Where a scan for the largest timestamp of the batches before `position` can start, with
    /// the largest timestamp of the batches before that point: the last time entry before
    /// `position` (whose timestamp is the segment's largest up to and including its batch), or
    /// the segment's start and -1. The index alone cannot say more: a batch that raises the
    /// maximum less than `interval_bytes` after the last entry gets no entry.
    pub fn max_timestamp_scan_start(&self, position: u32) -> (u32, i64) {
        let kept = self.times.partition_point(|e| e.position < position);
        kept.checked_sub(1).map_or((0, -1), |i| (self.times[i].position, self.times[i].timestamp))
    }

    /// Drops entries for batches at or after `position` (log truncation). `max_timestamp` is
    /// the largest max timestamp of the batches kept, or -1: the caller scans them from
    /// [`SegmentIndex::max_timestamp_scan_start`].
    pub fn truncate_to(&mut self, position: u32, max_timestamp: i64) {
        self.offsets.retain(|e| e.position < position);
        self.times.retain(|e| e.position < position);
        self.last_offset_entry_position = self.offsets.last().map(|e| e.position);
        self.last_time_entry_position = self.times.last().map(|e| e.position);
        let entries_max = self.times.last().map_or(-1, |e| e.timestamp);
        assert!(max_timestamp >= entries_max, "the kept batches include the kept time entries' batches");
        self.max_timestamp = max_timestamp;
    }

    pub fn last_offset_entry(&self) -> Option<OffsetEntry> {
        self.offsets.last().copied()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            24 + self.offsets.len() * OFFSET_ENTRY_BYTES + self.times.len() * TIME_ENTRY_BYTES,
        );
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&self.max_timestamp.to_be_bytes());
        out.extend_from_slice(&(self.offsets.len() as u32).to_be_bytes());
        out.extend_from_slice(&(self.times.len() as u32).to_be_bytes());
        for e in &self.offsets {
            out.extend_from_slice(&e.relative_offset.to_be_bytes());
            out.extend_from_slice(&e.position.to_be_bytes());
        }
        for e in &self.times {
            out.extend_from_slice(&e.timestamp.to_be_bytes());
            out.extend_from_slice(&e.relative_offset.to_be_bytes());
            out.extend_from_slice(&e.position.to_be_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes an index file; `None` if it is damaged or does not fit a segment of
    /// `segment_bytes`, in which case the caller rebuilds it.
    pub fn decode(
        bytes: &[u8],
        base_offset: i64,
        interval_bytes: u32,
        segment_bytes: u64,
    ) -> Option<SegmentIndex> {
        let body_len = bytes.len().checked_sub(4)?;
        let (body, crc) = bytes.split_at(body_len);
        if crc32c::crc32c(body) != u32::from_be_bytes(crc.try_into().ok()?) || body.get(..4)? != INDEX_MAGIC {
            return None;
        }
        let max_timestamp = i64::from_be_bytes(body.get(4..12)?.try_into().ok()?);
        let offset_count = u32::from_be_bytes(body.get(12..16)?.try_into().ok()?) as usize;
        let time_count = u32::from_be_bytes(body.get(16..20)?.try_into().ok()?) as usize;
        let expected = 20usize.checked_add(offset_count.checked_mul(OFFSET_ENTRY_BYTES)?)?;
        if body.len() != expected.checked_add(time_count.checked_mul(TIME_ENTRY_BYTES)?)? {
            return None;
        }
        let u32_at = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("length checked"));
        let mut index = SegmentIndex::new(base_offset, interval_bytes);
        index.max_timestamp = max_timestamp;
        for i in 0..offset_count {
            let at = 20 + i * OFFSET_ENTRY_BYTES;
            index.offsets.push(OffsetEntry { relative_offset: u32_at(at), position: u32_at(at + 4) });
        }
        let times_at = 20 + offset_count * OFFSET_ENTRY_BYTES;
        for i in 0..time_count {
            let at = times_at + i * TIME_ENTRY_BYTES;
            let timestamp = i64::from_be_bytes(body[at..at + 8].try_into().expect("length checked"));
            index.times.push(TimeEntry {
                timestamp,
                relative_offset: u32_at(at + 8),
                position: u32_at(at + 12),
            });
        }
        let ordered = index
            .offsets
            .windows(2)
            .all(|w| w[0].relative_offset < w[1].relative_offset && w[0].position < w[1].position)
            && index
                .times
                .windows(2)
                .all(|w| w[0].timestamp < w[1].timestamp && w[0].position < w[1].position);
        let inside = index.offsets.iter().all(|e| u64::from(e.position) < segment_bytes)
            && index.times.iter().all(|e| u64::from(e.position) < segment_bytes);
        if !ordered || !inside {
            return None;
        }
        index.last_offset_entry_position = index.offsets.last().map(|e| e.position);
        index.last_time_entry_position = index.times.last().map(|e| e.position);
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(base_offset: i64, count: i32, max_timestamp: i64) -> BatchHeader {
        BatchHeader {
            base_offset,
            total_bytes: 100,
            leader_epoch: 0,
            attributes: 0,
            last_offset_delta: count - 1,
            base_timestamp: max_timestamp,
            max_timestamp,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            record_count: count,
        }
    }

    fn built(batches: usize, interval: u32) -> SegmentIndex {
        let mut index = SegmentIndex::new(1000, interval);
        for i in 0..batches {
            index.on_batch(&header(1000 + 10 * i as i64, 10, 50 + i as i64), 100 * i as u32);
        }
        index
    }

    #[test]
    fn lookups_land_at_or_before_the_target() {
        let index = built(100, 1000);
        // Entries every 10 batches: positions 0, 1000, 2000, ...
        assert_eq!(index.position_for_offset(1000), 0);
        assert_eq!(index.position_for_offset(1099), 0);
        assert_eq!(index.position_for_offset(1100), 1000);
        assert_eq!(index.position_for_offset(1995), 9000);
        assert_eq!(index.position_for_offset(5), 0);
        assert_eq!(index.position_for_timestamp(50), 0);
        assert_eq!(index.position_for_timestamp(61), 1000);
    }

    #[test]
    fn truncation_drops_later_entries() {
        let mut index = built(100, 1000);
        // Batches at 2000..2400 are kept; only the one at 2000 has a time entry.
        assert_eq!(index.max_timestamp_scan_start(2500), (2000, 70));
        index.truncate_to(2500, 74);
        assert_eq!(index.last_offset_entry().unwrap().position, 2000);
        assert_eq!(index.max_timestamp, 74);
        assert_eq!(index.max_timestamp_scan_start(0), (0, -1));
        index.truncate_to(0, -1);
        assert_eq!(index, SegmentIndex::new(1000, 1000));
    }

    #[test]
    fn damaged_files_are_refused() {
        let index = built(50, 700);
        let bytes = index.encode();
        assert_eq!(SegmentIndex::decode(&bytes, 1000, 700, 1 << 20), Some(index));
        let mut flipped = bytes.clone();
        flipped[25] ^= 1;
        assert_eq!(SegmentIndex::decode(&flipped, 1000, 700, 1 << 20), None);
        assert_eq!(SegmentIndex::decode(&bytes[..bytes.len() - 1], 1000, 700, 1 << 20), None);
        assert_eq!(SegmentIndex::decode(&bytes, 1000, 700, 100), None, "entries past the segment end");
    }

    proptest! {
        #[test]
        fn offset_lookup_never_overshoots(batches in 1usize..200, interval in 1u32..5000, target in 0i64..3000) {
            let index = built(batches, interval);
            let position = index.position_for_offset(1000 + target);
            let batch_at = position as i64 / 100;
            prop_assert!(1000 + 10 * batch_at <= (1000 + target).max(1000));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = SegmentIndex::decode(&bytes, 0, 4096, 1 << 30);
        }
    }
}
