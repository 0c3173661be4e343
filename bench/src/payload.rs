//! The bench's message payload: a fixed header, then deterministic filler.
//!
//! ```text
//! producer u32 BE | sequence u64 BE | send_ns u64 BE | filler up to --message-bytes
//! ```
//!
//! `send_ns` is nanoseconds since the run's start instant: the *intended* send time when the
//! run is rate-limited, the enqueue time otherwise, so an end-to-end latency taken in the same
//! process uses one clock. The filler is a function of (producer, sequence, position), so a
//! verifier can check every byte without knowing the producer's run.

/// Bytes of the header; the smallest payload.
pub const HEADER_BYTES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub producer: u32,
    pub sequence: u64,
    pub send_ns: u64,
}

/// Fills `out` (whose length is the message size, at least [`HEADER_BYTES`]).
pub fn write(out: &mut [u8], header: Header) {
    assert!(out.len() >= HEADER_BYTES, "payloads hold at least the header");
    out[..4].copy_from_slice(&header.producer.to_be_bytes());
    out[4..12].copy_from_slice(&header.sequence.to_be_bytes());
    out[12..20].copy_from_slice(&header.send_ns.to_be_bytes());
    let seed = filler_seed(header.producer, header.sequence);
    for (i, byte) in out[HEADER_BYTES..].iter_mut().enumerate() {
        *byte = filler_byte(seed, i);
    }
}

/// Reads the header, or `None` for a payload too short to hold one.
pub fn header(value: &[u8]) -> Option<Header> {
    let bytes: &[u8; HEADER_BYTES] = value.get(..HEADER_BYTES)?.try_into().ok()?;
    Some(Header {
        producer: u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")),
        sequence: u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes")),
        send_ns: u64::from_be_bytes(bytes[12..20].try_into().expect("8 bytes")),
    })
}

/// The first position where the filler differs from what the header implies.
pub fn filler_mismatch(value: &[u8], header: Header) -> Option<usize> {
    let seed = filler_seed(header.producer, header.sequence);
    value[HEADER_BYTES..].iter().enumerate().position(|(i, byte)| *byte != filler_byte(seed, i))
}

fn filler_seed(producer: u32, sequence: u64) -> u64 {
    (sequence ^ (u64::from(producer) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn filler_byte(seed: u64, position: usize) -> u8 {
    // Rotating through the seed's bytes and mixing in the position changes every byte with the
    // sequence and keeps shifted data from matching.
    let lane = (seed >> ((position % 8) * 8)) as u8;
    lane ^ (position as u8).wrapping_mul(31) ^ (position >> 8) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let header = Header { producer: 3, sequence: 987_654, send_ns: 42 };
        let mut value = vec![0u8; 300];
        write(&mut value, header);
        assert_eq!(super::header(&value), Some(header));
        assert_eq!(filler_mismatch(&value, header), None);
        value[200] ^= 1;
        assert_eq!(filler_mismatch(&value, header), Some(180));
        let other = Header { sequence: 987_655, ..header };
        assert!(filler_mismatch(&value, other).is_some());
        assert_eq!(super::header(&value[..19]), None);
    }
}
