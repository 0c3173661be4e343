//! Decoding a cluster frame allocates in proportion to the frame's own length, whatever a
//! count or length inside it says: a counting allocator measures every decode of arbitrary and
//! mutated frames (Messages, Requests and Responses).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use proptest::prelude::*;
use pyralog_net::cluster::frame::{self, Frame, GroupKey};
use pyralog_replication::epoch::EpochStart;
use pyralog_replication::{Append, AppendResponse, Body, Message};

/// Bytes allocated by this thread while `COUNTING` is set.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the counters are plain
// thread-local cells without destructors, so they never allocate or run during teardown.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size.saturating_sub(layout.size()));
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count(bytes: usize) {
    let _ = COUNTING.try_with(|counting| {
        if counting.get() {
            ALLOCATED.with(|allocated| allocated.set(allocated.get() + bytes));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What decoding `frame` allocated.
fn allocated_by_decode(frame: &Bytes) -> usize {
    ALLOCATED.with(|allocated| allocated.set(0));
    COUNTING.with(|counting| counting.set(true));
    let decoded = frame::decode(frame.clone());
    COUNTING.with(|counting| counting.set(false));
    drop(decoded);
    ALLOCATED.with(Cell::get)
}

/// A decoded frame holds at most this many bytes of memory per byte of frame: a message
/// without fields (33 bytes on the wire) becomes an entry of `size_of::<(GroupKey, Message)>()`
/// (112 bytes since appends carry a sequence and their answers a disk id).
const ALLOCATED_PER_FRAME_BYTE_MAX: usize = 4;

fn check(frame: &Bytes) -> Result<(), TestCaseError> {
    let allocated = allocated_by_decode(frame);
    prop_assert!(
        allocated <= ALLOCATED_PER_FRAME_BYTE_MAX * frame.len(),
        "decoding {} bytes allocated {allocated}",
        frame.len()
    );
    Ok(())
}

fn sample_entries() -> Vec<(GroupKey, Message)> {
    let batch = Bytes::from(pyralog_replication::batch::build(&[(None, b"value")], 0, 0));
    let key = GroupKey { topic_id: [0; 16], partition: 3 };
    let bodies = [
        Body::TermQuery { disk_id: 7 },
        Body::Vote { last_epoch: 1, log_end: 2, transfer: false },
        Body::Append(Append {
            prev_end: 0,
            prev_epoch: -1,
            commit_end: 0,
            log_start: 0,
            seq: 5,
            batches: vec![batch.clone(), batch],
        }),
        Body::AppendResponse(AppendResponse {
            accepted: false,
            match_end: 0,
            acked_end: 0,
            log_end: 9,
            epochs: vec![EpochStart { epoch: 1, start_offset: 0 }; 3],
            recovering: false,
            seq: 5,
            disk_id: 3,
        }),
    ];
    bodies.into_iter().map(|body| (key, Message { from: 1, to: 2, term: 3, body })).collect()
}

#[test]
fn the_densest_valid_frame_stays_within_the_bound() {
    assert!(std::mem::size_of::<(GroupKey, Message)>() <= ALLOCATED_PER_FRAME_BYTE_MAX * 33);
    let (key, mut densest) = sample_entries()[0].clone();
    densest.body = Body::TimeoutNow;
    let entries = vec![(key, densest); 10_000];
    let frame = frame::encode_to_bytes(&Frame::Messages(entries));
    check(&frame).unwrap();
    let entries_bytes = 10_000 * std::mem::size_of::<(GroupKey, Message)>();
    assert!(allocated_by_decode(&frame) >= entries_bytes, "the allocator counts what decoding takes");
}

proptest! {
    #[test]
    fn arbitrary_bytes_allocate_within_the_bound(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&Bytes::from(bytes))?;
    }

    /// Valid frames with bytes changed and the CRC made right again, so that forged counts and
    /// lengths reach the decoder.
    #[test]
    fn mutated_frames_allocate_within_the_bound(
        kind in 0..3usize,
        picks in prop::collection::vec(0..4usize, 0..20),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let samples = sample_entries();
        let entries = picks.iter().map(|&pick| samples[pick].clone()).collect();
        let body = Bytes::from(vec![b'j'; 10 * picks.len()]);
        let frame = match kind {
            0 => Frame::Messages(entries),
            1 => Frame::Request { id: 3, reply_to: "127.0.0.1:9093".parse().unwrap(), body },
            _ => Frame::Response { id: 3, body },
        };
        let mut bytes = frame::encode_to_bytes(&frame).to_vec();
        for (at, value) in flips {
            let at = 8 + at.index(bytes.len() - 8);
            bytes[at] = value;
        }
        let crc = crc32c::crc32c(&bytes[8..]);
        bytes[4..8].copy_from_slice(&crc.to_be_bytes());
        check(&Bytes::from(bytes))?;
    }
}
