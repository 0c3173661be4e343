//! The cluster wire format's decoder (node-to-node frames), fed arbitrary bytes: as a whole
//! frame, and as what follows a length prefix (what the transport hands it).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pyralog_net::cluster::frame;

fuzz_target!(|data: &[u8]| {
    let _ = frame::decode(Bytes::copy_from_slice(data));
    let _ = frame::decode_body(Bytes::copy_from_slice(data));
});
