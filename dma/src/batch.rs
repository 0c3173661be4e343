//! Kafka RecordBatch v2: the one unit Pyralog stores, replicates and serves.
//!
//! A batch arrives from a client, is checked here, gets its offset written into its header and
//! then travels unchanged to the segment file, the cache and every consumer. Nothing in this
//! module decodes records: the header says everything the broker needs.
//!
//! Invariants this module owns:
//! - a [`BatchHeader`] only exists for bytes whose length field, magic and CRC-32C were checked,
//!   on ingest by [`parse`], or earlier, for stored batches read back by [`stored_header`];
//! - [`set_base_offset`] touches only `baseOffset`, which lies outside the CRC, so a stored batch
//!   still carries the checksum the producer computed.

use crate::{LogError, Result};

/// Bytes of the RecordBatch v2 header, up to and including `recordCount`.
pub const HEADER_BYTES: usize = 61;
/// Bytes before `batchLength`'s coverage starts: baseOffset (8) and batchLength (4).
pub const LOG_OVERHEAD_BYTES: usize = 12;
/// The only magic byte this broker stores.
pub const MAGIC_V2: i8 = 2;

const BATCH_LENGTH_AT: usize = 8;
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORD_COUNT_AT: usize = 57;

/// What the broker reads from a checked batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Bytes of the whole batch, header included.
    pub total_bytes: u32,
    pub leader_epoch: i32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// The first record's sequence number for an idempotent producer, else -1.
    pub base_sequence: i32,
    pub record_count: i32,
}

impl BatchHeader {
    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }

    /// Offsets the batch occupies: lastOffsetDelta + 1.
    pub fn offset_count(&self) -> i64 {
        i64::from(self.last_offset_delta) + 1
    }
}

fn be_i16(bytes: &[u8], at: usize) -> i16 {
    i16::from_be_bytes(bytes[at..at + 2].try_into().expect("caller checked the header length"))
}
fn be_i32(bytes: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(bytes[at..at + 4].try_into().expect("caller checked the header length"))
}
fn be_i64(bytes: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(bytes[at..at + 8].try_into().expect("caller checked the header length"))
}

/// Reads the total size the batch at the start of `bytes` claims, without checking anything
/// else. `None` when fewer than [`LOG_OVERHEAD_BYTES`] are present or the length is impossible.
pub fn claimed_batch_bytes(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < LOG_OVERHEAD_BYTES {
        return None;
    }
    let batch_length = be_i32(bytes, BATCH_LENGTH_AT);
    let minimum = (HEADER_BYTES - LOG_OVERHEAD_BYTES) as i32;
    (batch_length >= minimum).then(|| LOG_OVERHEAD_BYTES + batch_length as usize)
}

/// Checks the batch that starts `bytes` and returns its header. `bytes` may run past the batch.
pub fn parse(bytes: &[u8]) -> Result<BatchHeader> {
    let total =
        claimed_batch_bytes(bytes).ok_or_else(|| corrupt("batch length field is missing or too small"))?;
    if bytes.len() < total {
        return Err(corrupt(format!("batch claims {total} bytes but only {} are present", bytes.len())));
    }
    let batch = &bytes[..total];
    let magic = batch[MAGIC_AT] as i8;
    if magic != MAGIC_V2 {
        return Err(corrupt(format!("magic {magic} is not RecordBatch v2")));
    }
    let stored_crc = u32::from_be_bytes(batch[CRC_AT..CRC_AT + 4].try_into().expect("length checked"));
    let computed_crc = crc32c::crc32c(&batch[ATTRIBUTES_AT..]);
    if stored_crc != computed_crc {
        return Err(corrupt(format!(
            "CRC-32C mismatch: header says {stored_crc:#010x}, bytes give {computed_crc:#010x}"
        )));
    }
    let header = stored_header(batch).expect("length checked above");
    // As Kafka's broker does: the records take consecutive offsets, so the batch's offset
    // range is its record count. A lastOffsetDelta past it would let a 61-byte batch use up
    // 2^31 offsets and push a segment's relative offsets past what its index can hold.
    if header.record_count < 1 || i64::from(header.last_offset_delta) != i64::from(header.record_count) - 1 {
        return Err(corrupt(format!(
            "lastOffsetDelta {} does not fit recordCount {}: a batch's records take consecutive offsets",
            header.last_offset_delta, header.record_count
        )));
    }
    Ok(header)
}

/// Reads the header of a batch this broker checked before it stored it, checking only that the
/// header is present and its length possible: the cheap way to walk a segment. `None` when
/// fewer than [`HEADER_BYTES`] are present or the length field is impossible.
pub fn stored_header(bytes: &[u8]) -> Option<BatchHeader> {
    let total = claimed_batch_bytes(bytes)?;
    if bytes.len() < HEADER_BYTES {
        return None;
    }
    Some(BatchHeader {
        base_offset: be_i64(bytes, 0),
        total_bytes: u32::try_from(total).expect("bounded by i32 batchLength"),
        leader_epoch: be_i32(bytes, LEADER_EPOCH_AT),
        attributes: be_i16(bytes, ATTRIBUTES_AT),
        last_offset_delta: be_i32(bytes, LAST_OFFSET_DELTA_AT),
        base_timestamp: be_i64(bytes, BASE_TIMESTAMP_AT),
        max_timestamp: be_i64(bytes, MAX_TIMESTAMP_AT),
        producer_id: be_i64(bytes, PRODUCER_ID_AT),
        producer_epoch: be_i16(bytes, PRODUCER_EPOCH_AT),
        base_sequence: be_i32(bytes, BASE_SEQUENCE_AT),
        record_count: be_i32(bytes, RECORD_COUNT_AT),
    })
}

/// Splits a produce payload into whole, checked batches. Any bad batch fails the whole payload,
/// so a produce request is appended entirely or not at all.
pub fn parse_all(bytes: &[u8]) -> Result<Vec<BatchHeader>> {
    let mut headers = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = parse(&bytes[at..]).map_err(|e| match e {
            LogError::CorruptBatch { reason } => corrupt(format!("batch at byte {at}: {reason}")),
            other => other,
        })?;
        at += header.total_bytes as usize;
        headers.push(header);
    }
    if headers.is_empty() {
        return Err(corrupt("no record batch in the request"));
    }
    Ok(headers)
}

/// Writes `baseOffset` (outside the CRC) into the batch at the start of `batch`.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    assert!(batch.len() >= HEADER_BYTES, "set_base_offset on a {}-byte slice", batch.len());
    assert!(base_offset >= 0, "offsets are never negative");
    batch[..8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Writes `partitionLeaderEpoch` (outside the CRC) into the batch at the start of `batch`.
pub fn set_leader_epoch(batch: &mut [u8], epoch: i32) {
    assert!(batch.len() >= HEADER_BYTES, "set_leader_epoch on a {}-byte slice", batch.len());
    batch[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4].copy_from_slice(&epoch.to_be_bytes());
}

fn corrupt(reason: impl Into<String>) -> LogError {
    LogError::CorruptBatch { reason: reason.into() }
}

/// Builds RecordBatch v2 bytes for this crate's tests: `record_count` records without a key,
/// each carrying `value`, every timestamp `timestamp_ms`. The encoding is replication's
/// (`pyralog_replication::batch::build`, a dev-dependency): one encoder of the format for
/// both crates' tests.
#[cfg(test)]
pub(crate) fn build_for_tests(record_count: usize, value: &[u8], timestamp_ms: i64) -> Vec<u8> {
    let records = vec![(None, value); record_count];
    pyralog_replication::batch::build(&records, 0, timestamp_ms)
}

/// Recomputes the CRC-32C of the batch at the start of `batch`, for tests that alter a
/// checked field on purpose.
pub fn reseal_for_tests(batch: &mut [u8]) {
    let total = claimed_batch_bytes(batch).expect("a batch length");
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_AT..total]);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_batch_whose_offset_range_is_not_its_record_count_is_refused() {
        for (delta, count) in [(i32::MAX, 1i32), (5, 3), (0, 0), (-1, 0)] {
            let mut batch = build_for_tests(1, b"v", 0);
            batch[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4].copy_from_slice(&delta.to_be_bytes());
            batch[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&count.to_be_bytes());
            reseal_for_tests(&mut batch);
            let error = parse(&batch).unwrap_err().to_string();
            assert!(error.contains("consecutive offsets"), "{delta}/{count}: {error}");
        }
        assert_eq!(parse(&build_for_tests(3, b"v", 0)).unwrap().offset_count(), 3);
    }

    #[test]
    fn parses_a_built_batch() {
        let batch = build_for_tests(3, b"hello", 1_700_000_000_000);
        let header = parse(&batch).unwrap();
        assert_eq!(header.total_bytes as usize, batch.len());
        assert_eq!(header.record_count, 3);
        assert_eq!(header.offset_count(), 3);
        assert_eq!(header.max_timestamp, 1_700_000_000_000);
    }

    #[test]
    fn offset_and_epoch_rewrites_keep_the_crc_valid() {
        let mut batch = build_for_tests(2, b"x", 5);
        set_base_offset(&mut batch, 1234);
        set_leader_epoch(&mut batch, 7);
        let header = parse(&batch).unwrap();
        assert_eq!(header.base_offset, 1234);
        assert_eq!(header.last_offset(), 1235);
        assert_eq!(header.leader_epoch, 7);
    }

    #[test]
    fn a_flipped_record_byte_fails_the_crc() {
        let mut batch = build_for_tests(2, b"payload", 5);
        let last = batch.len() - 3;
        batch[last] ^= 0x40;
        let error = parse(&batch).unwrap_err();
        assert!(error.to_string().contains("CRC-32C mismatch"), "{error}");
    }

    #[test]
    fn parse_all_rejects_a_trailing_partial_batch() {
        let one = build_for_tests(1, b"a", 5);
        let mut two = one.clone();
        two.extend_from_slice(&one[..20]);
        assert_eq!(parse_all(&one).unwrap().len(), 1);
        assert!(parse_all(&two).is_err());
        assert!(parse_all(&[]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_all(&bytes);
        }

        #[test]
        fn any_single_bit_flip_inside_the_crc_is_caught(count in 1usize..5, len in 0usize..64, bit in any::<u16>()) {
            let mut batch = build_for_tests(count, &vec![7u8; len], 9);
            let span = batch.len() - ATTRIBUTES_AT;
            let at = ATTRIBUTES_AT + (bit as usize / 8) % span;
            batch[at] ^= 1 << (bit % 8);
            prop_assert!(parse(&batch).is_err());
        }
    }
}
