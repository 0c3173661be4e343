//! The client's own Kafka RecordBatch v2 builder and reader.
//!
//! This is not the broker's batch code (that lives in the dma crate, which a client must not
//! pull in); it is a small, self-contained implementation of the same wire format:
//!
//! ```text
//! baseOffset i64 | batchLength i32 | partitionLeaderEpoch i32 | magic i8 (2) | crc u32
//! | attributes i16 | lastOffsetDelta i32 | baseTimestamp i64 | maxTimestamp i64
//! | producerId i64 | producerEpoch i16 | baseSequence i32 | recordCount i32 | records...
//! ```
//!
//! All header integers are big-endian; `batchLength` counts the bytes after itself and the
//! CRC-32C covers `attributes` to the end of the batch. Each record is
//! `length varint | attributes i8 | timestampDelta varlong | offsetDelta varint
//! | keyLength varint (-1 = null) | key | valueLength varint | value | headersCount varint
//! | headers...`, varints being zigzag LEB128 as in protobuf.
//!
//! Invariants:
//! - [`BatchBuilder`] writes records straight into one buffer (no per-record allocation) and
//!   [`BatchBuilder::size_bytes`] is always the exact size `finish` will return.
//! - [`RecordReader`] never panics and never allocates from a count read off the wire: every
//!   length is checked against the bytes actually present, each batch's CRC and length are
//!   verified before any of its records is yielded, and keys and values are zero-copy
//!   [`Bytes`] slices of the input. After the first error the reader yields nothing more.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of the fixed batch header, up to and including `recordCount`.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes of `baseOffset` and `batchLength`, which `batchLength` does not count.
pub const BATCH_LOG_OVERHEAD_BYTES: usize = 12;
/// The only batch format this module speaks.
pub const BATCH_MAGIC: i8 = 2;
/// Largest batch the builder produces; the broker rejects far smaller ones anyway.
pub const BATCH_BYTES_MAX: usize = 64 << 20;

const LENGTH_AT: usize = 8;
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

const COMPRESSION_MASK: i16 = 0x07;
const LOG_APPEND_TIME_FLAG: i16 = 0x08;
const CONTROL_FLAG: i16 = 0x20;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch at byte {at}: {present} bytes left, a batch needs {needed}")]
    Truncated { at: usize, needed: usize, present: usize },
    #[error("batch at byte {at}: batchLength {length} is below the {minimum}-byte header")]
    LengthTooSmall { at: usize, length: i32, minimum: usize },
    #[error("batch at byte {at}: magic {magic}, only magic 2 (RecordBatch v2) is supported")]
    Magic { at: usize, magic: i8 },
    #[error("batch at byte {at}: CRC-32C is {computed:#010x}, header says {stored:#010x}")]
    Crc { at: usize, stored: u32, computed: u32 },
    #[error("batch at byte {at}: compression codec {codec} is not supported")]
    Compression { at: usize, codec: i16 },
    #[error("batch at byte {at}: record {index} is malformed: {reason}")]
    Record { at: usize, index: i32, reason: &'static str },
    #[error("batch at byte {at}: recordCount is {claimed} but the records hold {present}")]
    RecordCount { at: usize, claimed: i32, present: i32 },
}

/// Builds one uncompressed RecordBatch v2 with baseOffset 0 (the broker assigns offsets).
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    record_count: i32,
    base_timestamp_ms: i64,
    max_timestamp_ms: i64,
    producer: Option<IdempotentProducer>,
}

/// The identity an idempotent producer stamps on a batch: the broker appends a batch once
/// however often it is sent, and refuses gaps in the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotentProducer {
    pub producer_id: i64,
    pub epoch: i16,
    /// The sequence number of the batch's first record.
    pub base_sequence: i32,
}

impl BatchBuilder {
    /// Starts a batch whose records' timestamps are stored relative to `base_timestamp_ms`.
    pub fn new(base_timestamp_ms: i64, capacity_bytes: usize) -> BatchBuilder {
        let mut buf = BytesMut::with_capacity(capacity_bytes.clamp(BATCH_HEADER_BYTES, BATCH_BYTES_MAX));
        buf.put_bytes(0, BATCH_HEADER_BYTES);
        BatchBuilder {
            buf,
            record_count: 0,
            base_timestamp_ms,
            max_timestamp_ms: base_timestamp_ms,
            producer: None,
        }
    }

    /// Marks the batch as sent by an idempotent producer.
    pub fn idempotent(mut self, producer: IdempotentProducer) -> BatchBuilder {
        self.producer = Some(producer);
        self
    }

    pub fn record_count(&self) -> u32 {
        u32::try_from(self.record_count).expect("record_count never goes negative")
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Exact bytes of the batch `finish` would return now.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Bytes a record will add to this batch, so a caller can cut a batch before it overflows.
    pub fn record_size_bytes(&self, timestamp_ms: i64, key: Option<&[u8]>, value: &[u8]) -> usize {
        let body = self.record_body_bytes(timestamp_ms, key, value);
        varint_bytes(u64::from(zigzag32(i32::try_from(body).unwrap_or(i32::MAX)))) + body
    }

    fn record_body_bytes(&self, timestamp_ms: i64, key: Option<&[u8]>, value: &[u8]) -> usize {
        let key_length = key.map_or(-1, |k| i32::try_from(k.len()).unwrap_or(i32::MAX));
        let value_length = i32::try_from(value.len()).unwrap_or(i32::MAX);
        1 + varint_bytes(zigzag64(timestamp_ms.wrapping_sub(self.base_timestamp_ms)))
            + varint_bytes(u64::from(zigzag32(self.record_count)))
            + varint_bytes(u64::from(zigzag32(key_length)))
            + key.map_or(0, <[u8]>::len)
            + varint_bytes(u64::from(zigzag32(value_length)))
            + value.len()
            + 1
    }

    /// Appends a record. Panics if the batch would exceed [`BATCH_BYTES_MAX`]: callers cut
    /// batches with [`BatchBuilder::record_size_bytes`] well before that.
    pub fn append(&mut self, timestamp_ms: i64, key: Option<&[u8]>, value: &[u8]) {
        let body_bytes = self.record_body_bytes(timestamp_ms, key, value);
        let before = self.buf.len();
        assert!(before + body_bytes + 5 <= BATCH_BYTES_MAX, "batch would exceed BATCH_BYTES_MAX");
        let body_length = i32::try_from(body_bytes).expect("bounded by BATCH_BYTES_MAX");
        put_varint(&mut self.buf, u64::from(zigzag32(body_length)));
        self.buf.put_i8(0);
        put_varint(&mut self.buf, zigzag64(timestamp_ms.wrapping_sub(self.base_timestamp_ms)));
        put_varint(&mut self.buf, u64::from(zigzag32(self.record_count)));
        match key {
            Some(key) => {
                let key_length = i32::try_from(key.len()).expect("bounded by BATCH_BYTES_MAX");
                put_varint(&mut self.buf, u64::from(zigzag32(key_length)));
                self.buf.put_slice(key);
            }
            None => put_varint(&mut self.buf, u64::from(zigzag32(-1))),
        }
        let value_length = i32::try_from(value.len()).expect("bounded by BATCH_BYTES_MAX");
        put_varint(&mut self.buf, u64::from(zigzag32(value_length)));
        self.buf.put_slice(value);
        put_varint(&mut self.buf, 0);
        self.record_count += 1;
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        let length_bytes = varint_bytes(u64::from(zigzag32(body_length)));
        debug_assert_eq!(self.buf.len() - before, length_bytes + body_bytes);
    }

    /// Fills in the header and returns the batch.
    pub fn finish(mut self) -> Bytes {
        assert!(self.record_count > 0, "an empty batch is not a batch");
        let batch_length = i32::try_from(self.buf.len() - BATCH_LOG_OVERHEAD_BYTES).expect("bounded");
        let header = &mut self.buf[..BATCH_HEADER_BYTES];
        header[..LENGTH_AT].copy_from_slice(&0i64.to_be_bytes());
        header[LENGTH_AT..LENGTH_AT + 4].copy_from_slice(&batch_length.to_be_bytes());
        header[12..MAGIC_AT].copy_from_slice(&(-1i32).to_be_bytes());
        header[MAGIC_AT] = BATCH_MAGIC as u8;
        header[ATTRIBUTES_AT..LAST_OFFSET_DELTA_AT].copy_from_slice(&0i16.to_be_bytes());
        let last_offset_delta = self.record_count - 1;
        header[LAST_OFFSET_DELTA_AT..BASE_TIMESTAMP_AT].copy_from_slice(&last_offset_delta.to_be_bytes());
        header[BASE_TIMESTAMP_AT..MAX_TIMESTAMP_AT].copy_from_slice(&self.base_timestamp_ms.to_be_bytes());
        header[MAX_TIMESTAMP_AT..43].copy_from_slice(&self.max_timestamp_ms.to_be_bytes());
        let producer =
            self.producer.unwrap_or(IdempotentProducer { producer_id: -1, epoch: -1, base_sequence: -1 });
        header[PRODUCER_ID_AT..PRODUCER_EPOCH_AT].copy_from_slice(&producer.producer_id.to_be_bytes());
        header[PRODUCER_EPOCH_AT..BASE_SEQUENCE_AT].copy_from_slice(&producer.epoch.to_be_bytes());
        header[BASE_SEQUENCE_AT..RECORD_COUNT_AT].copy_from_slice(&producer.base_sequence.to_be_bytes());
        header[RECORD_COUNT_AT..BATCH_HEADER_BYTES].copy_from_slice(&self.record_count.to_be_bytes());
        let crc = crc32c::crc32c(&self.buf[ATTRIBUTES_AT..]);
        self.buf[CRC_AT..ATTRIBUTES_AT].copy_from_slice(&crc.to_be_bytes());
        self.buf.freeze()
    }
}

/// One record of a batch. `key` and `value` are slices of the buffer given to the reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
}

/// Iterates the records of one or more whole batches laid back to back, as a fetch returns
/// them. A trailing partial batch (a fetch cut by `max_bytes`) ends the iteration with
/// [`BatchError::Truncated`], after every complete batch before it has been yielded.
#[derive(Debug)]
pub struct RecordReader {
    buf: Bytes,
    /// Start of the next batch in `buf`.
    next_batch_at: usize,
    batch: Option<BatchCursor>,
    failed: bool,
}

#[derive(Debug)]
struct BatchCursor {
    batch_at: usize,
    base_offset: i64,
    base_timestamp_ms: i64,
    /// Set for LogAppendTime batches, whose records all carry maxTimestamp.
    timestamp_override_ms: Option<i64>,
    record_count: i32,
    records_read: i32,
    /// Next record and end of the batch, both absolute positions in `buf`.
    at: usize,
    end: usize,
}

impl RecordReader {
    pub fn new(buf: Bytes) -> RecordReader {
        RecordReader { buf, next_batch_at: 0, batch: None, failed: false }
    }

    /// Validates the batch at `next_batch_at` and positions a cursor on its first record.
    fn open_batch(&mut self) -> Result<BatchCursor, BatchError> {
        let at = self.next_batch_at;
        let present = self.buf.len() - at;
        if present < BATCH_HEADER_BYTES {
            return Err(BatchError::Truncated { at, needed: BATCH_HEADER_BYTES, present });
        }
        let header = &self.buf[at..at + BATCH_HEADER_BYTES];
        let length = be_i32(header, LENGTH_AT);
        let minimum = BATCH_HEADER_BYTES - BATCH_LOG_OVERHEAD_BYTES;
        let Some(length_bytes) = usize::try_from(length).ok().filter(|l| *l >= minimum) else {
            return Err(BatchError::LengthTooSmall { at, length, minimum });
        };
        let magic = header[MAGIC_AT] as i8;
        if magic != BATCH_MAGIC {
            return Err(BatchError::Magic { at, magic });
        }
        let needed = BATCH_LOG_OVERHEAD_BYTES + length_bytes;
        if present < needed {
            return Err(BatchError::Truncated { at, needed, present });
        }
        let end = at + needed;
        let stored = u32::from_be_bytes(header[CRC_AT..ATTRIBUTES_AT].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&self.buf[at + ATTRIBUTES_AT..end]);
        if stored != computed {
            return Err(BatchError::Crc { at, stored, computed });
        }
        let attributes =
            i16::from_be_bytes(header[ATTRIBUTES_AT..LAST_OFFSET_DELTA_AT].try_into().expect("2"));
        let codec = attributes & COMPRESSION_MASK;
        if codec != 0 {
            return Err(BatchError::Compression { at, codec });
        }
        let max_timestamp_ms = be_i64(header, MAX_TIMESTAMP_AT);
        let mut record_count = be_i32(header, RECORD_COUNT_AT);
        if record_count < 0 {
            return Err(BatchError::RecordCount { at, claimed: record_count, present: 0 });
        }
        if attributes & CONTROL_FLAG != 0 {
            // Transaction markers carry no user data: skip their records but keep the length
            // and CRC checks above.
            record_count = 0;
        }
        Ok(BatchCursor {
            batch_at: at,
            base_offset: be_i64(header, 0),
            base_timestamp_ms: be_i64(header, BASE_TIMESTAMP_AT),
            timestamp_override_ms: (attributes & LOG_APPEND_TIME_FLAG != 0).then_some(max_timestamp_ms),
            record_count,
            records_read: 0,
            at: if record_count == 0 { end } else { at + BATCH_HEADER_BYTES },
            end,
        })
    }

    fn next_record(&mut self, cursor: &mut BatchCursor) -> Result<Record, BatchError> {
        let index = cursor.records_read;
        let malformed = |reason| BatchError::Record { at: cursor.batch_at, index, reason };
        let mut input = Input { buf: &self.buf[..cursor.end], at: cursor.at };
        let length = input.varint().ok_or_else(|| malformed("bad length varint"))?;
        let length = usize::try_from(length).map_err(|_| malformed("negative length"))?;
        if length > cursor.end - input.at {
            return Err(malformed("length runs past the batch"));
        }
        let record_end = input.at + length;
        let mut input = Input { buf: &self.buf[..record_end], at: input.at };
        input.take(1).ok_or_else(|| malformed("missing attributes"))?;
        let timestamp_delta = input.varlong().ok_or_else(|| malformed("bad timestampDelta"))?;
        let offset_delta = input.varint().ok_or_else(|| malformed("bad offsetDelta"))?;
        let key = input.bytes_field().ok_or_else(|| malformed("bad key"))?;
        let value = input.bytes_field().ok_or_else(|| malformed("bad value"))?;
        let value = value.ok_or_else(|| malformed("null value"))?;
        let headers = input.varint().ok_or_else(|| malformed("bad headers count"))?;
        if headers < 0 {
            return Err(malformed("negative headers count"));
        }
        // Every header consumes at least two bytes, so this loop is bounded by the record.
        for _ in 0..headers {
            input.bytes_field().ok_or_else(|| malformed("bad header key"))?;
            input.bytes_field().ok_or_else(|| malformed("bad header value"))?;
        }
        if input.at != record_end {
            return Err(malformed("length disagrees with the fields"));
        }
        cursor.at = record_end;
        cursor.records_read += 1;
        let timestamp_ms =
            cursor.timestamp_override_ms.unwrap_or(cursor.base_timestamp_ms.wrapping_add(timestamp_delta));
        Ok(Record {
            offset: cursor.base_offset.wrapping_add(i64::from(offset_delta)),
            timestamp_ms,
            key: key.map(|(start, end)| self.buf.slice(start..end)),
            value: self.buf.slice(value.0..value.1),
        })
    }

    fn step(&mut self) -> Option<Result<Record, BatchError>> {
        loop {
            let mut cursor = match self.batch.take() {
                Some(cursor) => cursor,
                None if self.next_batch_at == self.buf.len() => return None,
                None => match self.open_batch() {
                    Ok(cursor) => cursor,
                    Err(error) => return Some(Err(error)),
                },
            };
            self.next_batch_at = cursor.end;
            if cursor.records_read == cursor.record_count {
                if cursor.at != cursor.end {
                    let (at, index) = (cursor.batch_at, cursor.record_count);
                    return Some(Err(BatchError::Record {
                        at,
                        index,
                        reason: "bytes after the last record",
                    }));
                }
                continue;
            }
            if cursor.at == cursor.end {
                let (claimed, present) = (cursor.record_count, cursor.records_read);
                return Some(Err(BatchError::RecordCount { at: cursor.batch_at, claimed, present }));
            }
            let record = self.next_record(&mut cursor);
            self.batch = Some(cursor);
            return Some(record);
        }
    }
}

impl Iterator for RecordReader {
    type Item = Result<Record, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.step();
        if matches!(item, Some(Err(_))) {
            self.failed = true;
            self.batch = None;
        }
        item
    }
}

/// The offset after the last complete batch in `buf`, from batch headers alone (no CRC check:
/// [`RecordReader`] does that when the records are read), or `None` without a complete batch.
/// A consumer uses it to ask for the next fetch before reading this one's records.
pub fn end_offset(buf: &[u8]) -> Option<i64> {
    let mut at = 0;
    let mut end = None;
    while buf.len() - at >= BATCH_HEADER_BYTES {
        let Ok(length) = usize::try_from(be_i32(buf, at + LENGTH_AT)) else { break };
        let batch_bytes = BATCH_LOG_OVERHEAD_BYTES + length;
        if batch_bytes < BATCH_HEADER_BYTES || buf.len() - at < batch_bytes {
            break;
        }
        let last_offset_delta = be_i32(buf, at + LAST_OFFSET_DELTA_AT);
        end = Some(be_i64(buf, at).wrapping_add(i64::from(last_offset_delta)).wrapping_add(1));
        at += batch_bytes;
    }
    end
}

/// Offsets the complete batches in `buf` take (the sum of `lastOffsetDelta + 1`), from batch
/// headers alone: what a produce of `buf` moves a partition's next offset by.
pub fn offset_count(buf: &[u8]) -> i64 {
    let mut at = 0;
    let mut count = 0i64;
    while buf.len() - at >= BATCH_HEADER_BYTES {
        let Ok(length) = usize::try_from(be_i32(buf, at + LENGTH_AT)) else { break };
        let batch_bytes = BATCH_LOG_OVERHEAD_BYTES + length;
        if batch_bytes < BATCH_HEADER_BYTES || buf.len() - at < batch_bytes {
            break;
        }
        count += i64::from(be_i32(buf, at + LAST_OFFSET_DELTA_AT)) + 1;
        at += batch_bytes;
    }
    count
}

/// A bounds-checked cursor over a record's bytes. Every getter returns `None` rather than read
/// past `buf`.
struct Input<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn take(&mut self, bytes: usize) -> Option<(usize, usize)> {
        let end = self.at.checked_add(bytes).filter(|end| *end <= self.buf.len())?;
        let range = (self.at, end);
        self.at = end;
        Some(range)
    }

    fn unsigned(&mut self, bytes_max: usize) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..bytes_max {
            let byte = *self.buf.get(self.at)?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn varint(&mut self) -> Option<i32> {
        let raw = u32::try_from(self.unsigned(5)?).ok()?;
        Some((raw >> 1) as i32 ^ -((raw & 1) as i32))
    }

    fn varlong(&mut self) -> Option<i64> {
        let raw = self.unsigned(10)?;
        Some((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    /// A length-prefixed field: `Some(None)` for length -1, the byte range otherwise.
    #[allow(clippy::option_option)]
    fn bytes_field(&mut self) -> Option<Option<(usize, usize)>> {
        match self.varint()? {
            -1 => Some(None),
            length => Some(Some(self.take(usize::try_from(length).ok()?)?)),
        }
    }
}

fn be_i32(buf: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(buf[at..at + 4].try_into().expect("caller checked the header length"))
}

fn be_i64(buf: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(buf[at..at + 8].try_into().expect("caller checked the header length"))
}

fn zigzag32(value: i32) -> u32 {
    ((value << 1) ^ (value >> 31)) as u32
}

fn zigzag64(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn varint_bytes(mut value: u64) -> usize {
    let mut bytes = 1;
    while value >= 0x80 {
        value >>= 7;
        bytes += 1;
    }
    bytes
}

fn put_varint(buf: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Input = (i64, Option<Vec<u8>>, Vec<u8>);

    fn build(base_timestamp_ms: i64, records: &[Input]) -> Bytes {
        let mut builder = BatchBuilder::new(base_timestamp_ms, 0);
        let mut expected_bytes = BATCH_HEADER_BYTES;
        for (timestamp, key, value) in records {
            expected_bytes += builder.record_size_bytes(*timestamp, key.as_deref(), value);
            builder.append(*timestamp, key.as_deref(), value);
            assert_eq!(builder.size_bytes(), expected_bytes);
        }
        let batch = builder.finish();
        assert_eq!(batch.len(), expected_bytes);
        batch
    }

    fn with_base_offset(batch: &Bytes, base_offset: i64) -> Bytes {
        let mut copy = BytesMut::from(&batch[..]);
        copy[..8].copy_from_slice(&base_offset.to_be_bytes());
        copy.freeze()
    }

    #[test]
    fn header_fields_are_where_kafka_puts_them() {
        let batch =
            build(1_000, &[(1_000, None, b"a".to_vec()), (1_007, Some(b"k".to_vec()), b"b".to_vec())]);
        assert_eq!(be_i32(&batch, LENGTH_AT) as usize, batch.len() - 12);
        assert_eq!(batch[MAGIC_AT], 2);
        assert_eq!(be_i32(&batch, LAST_OFFSET_DELTA_AT), 1);
        assert_eq!(be_i64(&batch, MAX_TIMESTAMP_AT), 1_007);
        assert_eq!(be_i64(&batch, 43), -1);
        assert_eq!(be_i32(&batch, RECORD_COUNT_AT), 2);
        // First record: length 7 (zigzag 14), attributes 0, ts delta 0, offset delta 0, key -1
        // (zigzag 1), value length 1 (zigzag 2), "a", no headers.
        assert_eq!(&batch[BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + 8], &[14, 0, 0, 0, 1, 2, b'a', 0]);
    }

    #[test]
    fn corruption_is_reported_not_panicked() {
        let batch = build(5, &[(5, None, b"value".to_vec())]);
        let mut flipped = BytesMut::from(&batch[..]);
        let last = flipped.len() - 2;
        flipped[last] ^= 0xff;
        let error = RecordReader::new(flipped.freeze()).next().unwrap().unwrap_err();
        assert!(matches!(error, BatchError::Crc { at: 0, .. }), "{error}");

        let cut = batch.slice(..batch.len() - 1);
        let error = RecordReader::new(cut).next().unwrap().unwrap_err();
        assert!(matches!(error, BatchError::Truncated { at: 0, .. }), "{error}");
    }

    #[test]
    fn complete_batches_come_out_before_a_truncated_tail() {
        let first = with_base_offset(&build(0, &[(0, None, b"x".to_vec())]), 10);
        let second = with_base_offset(&build(0, &[(0, None, b"y".to_vec())]), 11);
        let mut joined = BytesMut::new();
        joined.extend_from_slice(&first);
        joined.extend_from_slice(&second[..20]);
        let joined = joined.freeze();
        assert_eq!(end_offset(&joined), Some(11), "the truncated batch does not count");
        assert_eq!(end_offset(&joined[..first.len() - 1]), None);
        let mut reader = RecordReader::new(joined);
        assert_eq!(reader.next().unwrap().unwrap().offset, 10);
        assert!(matches!(reader.next(), Some(Err(BatchError::Truncated { at, .. })) if at == first.len()));
        assert!(reader.next().is_none());
    }

    fn record_strategy() -> impl Strategy<Value = Input> {
        (
            -1_000_000i64..1_000_000,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
    }

    proptest! {
        #[test]
        fn build_then_read_round_trips(
            base_timestamp in -1_000_000i64..1_000_000,
            batches in proptest::collection::vec(proptest::collection::vec(record_strategy(), 1..20), 1..4),
        ) {
            let mut joined = BytesMut::new();
            let mut expected = Vec::new();
            let mut base_offset = 100i64;
            for records in &batches {
                joined.extend_from_slice(&with_base_offset(&build(base_timestamp, records), base_offset));
                for (i, (timestamp, key, value)) in records.iter().enumerate() {
                    expected.push((base_offset + i as i64, *timestamp, key.clone(), value.clone()));
                }
                base_offset += records.len() as i64;
            }
            let read: Vec<_> = RecordReader::new(joined.freeze())
                .map(|r| r.map(|r| (r.offset, r.timestamp_ms, r.key.map(|k| k.to_vec()), r.value.to_vec())))
                .collect::<Result<_, _>>()
                .unwrap();
            prop_assert_eq!(read, expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_reader(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = end_offset(&bytes);
            for record in RecordReader::new(Bytes::from(bytes)) {
                let _ = record;
            }
        }

        #[test]
        fn corrupted_records_with_a_valid_crc_never_panic(
            records in proptest::collection::vec(record_strategy(), 1..6),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            // Damage the records, then re-seal the CRC so the record parser itself is exercised.
            let mut batch = BytesMut::from(&build(0, &records)[..]);
            let records_bytes = batch.len() - BATCH_HEADER_BYTES;
            for (at, byte) in flips {
                batch[BATCH_HEADER_BYTES + at % records_bytes] ^= byte;
            }
            let crc = crc32c::crc32c(&batch[ATTRIBUTES_AT..]);
            batch[CRC_AT..ATTRIBUTES_AT].copy_from_slice(&crc.to_be_bytes());
            let read = RecordReader::new(batch.freeze()).count();
            prop_assert!(read <= records.len() + 1);
        }
    }
}
