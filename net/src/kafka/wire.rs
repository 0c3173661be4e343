//! The primitives Kafka's messages are made of, for the generated codecs in `messages.rs`.
//!
//! Decoding never trusts a count or a length read off the wire: a string, byte array or record
//! set longer than the bytes left in the frame, or an array with more elements than bytes left,
//! is an error before anything is allocated. Every element takes at least one byte except in
//! structs with no fields in that version, so the memory a decode can use is bounded by the
//! frame it was given. Byte arrays and record sets are zero-copy slices of the request.
//!
//! Encoding writes into a [`Writer`] that keeps large shared chunks (record batches read from the
//! log) by reference instead of copying them.

use bytes::{Buf, BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame truncated: needed {needed} more bytes, {left} left")]
    Truncated { needed: usize, left: usize },
    #[error("count or length {count} exceeds the {left} bytes left in the frame")]
    TooLong { count: u64, left: usize },
    #[error("invalid length {0}")]
    BadLength(i64),
    #[error("varint longer than 5 bytes")]
    BadVarint,
    #[error("string is not UTF-8")]
    InvalidUtf8,
    #[error("field {0} is null in a version where it may not be")]
    UnexpectedNull(&'static str),
    #[error("{0} version {1} is not supported")]
    UnsupportedVersion(&'static str, i16),
    #[error("unknown API key {0}")]
    UnknownApiKey(i16),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("field {0} is null in a version where it may not be")]
    NotNullable(&'static str),
    #[error("{0} version {1} is not supported")]
    UnsupportedVersion(&'static str, i16),
}

/// A Kafka UUID (topic ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    pub const ZERO: Uuid = Uuid([0; 16]);
}

/// A record set: concatenated RecordBatch v2 bytes, kept as the shared chunks they came in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Records(pub Vec<Bytes>);

impl Records {
    pub fn from_bytes(bytes: Bytes) -> Self {
        Records(vec![bytes])
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes as one slice, taking them out: the one chunk of a decoded request is returned
    /// as it is (not shared, so its owner may write into it); several chunks are joined.
    pub fn into_bytes(mut self) -> Bytes {
        match self.0.len() {
            0 => Bytes::new(),
            1 => self.0.pop().expect("one chunk"),
            _ => self.to_bytes(),
        }
    }

    /// The bytes as one slice; copies only when there are several chunks.
    pub fn to_bytes(&self) -> Bytes {
        match self.0.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut joined = BytesMut::with_capacity(self.len());
                for chunk in many {
                    joined.extend_from_slice(chunk);
                }
                joined.freeze()
            }
        }
    }
}

/// Reads a frame body front to back.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// What has not been read yet.
    pub fn rest(&self) -> Bytes {
        self.buf.clone()
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { needed: n, left: self.buf.len() });
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        Ok(self.i8()? != 0)
    }

    pub fn i8(&mut self) -> Result<i8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_i8())
    }

    pub fn i16(&mut self) -> Result<i16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_i16())
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_i32())
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_i64())
    }

    pub fn f64(&mut self) -> Result<f64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_f64())
    }

    pub fn uuid(&mut self) -> Result<Uuid, DecodeError> {
        let bytes = self.take(16)?;
        Ok(Uuid(bytes.as_ref().try_into().expect("16 bytes taken")))
    }

    pub fn uvarint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..5 {
            let byte = self.i8()? as u8;
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::BadVarint)
    }

    /// A length checked against the bytes left: `None` for null.
    fn length(&mut self, compact: bool, wide: bool) -> Result<Option<usize>, DecodeError> {
        let raw: i64 = if compact {
            i64::from(self.uvarint()?) - 1
        } else if wide {
            i64::from(self.i32()?)
        } else {
            i64::from(self.i16()?)
        };
        if raw == -1 {
            return Ok(None);
        }
        if raw < 0 {
            return Err(DecodeError::BadLength(raw));
        }
        if raw as u64 > self.buf.len() as u64 {
            return Err(DecodeError::TooLong { count: raw as u64, left: self.buf.len() });
        }
        Ok(Some(raw as usize))
    }

    pub fn nullable_string(&mut self, compact: bool) -> Result<Option<String>, DecodeError> {
        let Some(n) = self.length(compact, false)? else { return Ok(None) };
        let bytes = self.take(n)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        Ok(Some(text.to_owned()))
    }

    pub fn string(&mut self, compact: bool) -> Result<String, DecodeError> {
        self.nullable_string(compact)?.ok_or(DecodeError::UnexpectedNull("string"))
    }

    pub fn nullable_bytes(&mut self, compact: bool) -> Result<Option<Bytes>, DecodeError> {
        let Some(n) = self.length(compact, true)? else { return Ok(None) };
        Ok(Some(self.take(n)?))
    }

    pub fn bytes(&mut self, compact: bool) -> Result<Bytes, DecodeError> {
        self.nullable_bytes(compact)?.ok_or(DecodeError::UnexpectedNull("bytes"))
    }

    pub fn records(&mut self, compact: bool) -> Result<Option<Records>, DecodeError> {
        Ok(self.nullable_bytes(compact)?.map(Records::from_bytes))
    }

    /// An array: `None` for null. The count is checked against the bytes left before the
    /// first element is read, and capacity is reserved only for elements actually read.
    pub fn array<T>(
        &mut self,
        compact: bool,
        mut element: impl FnMut(&mut Reader) -> Result<T, DecodeError>,
    ) -> Result<Option<Vec<T>>, DecodeError> {
        let Some(count) = self.length(compact, true)? else { return Ok(None) };
        let mut items = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            items.push(element(self)?);
        }
        Ok(Some(items))
    }

    /// The tagged-field section of a flexible struct: hands each field's bytes to `field`,
    /// which ignores tags it does not know.
    pub fn tagged_fields(
        &mut self,
        mut field: impl FnMut(u32, &mut Reader) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        let count = self.uvarint()?;
        if count as usize > self.buf.len() {
            return Err(DecodeError::TooLong { count: u64::from(count), left: self.buf.len() });
        }
        for _ in 0..count {
            let tag = self.uvarint()?;
            let size = self.uvarint()? as usize;
            let mut body = Reader::new(self.take(size)?);
            field(tag, &mut body)?;
        }
        Ok(())
    }
}

/// Chunks at least this long are kept by reference instead of copied.
const SHARED_CHUNK_MIN: usize = 4096;

/// Builds a message as a list of chunks.
#[derive(Debug, Default)]
pub struct Writer {
    chunks: Vec<Bytes>,
    current: BytesMut,
}

impl Writer {
    pub fn new() -> Self {
        Writer::default()
    }

    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum::<usize>() + self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message's chunks, in order.
    pub fn finish(mut self) -> Vec<Bytes> {
        if !self.current.is_empty() {
            self.chunks.push(self.current.freeze());
        }
        self.chunks
    }

    /// The message as one buffer (copies when there are several chunks).
    pub fn into_bytes(self) -> Bytes {
        Records(self.finish()).to_bytes()
    }

    /// The buffer small writes go to, for encoders that write bytes directly.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.current
    }

    /// Appends a chunk, keeping it by reference when it is large.
    pub fn shared(&mut self, chunk: Bytes) {
        if chunk.len() < SHARED_CHUNK_MIN {
            self.current.extend_from_slice(&chunk);
            return;
        }
        if !self.current.is_empty() {
            let done = self.current.split().freeze();
            self.chunks.push(done);
        }
        self.chunks.push(chunk);
    }

    pub fn bool(&mut self, value: bool) {
        self.current.put_i8(i8::from(value));
    }

    pub fn i8(&mut self, value: i8) {
        self.current.put_i8(value);
    }

    pub fn i16(&mut self, value: i16) {
        self.current.put_i16(value);
    }

    pub fn u16(&mut self, value: u16) {
        self.current.put_u16(value);
    }

    pub fn i32(&mut self, value: i32) {
        self.current.put_i32(value);
    }

    pub fn u32(&mut self, value: u32) {
        self.current.put_u32(value);
    }

    pub fn i64(&mut self, value: i64) {
        self.current.put_i64(value);
    }

    pub fn f64(&mut self, value: f64) {
        self.current.put_f64(value);
    }

    pub fn uuid(&mut self, value: &Uuid) {
        self.current.put_slice(&value.0);
    }

    pub fn uvarint(&mut self, mut value: u32) {
        while value >= 0x80 {
            self.current.put_u8((value as u8) | 0x80);
            value >>= 7;
        }
        self.current.put_u8(value as u8);
    }

    fn length(&mut self, compact: bool, wide: bool, length: Option<usize>) {
        match (compact, length) {
            (true, None) => self.uvarint(0),
            (true, Some(n)) => self.uvarint(n as u32 + 1),
            (false, None) if wide => self.i32(-1),
            (false, None) => self.i16(-1),
            (false, Some(n)) if wide => self.i32(n as i32),
            (false, Some(n)) => self.i16(n as i16),
        }
    }

    pub fn string(&mut self, compact: bool, value: &str) {
        self.length(compact, false, Some(value.len()));
        self.current.put_slice(value.as_bytes());
    }

    pub fn nullable_string(&mut self, compact: bool, value: Option<&str>) {
        match value {
            Some(text) => self.string(compact, text),
            None => self.length(compact, false, None),
        }
    }

    pub fn bytes(&mut self, compact: bool, value: &Bytes) {
        self.length(compact, true, Some(value.len()));
        self.shared(value.clone());
    }

    pub fn nullable_bytes(&mut self, compact: bool, value: Option<&Bytes>) {
        match value {
            Some(bytes) => self.bytes(compact, bytes),
            None => self.length(compact, true, None),
        }
    }

    pub fn records(&mut self, compact: bool, value: Option<&Records>) {
        match value {
            Some(records) => {
                self.length(compact, true, Some(records.len()));
                for chunk in &records.0 {
                    self.shared(chunk.clone());
                }
            }
            None => self.length(compact, true, None),
        }
    }

    pub fn array<T>(
        &mut self,
        compact: bool,
        items: Option<&Vec<T>>,
        mut element: impl FnMut(&mut Writer, &T) -> Result<(), EncodeError>,
    ) -> Result<(), EncodeError> {
        self.length(compact, true, items.map(Vec::len));
        for item in items.into_iter().flatten() {
            element(self, item)?;
        }
        Ok(())
    }

    /// Writes a tagged-field section; `fields` are in ascending tag order.
    pub fn tagged_fields(&mut self, fields: Vec<(u32, Writer)>) {
        self.uvarint(fields.len() as u32);
        for (tag, body) in fields {
            self.uvarint(tag);
            self.uvarint(body.len() as u32);
            for chunk in body.finish() {
                self.shared(chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_beyond_the_frame_are_refused_before_allocating() {
        // An array claiming 2^31-1 elements with 3 bytes left.
        let mut r = Reader::new(Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff, 1, 2, 3]));
        let error = r.array(false, |r| r.i32()).unwrap_err();
        assert_eq!(error, DecodeError::TooLong { count: 0x7fff_ffff, left: 3 });
        // A compact string claiming 2^28 bytes.
        let mut r = Reader::new(Bytes::from_static(&[0x80, 0x80, 0x80, 0x80, 0x01, b'a']));
        assert!(matches!(r.string(true), Err(DecodeError::TooLong { .. })));
        // A varint that never ends.
        let mut r = Reader::new(Bytes::from_static(&[0xff; 6]));
        assert_eq!(r.uvarint(), Err(DecodeError::BadVarint));
    }

    #[test]
    fn primitives_round_trip() {
        let mut w = Writer::new();
        w.uvarint(300);
        w.nullable_string(true, None);
        w.string(false, "héllo");
        let big = Bytes::from(vec![7u8; 10_000]);
        w.bytes(true, &big);
        w.i64(-5);
        let chunks = w.finish();
        assert!(chunks.iter().any(|c| c.as_ptr() == big.as_ptr()), "large bytes are kept by reference");
        let mut r = Reader::new(Records(chunks).to_bytes());
        assert_eq!(r.uvarint().unwrap(), 300);
        assert_eq!(r.nullable_string(true).unwrap(), None);
        assert_eq!(r.string(false).unwrap(), "héllo");
        assert_eq!(r.bytes(true).unwrap(), big);
        assert_eq!(r.i64().unwrap(), -5);
        assert_eq!(r.remaining(), 0);
    }
}
