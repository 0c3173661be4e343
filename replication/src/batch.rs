//! A view of a stored Kafka RecordBatch v2 header: what replication reads of a batch.
//!
//! Replication may not depend on `dma` (which needs glommio), so it reads the few header fields
//! it needs itself: `baseOffset` (the Raft index of the batch's first record),
//! `lastOffsetDelta` (the entry spans `base..=base+delta`), `partitionLeaderEpoch` (the Raft
//! term), `batchLength` and the CRC-32C. The layout is Kafka's and cannot drift; the day a
//! small `pyralog-format` crate exists, `dma::batch` and this module both move there.
//!
//! Invariants this module owns:
//! - a [`BatchView`] exists only for bytes whose length, magic and CRC-32C were checked;
//! - [`stamp`] writes only `baseOffset` and `partitionLeaderEpoch`, both outside the CRC, so a
//!   stamped batch keeps the checksum its producer computed and is never re-encoded.

use crate::error::{ReplicationError, Result};

/// Bytes of the RecordBatch v2 header, up to and including `recordCount`.
pub const HEADER_BYTES: usize = 61;
/// Bytes before `batchLength`'s coverage starts: baseOffset (8) and batchLength (4).
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// The largest batch replication accepts (Kafka's default `message.max.bytes` is 1 MiB; the
/// daemon's own limit is lower than this).
pub const BATCH_BYTES_MAX: usize = 64 << 20;
const MAGIC_V2: i8 = 2;
const BATCH_LENGTH_AT: usize = 8;
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const RECORD_COUNT_AT: usize = 57;
/// Attribute bit 5: a control batch, which consumers skip.
pub const ATTRIBUTE_CONTROL: i16 = 1 << 5;
/// Kafka's control record type LEADER_CHANGE (KRaft writes one when a leader takes office).
pub const CONTROL_TYPE_LEADER_CHANGE: i16 = 2;

/// The checked header fields replication needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchView {
    pub base_offset: i64,
    pub last_offset_delta: i32,
    pub leader_epoch: i32,
    /// Bytes of the whole batch, header included.
    pub total_bytes: usize,
    pub crc: u32,
    pub attributes: i16,
}

impl BatchView {
    /// The offset after the batch's last record: where the next entry starts.
    pub fn end_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta) + 1
    }
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    bytes[at..at + N].try_into().expect("caller checked the header length")
}

fn corrupt(reason: impl Into<String>) -> ReplicationError {
    ReplicationError::CorruptBatch { reason: reason.into() }
}

/// Checks the batch that starts `bytes` (length, magic, CRC-32C, offset delta) and returns its
/// view. `bytes` may run past the batch. Never panics on any input.
pub fn parse(bytes: &[u8]) -> Result<BatchView> {
    if bytes.len() < HEADER_BYTES {
        return Err(corrupt(format!("{} bytes cannot hold a batch header", bytes.len())));
    }
    let batch_length = i32::from_be_bytes(field(bytes, BATCH_LENGTH_AT));
    let total =
        usize::try_from(batch_length).map_err(|_| corrupt("negative batch length"))? + LOG_OVERHEAD_BYTES;
    if !(HEADER_BYTES..=BATCH_BYTES_MAX).contains(&total) {
        return Err(corrupt(format!("impossible batch length {total}")));
    }
    if bytes.len() < total {
        return Err(corrupt(format!("batch claims {total} bytes but {} are present", bytes.len())));
    }
    let magic = bytes[MAGIC_AT] as i8;
    if magic != MAGIC_V2 {
        return Err(corrupt(format!("magic {magic} is not RecordBatch v2")));
    }
    let crc = u32::from_be_bytes(field(bytes, CRC_AT));
    let computed = crc32c::crc32c(&bytes[ATTRIBUTES_AT..total]);
    if crc != computed {
        return Err(corrupt(format!("CRC-32C mismatch: header {crc:#010x}, bytes {computed:#010x}")));
    }
    let view = BatchView {
        base_offset: i64::from_be_bytes(field(bytes, 0)),
        last_offset_delta: i32::from_be_bytes(field(bytes, LAST_OFFSET_DELTA_AT)),
        leader_epoch: i32::from_be_bytes(field(bytes, LEADER_EPOCH_AT)),
        total_bytes: total,
        crc,
        attributes: i16::from_be_bytes(field(bytes, ATTRIBUTES_AT)),
    };
    let record_count = i32::from_be_bytes(field(bytes, RECORD_COUNT_AT));
    if record_count < 1 || i64::from(view.last_offset_delta) != i64::from(record_count) - 1 {
        return Err(corrupt(format!(
            "lastOffsetDelta {} does not fit recordCount {record_count}",
            view.last_offset_delta
        )));
    }
    Ok(view)
}

/// Writes `baseOffset` and `partitionLeaderEpoch` (both outside the CRC) into a checked batch.
pub fn stamp(batch: &mut [u8], base_offset: i64, leader_epoch: i32) {
    assert!(batch.len() >= HEADER_BYTES, "stamp on a {}-byte slice", batch.len());
    assert!(base_offset >= 0, "offsets are never negative");
    batch[..8].copy_from_slice(&base_offset.to_be_bytes());
    batch[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4].copy_from_slice(&leader_epoch.to_be_bytes());
}

fn varint(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    loop {
        let byte = (zigzag & 0x7f) as u8;
        zigzag >>= 7;
        if zigzag == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<i64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((value >> 1) as i64 ^ -((value & 1) as i64));
        }
    }
    None
}

fn read_bytes<'a>(bytes: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let length = usize::try_from(read_varint(bytes, at)?).ok()?;
    let slice = bytes.get(*at..at.checked_add(length)?)?;
    *at += length;
    Some(slice)
}

/// The key and value of the first record of an uncompressed batch (`batch` is exactly one
/// checked batch). None when it does not decode; never panics.
pub fn first_record(batch: &[u8]) -> Option<(&[u8], &[u8])> {
    let records = batch.get(HEADER_BYTES..)?;
    let mut at = 0;
    let _length = read_varint(records, &mut at)?;
    at += 1; // record attributes
    let _timestamp_delta = read_varint(records, &mut at)?;
    let _offset_delta = read_varint(records, &mut at)?;
    let key = read_bytes(records, &mut at)?;
    let value = read_bytes(records, &mut at)?;
    Some((key, value))
}

/// Builds a RecordBatch v2 of `records` (key, value) pairs at offset 0, epoch -1, with the
/// given attributes and its CRC-32C. Used for the epoch-start control batch and by tests.
pub fn build(records: &[(Option<&[u8]>, &[u8])], attributes: i16, timestamp_ms: i64) -> Vec<u8> {
    assert!(!records.is_empty(), "a batch holds at least one record");
    let mut body = Vec::new();
    for (delta, (key, value)) in records.iter().enumerate() {
        let mut record = vec![0u8]; // record attributes
        varint(&mut record, 0); // timestamp delta
        varint(&mut record, delta as i64);
        match key {
            Some(key) => {
                varint(&mut record, key.len() as i64);
                record.extend_from_slice(key);
            }
            None => varint(&mut record, -1),
        }
        varint(&mut record, value.len() as i64);
        record.extend_from_slice(value);
        varint(&mut record, 0); // headers
        varint(&mut body, record.len() as i64);
        body.extend_from_slice(&record);
    }
    let mut batch = Vec::with_capacity(HEADER_BYTES + body.len());
    batch.extend_from_slice(&0i64.to_be_bytes());
    batch.extend_from_slice(&((HEADER_BYTES - LOG_OVERHEAD_BYTES + body.len()) as i32).to_be_bytes());
    batch.extend_from_slice(&(-1i32).to_be_bytes());
    batch.push(MAGIC_V2 as u8);
    batch.extend_from_slice(&[0; 4]);
    batch.extend_from_slice(&attributes.to_be_bytes());
    batch.extend_from_slice(&((records.len() - 1) as i32).to_be_bytes());
    batch.extend_from_slice(&timestamp_ms.to_be_bytes());
    batch.extend_from_slice(&timestamp_ms.to_be_bytes());
    batch.extend_from_slice(&(-1i64).to_be_bytes());
    batch.extend_from_slice(&(-1i16).to_be_bytes());
    batch.extend_from_slice(&(-1i32).to_be_bytes());
    batch.extend_from_slice(&(records.len() as i32).to_be_bytes());
    batch.extend_from_slice(&body);
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_AT..]);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    batch
}

/// The epoch-start batch a new leader appends: a control batch holding one LEADER_CHANGE
/// record (key: version 0, type 2; value: version 0, leader id, the voters), as KRaft writes.
/// It takes one Kafka offset; consumers skip control batches.
pub fn epoch_start(leader: u32, voters: &[u32]) -> Vec<u8> {
    let mut key = Vec::with_capacity(4);
    key.extend_from_slice(&0i16.to_be_bytes());
    key.extend_from_slice(&CONTROL_TYPE_LEADER_CHANGE.to_be_bytes());
    let mut value = Vec::with_capacity(14 + 4 * voters.len());
    value.extend_from_slice(&0i16.to_be_bytes());
    value.extend_from_slice(&(leader as i32).to_be_bytes());
    value.extend_from_slice(&(voters.len() as i32).to_be_bytes());
    for voter in voters {
        value.extend_from_slice(&(*voter as i32).to_be_bytes());
    }
    value.extend_from_slice(&0i32.to_be_bytes()); // granting voters: not recorded
    build(&[(Some(&key), &value)], ATTRIBUTE_CONTROL, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_a_built_batch_and_stamp_keeps_the_crc() {
        let mut batch = build(&[(None, b"a"), (None, b"b")], 0, 7);
        let before = parse(&batch).expect("a built batch is valid");
        stamp(&mut batch, 40, 3);
        let after = parse(&batch).expect("stamping stays outside the CRC");
        assert_eq!(after.base_offset, 40);
        assert_eq!(after.leader_epoch, 3);
        assert_eq!(after.end_offset(), 42);
        assert_eq!(before.crc, after.crc);
    }

    #[test]
    fn parse_refuses_bad_crc_short_and_impossible_lengths() {
        let batch = build(&[(None, b"abc")], 0, 0);
        let mut flipped = batch.clone();
        *flipped.last_mut().expect("non-empty") ^= 1;
        assert!(parse(&flipped).is_err());
        assert!(parse(&batch[..batch.len() - 1]).is_err());
        assert!(parse(&batch[..10]).is_err());
        let mut huge = batch.clone();
        huge[8..12].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(parse(&huge).is_err());
        let mut negative = batch;
        negative[8..12].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(parse(&negative).is_err());
    }

    #[test]
    fn epoch_start_is_a_one_offset_control_batch() {
        let view = parse(&epoch_start(2, &[1, 2, 3])).expect("valid");
        assert_eq!(view.attributes & ATTRIBUTE_CONTROL, ATTRIBUTE_CONTROL);
        assert_eq!(view.last_offset_delta, 0);
    }
}
