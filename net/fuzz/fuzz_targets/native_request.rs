//! The native protocol's request decoder (flatbuffers envelope + payload), fed arbitrary frames.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pyralog_net::codec::decode_request(&Bytes::copy_from_slice(data));
});
