//! The bench's message payload: a fixed header, then deterministic filler.
//!
//! ```text
//! producer u32 BE | sequence u64 BE | send_ns u64 BE | filler up to --message-bytes
//! ```
//!
//! A run's producers have consecutive ids from a random first one (`produce.rs`), so the
//! messages of several runs into one topic are told apart.
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
    let filler = &mut out[HEADER_BYTES..];
    // Eight bytes at a time: the load generator must cost the machine as little as it can,
    // since it shares the cores with the broker it measures.
    POSITIONS.with_borrow_mut(|positions| {
        let positions = position_bytes(positions, filler.len());
        let done = filler.len() - filler.len() % 8;
        for (chunk, mix) in filler.chunks_exact_mut(8).zip(positions.chunks_exact(8)) {
            let mix = u64::from_le_bytes(mix.try_into().expect("8 bytes"));
            chunk.copy_from_slice(&(seed ^ mix).to_le_bytes());
        }
        for (i, byte) in filler.iter_mut().enumerate().skip(done) {
            *byte = filler_byte(seed, i);
        }
    });
}

thread_local! {
    /// The position-dependent half of the filler, `position_byte(i)` for every position used yet.
    static POSITIONS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `table` extended to at least `len` bytes of [`position_byte`]s, as a slice of `len`.
fn position_bytes(table: &mut Vec<u8>, len: usize) -> &[u8] {
    for i in table.len()..len {
        table.push(position_byte(i));
    }
    &table[..len]
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
    let filler = &value[HEADER_BYTES..];
    POSITIONS.with_borrow_mut(|positions| {
        let positions = position_bytes(positions, filler.len());
        // Compare eight bytes at a time; look closer only inside a chunk that differs.
        let first_bad_chunk = filler.chunks(8).zip(positions.chunks(8)).position(|(chunk, mix)| {
            let mut word = [0u8; 8];
            word[..mix.len()].copy_from_slice(mix);
            let expected = (seed ^ u64::from_le_bytes(word)).to_le_bytes();
            chunk != &expected[..chunk.len()]
        })?;
        let start = first_bad_chunk * 8;
        (start..filler.len()).find(|&i| filler[i] != filler_byte(seed, i))
    })
}

fn filler_seed(producer: u32, sequence: u64) -> u64 {
    (sequence ^ (u64::from(producer) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn filler_byte(seed: u64, position: usize) -> u8 {
    // Rotating through the seed's bytes and mixing in the position changes every byte with the
    // sequence and keeps shifted data from matching.
    let lane = (seed >> ((position % 8) * 8)) as u8;
    lane ^ position_byte(position)
}

fn position_byte(position: usize) -> u8 {
    (position as u8).wrapping_mul(31) ^ (position >> 8) as u8
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

    #[test]
    fn the_fast_filler_is_the_byte_by_byte_one() {
        for len in [HEADER_BYTES, HEADER_BYTES + 7, 1024, 70_000] {
            let header = Header { producer: 1, sequence: len as u64, send_ns: 5 };
            let mut value = vec![0u8; len];
            write(&mut value, header);
            let seed = filler_seed(header.producer, header.sequence);
            let slow: Vec<u8> = (0..len - HEADER_BYTES).map(|i| filler_byte(seed, i)).collect();
            assert_eq!(&value[HEADER_BYTES..], &slow[..], "length {len}");
        }
    }
}
