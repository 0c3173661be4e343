use bytes::Bytes;
use proptest::prelude::*;

use super::messages::*;
use super::wire::{DecodeError, Reader, Records, Uuid, Writer};
use super::*;

fn round_trip_request(body: RequestBody, version: i16) -> RequestBody {
    let mut w = Writer::new();
    body.encode(&mut w, version).unwrap();
    let mut r = Reader::new(w.into_bytes());
    let decoded = RequestBody::decode(body.api_key(), version, &mut r).unwrap();
    assert_eq!(r.remaining(), 0, "version {version} left bytes unread");
    decoded
}

/// The 14-byte frame of the issue: Metadata v0, null client id, a topic count of 2^31-1.
const METADATA_V0_HUGE_COUNT: [u8; 18] = [
    0x00, 0x00, 0x00, 0x0e, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0xff, 0x7f, 0xff, 0xff,
    0xff,
];

#[test]
fn metadata_v0_with_an_impossible_count_is_refused_without_allocating() {
    let body = Bytes::copy_from_slice(&METADATA_V0_HUGE_COUNT[4..]);
    // Through the listener's entry point: v0 is not served, and nothing is decoded.
    assert!(matches!(
        decode_request(body.clone()),
        Err(RequestError::UnsupportedVersion { api_key: 3, version: 0 })
    ));
    // Through the decoder itself, as if v0 were served: the count is checked first.
    let mut r = Reader::new(body);
    let header = request_header::RequestHeader::decode(&mut r, 1).unwrap();
    assert_eq!(header.client_id, None);
    let error = metadata_request::MetadataRequest::decode(&mut r, 0).unwrap_err();
    assert_eq!(error, DecodeError::TooLong { count: 0x7fff_ffff, left: 0 });
}

#[test]
fn header_versions_follow_the_api_version() {
    assert_eq!(request_header_version(api::METADATA, 8), 1);
    assert_eq!(request_header_version(api::METADATA, 9), 2);
    assert_eq!(response_header_version(api::METADATA, 9), 1);
    assert_eq!(response_header_version(api::FETCH, 11), 0);
    assert_eq!(response_header_version(api::FETCH, 12), 1);
    // ApiVersions answers with header v0 even in its flexible versions.
    assert_eq!(request_header_version(api::API_VERSIONS, 3), 2);
    assert_eq!(response_header_version(api::API_VERSIONS, 3), 0);
    assert_eq!(is_flexible(99, 0), None);
}

#[test]
fn every_supported_version_is_within_the_schema() {
    for &(key, low, high) in SUPPORTED {
        let schema = SCHEMA_VERSIONS.iter().find(|s| s.0 == key).expect("schema generated");
        assert!(schema.2 <= low && high <= schema.3, "{} {low}-{high} outside its schema", schema.1);
    }
}

/// A request header as librdkafka sends it for ApiVersions v3: header v2 with a non-compact
/// client id (the header's ClientId is never flexible) and an empty tag section.
#[test]
fn api_versions_v3_request_bytes_decode() {
    let mut frame = vec![0, 18, 0, 3, 0, 0, 0, 7, 0, 7];
    frame.extend_from_slice(b"rdkafka");
    frame.push(0); // header tags
    frame.push(14); // compact string: 13 bytes
    frame.extend_from_slice(b"librdkafka-go");
    frame.push(6);
    frame.extend_from_slice(b"2.3.0");
    frame.push(0); // body tags
    let request = decode_request(Bytes::from(frame)).unwrap();
    assert_eq!(request.header.correlation_id, 7);
    assert_eq!(request.header.client_id.as_deref(), Some("rdkafka"));
    let RequestBody::ApiVersions(body) = request.body else { panic!("not ApiVersions") };
    assert_eq!(body.client_software_name, "librdkafka-go");
    assert_eq!(body.client_software_version, "2.3.0");
}

#[test]
fn unsupported_api_versions_answer_is_v0_with_error_35() {
    let chunks = api_versions_unsupported(42);
    let frame = Records(chunks).to_bytes();
    assert_eq!(i32::from_be_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
    let (correlation_id, body) = decode_response(api::API_VERSIONS, 0, frame.slice(4..)).unwrap();
    assert_eq!(correlation_id, 42);
    let ResponseBody::ApiVersions(body) = body else { panic!("not ApiVersions") };
    assert_eq!(body.error_code, error::UNSUPPORTED_VERSION);
    assert_eq!(body.api_keys.len(), 1);
}

#[test]
fn produce_records_are_zero_copy_slices_of_the_request() {
    use produce_request::*;
    let batch = Bytes::from(vec![9u8; 300]);
    let body = ProduceRequest {
        acks: -1,
        timeout_ms: 1000,
        topic_data: vec![TopicProduceData {
            name: "t".into(),
            partition_data: vec![PartitionProduceData {
                index: 2,
                records: Some(Records::from_bytes(batch.clone())),
            }],
        }],
        ..Default::default()
    };
    for version in 3..=11 {
        let header = request_header::RequestHeader {
            request_api_key: api::PRODUCE,
            request_api_version: version,
            correlation_id: 1,
            client_id: Some("c".into()),
        };
        let frame = encode_request(&header, &RequestBody::Produce(body.clone())).unwrap();
        if !supported(api::PRODUCE, version) {
            continue;
        }
        let request = decode_request(frame.slice(4..)).unwrap();
        let RequestBody::Produce(decoded) = request.body else { panic!() };
        assert_eq!(decoded, body, "version {version}");
        let records = decoded.topic_data[0].partition_data[0].records.clone().unwrap();
        let slice = &records.0[0];
        assert!(frame.as_ptr_range().contains(&slice.as_ptr()), "records point into the frame");
    }
}

#[test]
fn tagged_fields_round_trip_and_unknown_tags_are_skipped() {
    use fetch_request::*;
    let body = FetchRequest {
        cluster_id: Some("cluster".into()),
        max_wait_ms: 500,
        min_bytes: 1,
        topics: vec![FetchTopic {
            topic: "t".into(),
            partitions: vec![FetchPartition { partition: 0, fetch_offset: 5, ..Default::default() }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let decoded = round_trip_request(RequestBody::Fetch(body.clone()), 12);
    assert_eq!(decoded, RequestBody::Fetch(body.clone()));
    // An unknown tag (99) with 3 bytes of payload in the top-level tag section is ignored.
    let mut w = Writer::new();
    let mut plain = body.clone();
    plain.cluster_id = None;
    plain.encode(&mut w, 12).unwrap();
    let mut bytes = w.into_bytes().to_vec();
    assert_eq!(bytes.pop(), Some(0), "no tags were written");
    bytes.extend_from_slice(&[1, 99, 3, 1, 2, 3]);
    let decoded = FetchRequest::decode(&mut Reader::new(bytes.into()), 12).unwrap();
    assert_eq!(decoded, plain);
}

#[test]
fn null_in_a_non_nullable_version_is_refused_both_ways() {
    use metadata_request::*;
    let all_topics = MetadataRequest { topics: None, ..Default::default() };
    let mut w = Writer::new();
    assert!(all_topics.encode(&mut w, 0).is_err(), "v0 has no null topic list");
    let decoded = round_trip_request(RequestBody::Metadata(all_topics.clone()), 1);
    assert_eq!(decoded, RequestBody::Metadata(all_topics));
    let error = MetadataRequest::decode(&mut Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff])), 0);
    assert_eq!(error.unwrap_err(), DecodeError::UnexpectedNull("Topics"));
}

#[test]
fn responses_round_trip_at_every_version() {
    use metadata_response::*;
    let body = MetadataResponse {
        brokers: vec![MetadataResponseBroker {
            node_id: 0,
            host: "127.0.0.1".into(),
            port: 9092,
            rack: None,
        }],
        cluster_id: Some("pyralog".into()),
        controller_id: 0,
        topics: vec![MetadataResponseTopic {
            error_code: 0,
            name: Some("t".into()),
            topic_id: Uuid([7; 16]),
            partitions: vec![MetadataResponsePartition {
                partition_index: 1,
                leader_id: 0,
                replica_nodes: vec![0],
                isr_nodes: vec![0],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    for version in 1..=12 {
        let chunks =
            encode_response(api::METADATA, version, 3, &ResponseBody::Metadata(body.clone())).unwrap();
        let frame = Records(chunks).to_bytes();
        let (id, decoded) = decode_response(api::METADATA, version, frame.slice(4..)).unwrap();
        assert_eq!(id, 3);
        let ResponseBody::Metadata(decoded) = decoded else { panic!() };
        assert_eq!(decoded.topics[0].partitions[0].partition_index, 1, "version {version}");
        assert_eq!(decoded.brokers[0].port, 9092);
        if version >= 10 {
            assert_eq!(decoded.topics[0].topic_id, Uuid([7; 16]));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any bytes, any API key and version: the decoders return, never panic or over-allocate.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(key_index in 0usize..SCHEMA_VERSIONS.len(), version in -1i16..20, bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let key = SCHEMA_VERSIONS[key_index].0;
        let _ = RequestBody::decode(key, version, &mut Reader::new(Bytes::from(bytes.clone())));
        let _ = ResponseBody::decode(key, version, &mut Reader::new(Bytes::from(bytes.clone())));
        let mut frame = vec![0, key as u8, 0, version.max(0) as u8, 0, 0, 0, 1];
        frame.extend_from_slice(&bytes);
        let _ = decode_request(Bytes::from(frame));
    }
}
