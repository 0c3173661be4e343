//! Which protocol a port speaks, asked when a client's first request fails in a way a listener
//! of the other protocol causes: a Pyralog node serves its native protocol and the Kafka
//! protocol on two ports, and a client pointed at the wrong one sees only a closed connection
//! or a frame it cannot read. The probe opens a connection of its own, sends the smallest
//! request of the other protocol and looks at the answer, so the error can say which port the
//! client reached and which to use ([`ClientError::WrongProtocol`]).
//!
//! It is not a handshake: it runs only after a failure, on a fresh connection, and every wait
//! is bounded by [`PROBE_TIMEOUT`] and the caller's connect timeout. A port that answers
//! neither protocol leaves the original error as it was.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::{ClientError, Protocol};
use crate::codec::{self, Request};
use crate::kafka::{self, messages::request_header::RequestHeader, RequestBody};

/// Longest a probe waits for an answer once connected.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer a probe reads; the answers it asks for are far smaller.
const PROBE_RESPONSE_BYTES_MAX: usize = 1 << 20;
/// The client id of a probe's Kafka request: a native listener that receives it knows the
/// Kafka frame is a probe, not a misconfigured client, and does not report it.
pub const PROBE_CLIENT_ID: &str = "pyralog-probe";
/// Correlation id of a probe's request ("py"), which the answer must carry.
const PROBE_CORRELATION_ID: i32 = 0x7079;

/// After `failed`, the first request of a `wanted` client to `addr`: the error to report. A
/// disconnect or an unreadable answer is replaced by [`ClientError::WrongProtocol`] when the
/// port answers the other protocol; anything else is returned as it came.
pub(crate) fn explain(
    failed: ClientError,
    addr: SocketAddr,
    wanted: Protocol,
    connect: Duration,
) -> ClientError {
    let suspicious =
        matches!(failed, ClientError::Disconnected { .. } | ClientError::UnexpectedResponse { .. });
    if !suspicious {
        return failed;
    }
    let found = match wanted {
        Protocol::Native => Protocol::Kafka,
        Protocol::Kafka => Protocol::Native,
    };
    if speaks(addr, found, connect) {
        ClientError::WrongProtocol { addr, found }
    } else {
        failed
    }
}

/// Whether `addr` answers a request of `protocol` (a Kafka ApiVersions, or a native Metadata)
/// with a response of that protocol carrying the request's correlation id.
pub fn speaks(addr: SocketAddr, protocol: Protocol, connect: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, connect) else { return false };
    if stream.set_read_timeout(Some(PROBE_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(PROBE_TIMEOUT)).is_err()
    {
        return false;
    }
    let mut request = BytesMut::new();
    match protocol {
        Protocol::Kafka => {
            let header = RequestHeader {
                request_api_key: kafka::api::API_VERSIONS,
                request_api_version: 0,
                correlation_id: PROBE_CORRELATION_ID,
                client_id: Some(PROBE_CLIENT_ID.to_owned()),
            };
            let body = RequestBody::ApiVersions(Default::default());
            match kafka::encode_request(&header, &body) {
                Ok(frame) => request.extend_from_slice(&frame),
                Err(_) => return false,
            }
        }
        Protocol::Native => {
            let correlation_id = u64::try_from(PROBE_CORRELATION_ID).expect("a positive constant");
            codec::encode_request(correlation_id, &Request::Metadata { topics: Vec::new() }, &mut request);
        }
    }
    if stream.write_all(&request).is_err() {
        return false;
    }
    let Some(body) = read_frame(&mut stream) else { return false };
    match protocol {
        // A Kafka response opens with the correlation id of its request.
        Protocol::Kafka => body.get(..4) == Some(&PROBE_CORRELATION_ID.to_be_bytes()[..]),
        Protocol::Native => codec::decode_response(&body)
            .is_ok_and(|response| response.correlation_id == PROBE_CORRELATION_ID as u64),
    }
}

/// One frame body: both protocols open a frame with its length, 4 bytes big-endian.
fn read_frame(stream: &mut TcpStream) -> Option<Bytes> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).ok()?;
    let body_bytes = u32::from_be_bytes(prefix) as usize;
    if body_bytes > PROBE_RESPONSE_BYTES_MAX {
        return None;
    }
    let mut body = Vec::with_capacity(body_bytes.min(64 << 10));
    stream.take(body_bytes as u64).read_to_end(&mut body).ok()?;
    (body.len() == body_bytes).then(|| Bytes::from(body))
}
