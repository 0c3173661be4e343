//! The cluster wire format's decoder (node-to-node frames of every kind: handshakes, Raft
//! Messages, Requests and Responses), fed arbitrary bytes: as a whole frame, and as what
//! follows a length prefix (what the transport hands it). What decodes must encode back to
//! the same bytes: one encoding per frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pyralog_net::cluster::frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = frame::decode(Bytes::copy_from_slice(data)) {
        assert_eq!(frame::encode_to_bytes(&decoded), data, "a decoded frame encodes back to its bytes");
    }
    let _ = frame::decode_body(Bytes::copy_from_slice(data));
});
