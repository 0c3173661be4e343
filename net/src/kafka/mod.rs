//! The Kafka wire protocol: frames, headers and the generated message codecs.
//!
//! A Kafka frame is a big-endian i32 size followed by a request (header + body) or a response
//! (header + body). The header's version follows from the API key and version: requests use
//! header v2 in an API's flexible versions and v1 before them; responses use v1 and v0, except
//! that ApiVersions responses always use v0 (a client that does not know the broker yet must
//! be able to read it).
//!
//! The message types in [`messages`] are generated from Kafka's own schema files by
//! `scripts/gen-kafka-codecs.py`; [`wire`] holds the primitives they use, which bound every
//! count and length by the bytes left in the frame.

#[allow(clippy::all, clippy::pedantic)]
#[rustfmt::skip]
pub mod messages;
pub mod wire;

use bytes::Bytes;

use messages::{request_header::RequestHeader, response_header::ResponseHeader};
pub use messages::{RequestBody, ResponseBody};
use wire::{DecodeError, EncodeError, Reader, Writer};

/// Bytes of the size prefix of every frame.
pub const FRAME_PREFIX_BYTES: usize = 4;

pub mod api {
    //! API keys.
    pub const PRODUCE: i16 = 0;
    pub const FETCH: i16 = 1;
    pub const LIST_OFFSETS: i16 = 2;
    pub const METADATA: i16 = 3;
    pub const OFFSET_COMMIT: i16 = 8;
    pub const OFFSET_FETCH: i16 = 9;
    pub const FIND_COORDINATOR: i16 = 10;
    pub const JOIN_GROUP: i16 = 11;
    pub const HEARTBEAT: i16 = 12;
    pub const LEAVE_GROUP: i16 = 13;
    pub const SYNC_GROUP: i16 = 14;
    pub const DESCRIBE_GROUPS: i16 = 15;
    pub const LIST_GROUPS: i16 = 16;
    pub const API_VERSIONS: i16 = 18;
    pub const CREATE_TOPICS: i16 = 19;
    pub const DELETE_TOPICS: i16 = 20;
    pub const INIT_PRODUCER_ID: i16 = 22;
    pub const OFFSET_FOR_LEADER_EPOCH: i16 = 23;
    pub const DESCRIBE_CONFIGS: i16 = 32;
    pub const CREATE_PARTITIONS: i16 = 37;
}

/// Kafka's error codes that Pyralog returns.
pub mod error {
    pub const NONE: i16 = 0;
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub const CORRUPT_MESSAGE: i16 = 2;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const INVALID_FETCH_SIZE: i16 = 4;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const REQUEST_TIMED_OUT: i16 = 7;
    pub const NOT_ENOUGH_REPLICAS: i16 = 19;
    pub const MESSAGE_TOO_LARGE: i16 = 10;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
    pub const RECORD_LIST_TOO_LARGE: i16 = 18;
    pub const INVALID_REQUIRED_ACKS: i16 = 21;
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    pub const INVALID_PARTITIONS: i16 = 37;
    pub const INVALID_REPLICATION_FACTOR: i16 = 38;
    pub const INVALID_REQUEST: i16 = 42;
    pub const UNSUPPORTED_FOR_MESSAGE_FORMAT: i16 = 43;
    pub const INVALID_CONFIG: i16 = 40;
    pub const NOT_CONTROLLER: i16 = 41;
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
    pub const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    pub const UNSUPPORTED_VERSION: i16 = 35;
    pub const KAFKA_STORAGE_ERROR: i16 = 56;
    pub const UNKNOWN_PRODUCER_ID: i16 = 59;
    pub const INVALID_RECORD: i16 = 87;
    pub const GROUP_ID_NOT_FOUND: i16 = 69;
    pub const FENCED_LEADER_EPOCH: i16 = 74;
    pub const UNKNOWN_LEADER_EPOCH: i16 = 75;
    pub const UNKNOWN_TOPIC_ID: i16 = 100;
}

/// What this broker implements: (API key, lowest version, highest version). Only these are
/// advertised by ApiVersions and accepted by the listener.
pub const SUPPORTED: &[(i16, i16, i16)] = &[
    // Produce v0-2 carry the legacy message formats (magic 0 and 1), which are not stored:
    // such requests are answered UNSUPPORTED_FOR_MESSAGE_FORMAT per partition. They are
    // advertised because librdkafka before 2.11.1 (kcat in Debian 12 has 2.0.2) decides that
    // a broker takes gzip, snappy and lz4 batches only if it lists Produce v0; without it those
    // clients silently send uncompressed batches.
    // Produce v10 and Fetch v16 name a partition's leader in a NOT_LEADER_OR_FOLLOWER answer
    // (KIP-951); Fetch v13+ names topics by id.
    (api::PRODUCE, 0, 10),
    (api::FETCH, 4, 16),
    (api::LIST_OFFSETS, 1, 7),
    (api::METADATA, 1, 12),
    (api::OFFSET_COMMIT, 1, 8),
    (api::OFFSET_FETCH, 1, 8),
    (api::FIND_COORDINATOR, 0, 4),
    (api::JOIN_GROUP, 0, 7),
    (api::HEARTBEAT, 0, 4),
    (api::LEAVE_GROUP, 0, 4),
    (api::SYNC_GROUP, 0, 5),
    (api::DESCRIBE_GROUPS, 0, 5),
    (api::LIST_GROUPS, 0, 4),
    (api::API_VERSIONS, 0, 4),
    (api::CREATE_TOPICS, 0, 7),
    (api::DELETE_TOPICS, 0, 6),
    (api::INIT_PRODUCER_ID, 0, 4),
    (api::OFFSET_FOR_LEADER_EPOCH, 0, 4),
    (api::DESCRIBE_CONFIGS, 0, 4),
    (api::CREATE_PARTITIONS, 0, 3),
];

pub fn supported(api_key: i16, version: i16) -> bool {
    SUPPORTED.iter().any(|&(key, low, high)| key == api_key && (low..=high).contains(&version))
}

/// The API's name as Kafka's schemas spell it (`ListOffsets`), for an API key Kafka defines.
pub fn api_name(api_key: i16) -> Option<&'static str> {
    messages::SCHEMA_VERSIONS.iter().find(|entry| entry.0 == api_key).map(|entry| entry.1)
}

/// Whether this API version uses the flexible encoding; `None` for an unknown API key.
pub fn is_flexible(api_key: i16, version: i16) -> Option<bool> {
    let &(_, _, _, _, flexible) = messages::SCHEMA_VERSIONS.iter().find(|entry| entry.0 == api_key)?;
    Some(flexible.is_some_and(|low| version >= low))
}

pub fn request_header_version(api_key: i16, version: i16) -> i16 {
    if is_flexible(api_key, version) == Some(true) {
        2
    } else {
        1
    }
}

pub fn response_header_version(api_key: i16, version: i16) -> i16 {
    if api_key != api::API_VERSIONS && is_flexible(api_key, version) == Some(true) {
        1
    } else {
        0
    }
}

/// The fixed start of every request header: enough to answer, even when the rest is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestPrefix {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

impl RequestPrefix {
    pub fn peek(frame: &[u8]) -> Option<RequestPrefix> {
        let bytes: [u8; 8] = frame.get(..8)?.try_into().ok()?;
        Some(RequestPrefix {
            api_key: i16::from_be_bytes([bytes[0], bytes[1]]),
            api_version: i16::from_be_bytes([bytes[2], bytes[3]]),
            correlation_id: i32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub header: RequestHeader,
    pub body: RequestBody,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("frame of {0} bytes is too short for a request header")]
    TooShort(usize),
    #[error("API key {0} is not supported")]
    UnknownApi(i16),
    #[error("API key {api_key} version {version} is not supported")]
    UnsupportedVersion { api_key: i16, version: i16 },
    #[error("malformed request: {0}")]
    Malformed(#[from] DecodeError),
}

/// Decodes one request frame body (without its size prefix). Only supported API versions
/// are decoded; the caller answers errors using [`RequestPrefix::peek`].
pub fn decode_request(frame: Bytes) -> Result<Request, RequestError> {
    let prefix = RequestPrefix::peek(&frame).ok_or(RequestError::TooShort(frame.len()))?;
    if is_flexible(prefix.api_key, prefix.api_version).is_none() {
        return Err(RequestError::UnknownApi(prefix.api_key));
    }
    if !supported(prefix.api_key, prefix.api_version) {
        return Err(RequestError::UnsupportedVersion {
            api_key: prefix.api_key,
            version: prefix.api_version,
        });
    }
    let mut reader = Reader::new(frame);
    let header_version = request_header_version(prefix.api_key, prefix.api_version);
    let header = RequestHeader::decode(&mut reader, header_version)?;
    let body = RequestBody::decode(prefix.api_key, prefix.api_version, &mut reader)?;
    Ok(Request { header, body })
}

/// Encodes a request frame, size prefix included (for clients and tests).
pub fn encode_request(header: &RequestHeader, body: &RequestBody) -> Result<Bytes, EncodeError> {
    let mut w = Writer::new();
    let version = header.request_api_version;
    header.encode(&mut w, request_header_version(header.request_api_key, version))?;
    body.encode(&mut w, version)?;
    let body = w.into_bytes();
    let mut frame = Vec::with_capacity(FRAME_PREFIX_BYTES + body.len());
    frame.extend_from_slice(&(body.len() as i32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame.into())
}

/// Encodes a response frame as chunks, size prefix first. Record batches in the body stay
/// shared chunks of the log's buffers.
pub fn encode_response(
    api_key: i16,
    version: i16,
    correlation_id: i32,
    body: &ResponseBody,
) -> Result<Vec<Bytes>, EncodeError> {
    let mut w = Writer::new();
    let header = ResponseHeader { correlation_id };
    header.encode(&mut w, response_header_version(api_key, version))?;
    body.encode(&mut w, version)?;
    let size = w.len() as i32;
    let mut chunks = Vec::with_capacity(4);
    chunks.push(Bytes::copy_from_slice(&size.to_be_bytes()));
    chunks.extend(w.finish());
    Ok(chunks)
}

/// Decodes a response frame body (without its size prefix), for clients and tests.
pub fn decode_response(api_key: i16, version: i16, frame: Bytes) -> Result<(i32, ResponseBody), DecodeError> {
    let mut reader = Reader::new(frame);
    let header = ResponseHeader::decode(&mut reader, response_header_version(api_key, version))?;
    let body = ResponseBody::decode(api_key, version, &mut reader)?;
    Ok((header.correlation_id, body))
}

/// The body of an ApiVersions response refusing the version asked for: error 35 and the
/// supported range of ApiVersions itself, encoded as v0 whatever was asked (so any client can
/// read it and retry with a version it finds there).
pub fn api_versions_unsupported(correlation_id: i32) -> Vec<Bytes> {
    use messages::api_versions_response::{ApiVersion, ApiVersionsResponse};
    let (_, low, high) = SUPPORTED.iter().find(|s| s.0 == api::API_VERSIONS).copied().expect("listed");
    let body = ApiVersionsResponse {
        error_code: error::UNSUPPORTED_VERSION,
        api_keys: vec![ApiVersion { api_key: api::API_VERSIONS, min_version: low, max_version: high }],
        ..Default::default()
    };
    encode_response(api::API_VERSIONS, 0, correlation_id, &ResponseBody::ApiVersions(body))
        .expect("ApiVersions v0 encodes")
}

#[cfg(test)]
mod tests;
