//! Every Kafka request decoder, fed arbitrary bytes: the listener's entry point on whole
//! frames, then each API's body decoder at each of its schema's versions.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pyralog_net::kafka::messages::{RequestBody, SCHEMA_VERSIONS};
use pyralog_net::kafka::wire::Reader;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    let _ = pyralog_net::kafka::decode_request(frame.clone());
    if let Some((&selector, body)) = data.split_first() {
        let (key, _, low, high, _) = SCHEMA_VERSIONS[selector as usize % SCHEMA_VERSIONS.len()];
        for version in low..=high {
            let _ = RequestBody::decode(key, version, &mut Reader::new(Bytes::copy_from_slice(body)));
        }
    }
});
