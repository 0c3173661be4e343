//! The Kafka listener of the daemon on loopback, driven with Kafka requests encoded by the
//! generated codecs (the real clients are exercised by scripts/compat).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Node;
use pyralog_net::client::{BatchBuilder, IdempotentProducer, KafkaConnection, RecordReader};
use pyralog_net::kafka::messages::*;
use pyralog_net::kafka::wire::{Records, Uuid};
use pyralog_net::kafka::{api, error, RequestBody, ResponseBody};

fn connect(node: &Node) -> KafkaConnection {
    KafkaConnection::connect(&node.kafka_addr, "pyralog-test").expect("connect to the Kafka listener")
}

/// Asks for ApiVersions and checks the answer: the connection is healthy.
fn assert_serving(conn: &mut KafkaConnection) {
    let response = conn.call(3, RequestBody::ApiVersions(Default::default())).expect("ApiVersions answered");
    let ResponseBody::ApiVersions(body) = response else { panic!("not ApiVersions") };
    assert_eq!(body.error_code, error::NONE);
    let produce_max = pyralog_net::kafka::SUPPORTED.iter().find(|s| s.0 == api::PRODUCE).expect("Produce").2;
    assert_eq!(produce_max, 10, "Produce v10 carries the leader hints (KIP-951)");
    assert!(body.api_keys.iter().any(|k| k.api_key == api::PRODUCE && k.max_version == produce_max));
}

fn create_topic(conn: &mut KafkaConnection, name: &str, partitions: i32, configs: &[(&str, &str)]) -> i16 {
    use create_topics_request::*;
    let request = CreateTopicsRequest {
        topics: vec![CreatableTopic {
            name: name.to_owned(),
            num_partitions: partitions,
            replication_factor: 1,
            configs: configs
                .iter()
                .map(|(k, v)| CreatableTopicConfig { name: (*k).to_owned(), value: Some((*v).to_owned()) })
                .collect(),
            ..Default::default()
        }],
        timeout_ms: 5000,
        ..Default::default()
    };
    let ResponseBody::CreateTopics(response) = conn.call(7, RequestBody::CreateTopics(request)).unwrap()
    else {
        panic!("not CreateTopics")
    };
    response.topics[0].error_code
}

fn batch(values: &[&str], producer: Option<IdempotentProducer>) -> Bytes {
    let mut builder = BatchBuilder::new(1_700_000_000_000, 4096);
    if let Some(producer) = producer {
        builder = builder.idempotent(producer);
    }
    for value in values {
        builder.append(1_700_000_000_000, Some(b"k"), value.as_bytes());
    }
    builder.finish()
}

/// Produces one batch with acks=-1; returns (error code, base offset).
fn produce(
    conn: &mut KafkaConnection,
    version: i16,
    topic: &str,
    partition: i32,
    records: Bytes,
) -> (i16, i64) {
    use produce_request::*;
    let request = ProduceRequest {
        acks: -1,
        timeout_ms: 5000,
        topic_data: vec![TopicProduceData {
            name: topic.to_owned(),
            partition_data: vec![PartitionProduceData {
                index: partition,
                records: Some(Records::from_bytes(records)),
            }],
        }],
        ..Default::default()
    };
    let ResponseBody::Produce(response) = conn.call(version, RequestBody::Produce(request)).unwrap() else {
        panic!("not Produce")
    };
    let partition = &response.responses[0].partition_responses[0];
    (partition.error_code, partition.base_offset)
}

fn fetch_request(topic: &str, partition: i32, offset: i64, max_wait_ms: i32) -> fetch_request::FetchRequest {
    use fetch_request::*;
    FetchRequest {
        max_wait_ms,
        min_bytes: 1,
        max_bytes: 1 << 20,
        topics: vec![FetchTopic {
            topic: topic.to_owned(),
            partitions: vec![FetchPartition {
                partition,
                fetch_offset: offset,
                partition_max_bytes: 1 << 20,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn fetch(
    conn: &mut KafkaConnection,
    version: i16,
    request: fetch_request::FetchRequest,
) -> fetch_response::PartitionData {
    let ResponseBody::Fetch(response) = conn.call(version, RequestBody::Fetch(request)).unwrap() else {
        panic!("not Fetch")
    };
    response.responses[0].partitions[0].clone()
}

/// (offset, value) of every record in a fetch response's record set.
fn records_of(data: &fetch_response::PartitionData) -> Vec<(i64, String)> {
    let bytes = data.records.as_ref().map(Records::to_bytes).unwrap_or_default();
    RecordReader::new(bytes)
        .map(|r| {
            let r = r.expect("well-formed record");
            (r.offset, String::from_utf8(r.value.to_vec()).unwrap())
        })
        .collect()
}

#[test]
fn the_metadata_v0_frame_with_an_impossible_count_closes_only_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let mut healthy = connect(&node);
    assert_serving(&mut healthy);
    let mut attacker = connect(&node);
    attacker
        .send_raw(&[
            0x00, 0x00, 0x00, 0x0e, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0xff, 0x7f, 0xff,
            0xff, 0xff,
        ])
        .unwrap();
    assert!(attacker.closed_within(Duration::from_secs(10)), "the connection is closed");
    assert_serving(&mut healthy);
    assert_serving(&mut connect(&node));
}

#[test]
fn an_unknown_api_versions_version_gets_error_35_in_a_v0_body() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    // ApiVersions v99: api key 18, version 99, correlation id 5, client id "x", nothing else.
    let mut raw = std::net::TcpStream::connect(&node.kafka_addr).unwrap();
    raw.write_all(&[0, 0, 0, 11, 0, 18, 0, 99, 0, 0, 0, 5, 0, 1, b'x']).unwrap();
    let mut prefix = [0u8; 4];
    raw.read_exact(&mut prefix).unwrap();
    let mut frame = vec![0u8; u32::from_be_bytes(prefix) as usize];
    raw.read_exact(&mut frame).unwrap();
    let (correlation_id, body) =
        pyralog_net::kafka::decode_response(api::API_VERSIONS, 0, Bytes::from(frame)).expect("a v0 body");
    assert_eq!(correlation_id, 5);
    let ResponseBody::ApiVersions(body) = body else { panic!() };
    assert_eq!(body.error_code, error::UNSUPPORTED_VERSION);
    let own = body.api_keys.iter().find(|k| k.api_key == api::API_VERSIONS).expect("its own range");
    assert_eq!((own.min_version, own.max_version), (0, 4));
}

#[test]
fn bad_frames_close_only_their_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--max-request-bytes", "65536"]);
    let mut healthy = connect(&node);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown API key", vec![0, 0, 0, 10, 0x03, 0xe8, 0, 0, 0, 0, 0, 1, 0xff, 0xff]),
        ("unsupported Produce version", vec![0, 0, 0, 10, 0, 0, 0, 12, 0, 0, 0, 1, 0xff, 0xff]),
        ("frame shorter than a header", vec![0, 0, 0, 4, 0, 3, 0, 1]),
        ("negative size", vec![0xff, 0xff, 0xff, 0xf0, 1, 2, 3]),
        ("oversized frame", vec![0, 0x10, 0, 0, 0, 3, 0, 1]),
        ("garbage body", {
            let mut frame = vec![0, 0, 0, 24, 0, 3, 0, 12, 0, 0, 0, 9];
            frame.extend_from_slice(&[0xfe; 20]);
            frame
        }),
        ("truncated body", {
            // Metadata v4 claiming a 100-byte topic name in a 20-byte frame.
            let mut frame = vec![0, 0, 0, 20, 0, 3, 0, 4, 0, 0, 0, 9, 0xff, 0xff, 0, 0, 0, 1, 0, 100];
            frame.extend_from_slice(b"abcd");
            frame
        }),
    ];
    for (what, bytes) in cases {
        let mut bad = connect(&node);
        bad.send_raw(&bytes).unwrap();
        assert!(bad.closed_within(Duration::from_secs(10)), "{what}: the connection is closed");
        assert_serving(&mut healthy);
    }
}

#[test]
fn produce_fetch_and_list_offsets_at_old_and_flexible_versions() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let mut conn = connect(&node);
    assert_eq!(create_topic(&mut conn, "events", 2, &[]), error::NONE);
    assert_eq!(create_topic(&mut conn, "events", 2, &[]), error::TOPIC_ALREADY_EXISTS);
    assert_eq!(produce(&mut conn, 3, "events", 1, batch(&["a", "b", "c"], None)), (error::NONE, 0));
    assert_eq!(produce(&mut conn, 9, "events", 1, batch(&["d", "e"], None)), (error::NONE, 3));
    assert_eq!(produce(&mut conn, 9, "events", 7, batch(&["x"], None)).0, error::UNKNOWN_TOPIC_OR_PARTITION);
    // Produce v0-2 are advertised (for old librdkafka's compression check) but carry the
    // legacy message format, which is refused with a clear error.
    assert_eq!(
        produce(&mut conn, 2, "events", 1, batch(&["old"], None)).0,
        error::UNSUPPORTED_FOR_MESSAGE_FORMAT
    );
    // A corrupt batch is refused and nothing is appended.
    let mut corrupt = batch(&["bad"], None).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    assert_eq!(produce(&mut conn, 9, "events", 1, Bytes::from(corrupt)).0, error::CORRUPT_MESSAGE);

    for version in [4, 11, 12] {
        // From offset 1, inside the first batch: the whole batch comes back.
        let data = fetch(&mut conn, version, fetch_request("events", 1, 1, 0));
        assert_eq!(data.error_code, error::NONE);
        assert_eq!(data.high_watermark, 5);
        let records = records_of(&data);
        assert_eq!(records.first(), Some(&(0, "a".to_owned())), "version {version}");
        assert_eq!(records.len(), 5);
    }
    let data = fetch(&mut conn, 12, fetch_request("events", 1, 99, 0));
    assert_eq!(data.error_code, error::OFFSET_OUT_OF_RANGE);

    // The response's max_bytes: the first partition with data keeps its batch even past it;
    // the next one reports its state with no records.
    assert_eq!(produce(&mut conn, 9, "events", 0, batch(&["p0"], None)), (error::NONE, 0));
    let mut both = fetch_request("events", 0, 0, 0);
    both.max_bytes = 1;
    let partition_one = fetch_request("events", 1, 0, 0).topics[0].partitions[0].clone();
    both.topics[0].partitions.push(partition_one);
    let ResponseBody::Fetch(response) = conn.call(12, RequestBody::Fetch(both)).unwrap() else { panic!() };
    let partitions = &response.responses[0].partitions;
    assert_eq!(records_of(&partitions[0]), vec![(0, "p0".to_owned())]);
    assert_eq!((partitions[1].error_code, partitions[1].high_watermark), (error::NONE, 5));
    assert!(records_of(&partitions[1]).is_empty(), "no room left for partition 1");

    // A batch whose records are 10 ms apart, to look up by time inside it.
    let mut spread = BatchBuilder::new(1_750_000_000_000, 4096);
    for (i, value) in ["t0", "t10", "t20"].iter().enumerate() {
        spread.append(1_750_000_000_000 + 10 * i as i64, None, value.as_bytes());
    }
    assert_eq!(produce(&mut conn, 9, "events", 1, spread.finish()), (error::NONE, 5));

    use list_offsets_request::*;
    let cases = [
        (-2, 0, -1),
        (-1, 8, -1),
        // MAX_TIMESTAMP (v7): the record holding the largest timestamp.
        (-3, 7, 1_750_000_000_020),
        (1_600_000_000_000, 0, 1_700_000_000_000),
        (1_750_000_000_015, 7, 1_750_000_000_020),
        (1_800_000_000_000, -1, -1),
    ];
    for (timestamp, expected, expected_timestamp) in cases {
        let request = ListOffsetsRequest {
            replica_id: -1,
            topics: vec![ListOffsetsTopic {
                name: "events".into(),
                partitions: vec![ListOffsetsPartition {
                    partition_index: 1,
                    timestamp,
                    ..Default::default()
                }],
            }],
            ..Default::default()
        };
        for version in [1, 7] {
            let ResponseBody::ListOffsets(response) =
                conn.call(version, RequestBody::ListOffsets(request.clone())).unwrap()
            else {
                panic!()
            };
            let partition = &response.topics[0].partitions[0];
            if timestamp == -3 && version < 7 {
                assert_eq!(partition.error_code, error::UNSUPPORTED_VERSION, "MAX_TIMESTAMP needs v7");
                continue;
            }
            assert_eq!(partition.error_code, error::NONE);
            assert_eq!(partition.offset, expected, "timestamp {timestamp} version {version}");
            assert_eq!(partition.timestamp, expected_timestamp, "timestamp {timestamp} version {version}");
        }
    }
}

#[test]
fn a_long_poll_fetch_is_woken_by_a_produce_and_survives_a_topic_delete() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let mut conn = connect(&node);
    assert_eq!(create_topic(&mut conn, "tail", 1, &[]), error::NONE);
    let addr = node.kafka_addr.clone();
    let waiter = std::thread::spawn(move || {
        let mut conn = KafkaConnection::connect(&addr, "waiter").unwrap();
        let started = Instant::now();
        let data = fetch(&mut conn, 12, fetch_request("tail", 0, 0, 20_000));
        (started.elapsed(), records_of(&data))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(produce(&mut conn, 9, "tail", 0, batch(&["wake"], None)), (error::NONE, 0));
    let (waited, records) = waiter.join().unwrap();
    assert_eq!(records, vec![(0, "wake".to_owned())]);
    assert!(waited < Duration::from_secs(15), "woken by the produce, not the 20 s deadline: {waited:?}");

    // min_bytes: a fetch asking for more than one small batch waits for a second one.
    let addr = node.kafka_addr.clone();
    let waiter = std::thread::spawn(move || {
        let mut conn = KafkaConnection::connect(&addr, "waiter").unwrap();
        let mut request = fetch_request("tail", 0, 0, 20_000);
        request.min_bytes = 100; // one batch here is about 70 bytes
        let started = Instant::now();
        let data = fetch(&mut conn, 12, request);
        (started.elapsed(), records_of(&data).len())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(produce(&mut conn, 9, "tail", 0, batch(&["more"], None)), (error::NONE, 1));
    let (waited, records) = waiter.join().unwrap();
    assert_eq!(records, 2, "both batches, once there were min_bytes of them");
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(15), "{waited:?}");

    // A long-poll at the end of a topic that is then deleted ends, and the node serves on.
    let addr = node.kafka_addr.clone();
    let waiter = std::thread::spawn(move || {
        let mut conn = KafkaConnection::connect(&addr, "waiter").unwrap();
        fetch(&mut conn, 12, fetch_request("tail", 0, 2, 10_000)).error_code
    });
    std::thread::sleep(Duration::from_millis(300));
    let request = delete_topics_request::DeleteTopicsRequest {
        topic_names: vec!["tail".into()],
        timeout_ms: 5000,
        ..Default::default()
    };
    let ResponseBody::DeleteTopics(deleted) = conn.call(5, RequestBody::DeleteTopics(request)).unwrap()
    else {
        panic!()
    };
    assert_eq!(deleted.responses[0].error_code, error::NONE);
    assert_eq!(waiter.join().unwrap(), error::UNKNOWN_TOPIC_OR_PARTITION);
    assert_serving(&mut conn);
    assert_eq!(create_topic(&mut conn, "tail", 1, &[]), error::NONE);
    let data = fetch(&mut conn, 12, fetch_request("tail", 0, 0, 0));
    assert_eq!((data.error_code, data.high_watermark), (error::NONE, 0), "a re-created topic starts empty");
}

#[test]
fn idempotent_batches_are_appended_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let mut conn = connect(&node);
    assert_eq!(create_topic(&mut conn, "idem", 1, &[]), error::NONE);
    let ResponseBody::InitProducerId(init) = conn
        .call(
            1,
            RequestBody::InitProducerId(init_producer_id_request::InitProducerIdRequest {
                transactional_id: None,
                transaction_timeout_ms: 60_000,
                ..Default::default()
            }),
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(init.error_code, error::NONE);
    assert!(init.producer_id >= 0);
    let producer = |epoch, base_sequence| {
        Some(IdempotentProducer { producer_id: init.producer_id, epoch, base_sequence })
    };
    let first = batch(&["a", "b"], producer(0, 0));
    assert_eq!(produce(&mut conn, 9, "idem", 0, first.clone()), (error::NONE, 0));
    assert_eq!(
        produce(&mut conn, 9, "idem", 0, first.clone()),
        (error::NONE, 0),
        "a retry gets the first offsets"
    );
    let gap = batch(&["c"], producer(0, 5));
    assert_eq!(produce(&mut conn, 9, "idem", 0, gap).0, error::OUT_OF_ORDER_SEQUENCE_NUMBER);
    let second = batch(&["c"], producer(0, 2));
    assert_eq!(produce(&mut conn, 9, "idem", 0, second.clone()), (error::NONE, 2));
    drop(conn);
    assert!(node.terminate().success());

    let node = Node::start(dir.path(), &[]);
    let mut conn = connect(&node);
    assert_eq!(produce(&mut conn, 9, "idem", 0, second), (error::NONE, 2), "state rebuilt from the log");
    let third = batch(&["d"], producer(0, 3));
    assert_eq!(produce(&mut conn, 9, "idem", 0, third), (error::NONE, 3));
    let bumped = batch(&["e"], producer(1, 0));
    assert_eq!(produce(&mut conn, 9, "idem", 0, bumped), (error::NONE, 4));
    let fenced = batch(&["f"], producer(0, 4));
    assert_eq!(produce(&mut conn, 9, "idem", 0, fenced).0, error::INVALID_PRODUCER_EPOCH);
    let values: Vec<String> = records_of(&fetch(&mut conn, 12, fetch_request("idem", 0, 0, 0)))
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(values, ["a", "b", "c", "d", "e"]);
}

#[test]
fn topic_configs_partitions_and_auto_creation() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let mut conn = connect(&node);
    assert_eq!(create_topic(&mut conn, "small", 1, &[("max.message.bytes", "200")]), error::NONE);
    assert_eq!(create_topic(&mut conn, "odd", 1, &[("no.such.config", "1")]), error::INVALID_CONFIG);
    assert_eq!(produce(&mut conn, 9, "small", 0, batch(&["tiny"], None)).0, error::NONE);
    let big = "x".repeat(300);
    assert_eq!(produce(&mut conn, 9, "small", 0, batch(&[&big], None)).0, error::MESSAGE_TOO_LARGE);

    use describe_configs_request::*;
    let request = DescribeConfigsRequest {
        resources: vec![DescribeConfigsResource {
            resource_type: 2,
            resource_name: "small".into(),
            configuration_keys: None,
        }],
        ..Default::default()
    };
    let ResponseBody::DescribeConfigs(described) =
        conn.call(4, RequestBody::DescribeConfigs(request)).unwrap()
    else {
        panic!()
    };
    let configs = &described.results[0].configs;
    let value = |name: &str| configs.iter().find(|c| c.name == name).and_then(|c| c.value.clone());
    assert_eq!(value("max.message.bytes").as_deref(), Some("200"));
    assert_eq!(value("cleanup.policy").as_deref(), Some("delete"));

    use create_partitions_request::*;
    let grow = |count| CreatePartitionsRequest {
        topics: vec![CreatePartitionsTopic { name: "small".into(), count, assignments: None }],
        timeout_ms: 5000,
        validate_only: false,
    };
    let ResponseBody::CreatePartitions(grown) = conn.call(3, RequestBody::CreatePartitions(grow(3))).unwrap()
    else {
        panic!()
    };
    assert_eq!(grown.results[0].error_code, error::NONE);
    let ResponseBody::CreatePartitions(shrunk) =
        conn.call(3, RequestBody::CreatePartitions(grow(2))).unwrap()
    else {
        panic!()
    };
    assert_eq!(shrunk.results[0].error_code, error::INVALID_PARTITIONS);
    assert_eq!(produce(&mut conn, 9, "small", 2, batch(&["new"], None)), (error::NONE, 0));

    // Metadata for a missing topic creates it (on by default), with a real topic id.
    use metadata_request::*;
    let request = MetadataRequest {
        topics: Some(vec![MetadataRequestTopic { name: Some("auto".into()), ..Default::default() }]),
        allow_auto_topic_creation: true,
        ..Default::default()
    };
    let ResponseBody::Metadata(metadata) = conn.call(12, RequestBody::Metadata(request)).unwrap() else {
        panic!()
    };
    let topic = &metadata.topics[0];
    assert_eq!(topic.error_code, error::NONE);
    assert_eq!(topic.partitions.len(), 1);
    assert_ne!(topic.topic_id.0, [0; 16]);
    // Every shard is a broker of its own; a partition's leader is the shard that owns it, and
    // its port serves Kafka requests.
    assert_eq!(metadata.brokers.iter().map(|b| b.node_id).collect::<Vec<_>>(), vec![0, 1]);
    assert!(topic.partitions.iter().all(|p| p.leader_id == 0 || p.leader_id == 1));
    for broker in &metadata.brokers {
        assert_eq!(broker.host, "127.0.0.1");
        let mut direct =
            KafkaConnection::connect(&format!("{}:{}", broker.host, broker.port), "direct").unwrap();
        assert_serving(&mut direct);
    }
    // The coordinator of a group is the shard of its offsets log, at that shard's port.
    use find_coordinator_request::FindCoordinatorRequest;
    let request = FindCoordinatorRequest { key: "some-group".into(), key_type: 0, ..Default::default() };
    let ResponseBody::FindCoordinator(found) = conn.call(3, RequestBody::FindCoordinator(request)).unwrap()
    else {
        panic!()
    };
    let expected = (pyralog_shard::group_log_of("some-group") % 2) as i32;
    assert_eq!((found.error_code, found.node_id), (error::NONE, expected));
    assert_eq!(found.port, metadata.brokers[expected as usize].port);
}

#[test]
fn fetch_and_delete_topics_find_a_topic_by_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let mut conn = connect(&node);
    let id_of = |conn: &mut KafkaConnection, name: &str| {
        use metadata_request::*;
        let request = MetadataRequest {
            topics: Some(vec![MetadataRequestTopic { name: Some(name.into()), ..Default::default() }]),
            ..Default::default()
        };
        let ResponseBody::Metadata(metadata) = conn.call(12, RequestBody::Metadata(request)).unwrap() else {
            panic!("not Metadata")
        };
        metadata.topics[0].topic_id
    };
    let by_id = |id: Uuid| {
        let mut request = fetch_request("", 0, 0, 0);
        request.topics[0].topic_id = id;
        request
    };
    let delete = |conn: &mut KafkaConnection, id: Uuid| {
        use delete_topics_request::*;
        let request = DeleteTopicsRequest {
            topics: vec![DeleteTopicState { name: None, topic_id: id }],
            timeout_ms: 5000,
            ..Default::default()
        };
        let ResponseBody::DeleteTopics(response) = conn.call(6, RequestBody::DeleteTopics(request)).unwrap()
        else {
            panic!("not DeleteTopics")
        };
        let result = &response.responses[0];
        (result.error_code, result.name.clone())
    };
    assert_eq!(create_topic(&mut conn, "keyed", 1, &[]), error::NONE);
    assert_eq!(create_topic(&mut conn, "other", 1, &[]), error::NONE);
    assert_eq!(produce(&mut conn, 9, "keyed", 0, batch(&["a", "b"], None)), (error::NONE, 0));
    let first = id_of(&mut conn, "keyed");
    let data = fetch(&mut conn, 13, by_id(first));
    assert_eq!(data.error_code, error::NONE);
    assert_eq!(records_of(&data), vec![(0, "a".to_owned()), (1, "b".to_owned())]);
    assert_eq!(fetch(&mut conn, 13, by_id(Uuid([7; 16]))).error_code, error::UNKNOWN_TOPIC_ID);

    // Deleted by id, then created again under the same name: a new id, and the old one names
    // nothing, in either request.
    assert_eq!(delete(&mut conn, first), (error::NONE, Some("keyed".to_owned())));
    assert_eq!(delete(&mut conn, first).0, error::UNKNOWN_TOPIC_OR_PARTITION);
    assert_eq!(create_topic(&mut conn, "keyed", 1, &[]), error::NONE);
    let second = id_of(&mut conn, "keyed");
    assert_ne!(second, first);
    assert_eq!(fetch(&mut conn, 13, by_id(first)).error_code, error::UNKNOWN_TOPIC_ID);
    let data = fetch(&mut conn, 13, by_id(second));
    assert_eq!((data.error_code, data.high_watermark), (error::NONE, 0));
    let other = id_of(&mut conn, "other");
    assert_eq!(delete(&mut conn, other), (error::NONE, Some("other".to_owned())));
}

#[test]
fn auto_creation_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--auto-create-topics=false"]);
    let mut conn = connect(&node);
    assert_eq!(produce(&mut conn, 9, "missing", 0, batch(&["a"], None)).0, error::UNKNOWN_TOPIC_OR_PARTITION);
    use metadata_request::*;
    let request = MetadataRequest {
        topics: Some(vec![MetadataRequestTopic { name: Some("missing".into()), ..Default::default() }]),
        allow_auto_topic_creation: true,
        ..Default::default()
    };
    let ResponseBody::Metadata(metadata) = conn.call(9, RequestBody::Metadata(request)).unwrap() else {
        panic!()
    };
    assert_eq!(metadata.topics[0].error_code, error::UNKNOWN_TOPIC_OR_PARTITION);
}

#[test]
fn transactional_producers_are_refused_with_an_error_clients_do_not_retry() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let mut conn = connect(&node);
    let find = |conn: &mut KafkaConnection, version: i16| {
        let request = find_coordinator_request::FindCoordinatorRequest {
            key: "payments".to_owned(),
            key_type: 1,
            coordinator_keys: vec!["payments".to_owned()],
        };
        let response = conn.call(version, RequestBody::FindCoordinator(request)).unwrap();
        let ResponseBody::FindCoordinator(body) = response else { panic!("not FindCoordinator") };
        body
    };
    // v1-3 carry the error in the body, v4 and later per key.
    let v2 = find(&mut conn, 2);
    assert_eq!(v2.error_code, error::TRANSACTIONAL_ID_AUTHORIZATION_FAILED);
    assert!(v2.error_message.unwrap().contains("transactions are not supported"));
    let v4 = find(&mut conn, 4);
    assert_eq!(v4.coordinators.len(), 1);
    assert_eq!(v4.coordinators[0].error_code, error::TRANSACTIONAL_ID_AUTHORIZATION_FAILED);
    assert!(v4.coordinators[0].error_message.as_deref().unwrap().contains("transactions are not supported"));

    let request = init_producer_id_request::InitProducerIdRequest {
        transactional_id: Some("payments".to_owned()),
        transaction_timeout_ms: 60_000,
        ..Default::default()
    };
    let response = conn.call(4, RequestBody::InitProducerId(request)).unwrap();
    let ResponseBody::InitProducerId(init) = response else { panic!("not InitProducerId") };
    assert_eq!(init.error_code, error::TRANSACTIONAL_ID_AUTHORIZATION_FAILED);
    assert_eq!(init.producer_id, -1);
}

/// OffsetForLeaderEpoch at `version` for one partition: (error, leader epoch, end offset).
fn end_of_epoch(
    conn: &mut KafkaConnection,
    version: i16,
    topic: &str,
    partition: i32,
    current_leader_epoch: i32,
    leader_epoch: i32,
) -> (i16, i32, i64) {
    use offset_for_leader_epoch_request::*;
    let request = OffsetForLeaderEpochRequest {
        replica_id: -1,
        topics: vec![OffsetForLeaderTopic {
            topic: topic.to_owned(),
            partitions: vec![OffsetForLeaderPartition { partition, current_leader_epoch, leader_epoch }],
        }],
    };
    let response = conn.call(version, RequestBody::OffsetForLeaderEpoch(request)).unwrap();
    let ResponseBody::OffsetForLeaderEpoch(body) = response else { panic!("not OffsetForLeaderEpoch") };
    let p = &body.topics[0].partitions[0];
    (p.error_code, p.leader_epoch, p.end_offset)
}

#[test]
fn a_single_node_partition_is_in_epoch_zero_for_every_api() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let mut conn = connect(&node);
    assert_eq!(create_topic(&mut conn, "epochs", 1, &[]), error::NONE);
    assert_eq!(produce(&mut conn, 9, "epochs", 0, batch(&["a", "b", "c"], None)), (error::NONE, 0));

    // Metadata and the stored batches say epoch 0.
    let request = metadata_request::MetadataRequest {
        topics: Some(vec![metadata_request::MetadataRequestTopic {
            name: Some("epochs".to_owned()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let ResponseBody::Metadata(metadata) = conn.call(12, RequestBody::Metadata(request)).unwrap() else {
        panic!("not Metadata")
    };
    assert_eq!(metadata.topics[0].partitions[0].leader_epoch, 0);
    let data = fetch(&mut conn, 12, fetch_request("epochs", 0, 0, 0));
    let stored = data.records.as_ref().map(Records::to_bytes).unwrap();
    assert_eq!(pyralog_dma::batch::stored_header(&stored).unwrap().leader_epoch, 0);

    // OffsetForLeaderEpoch: epoch 0 runs to the log's end at every version; later epochs are
    // unknown (-1, -1); v3+ takes a consumer's replica id; v0 carries no epoch back.
    for version in 0..=4 {
        let epoch = if version == 0 { -1 } else { 0 };
        assert_eq!(
            end_of_epoch(&mut conn, version, "epochs", 0, -1, 0),
            (error::NONE, epoch, 3),
            "v{version}"
        );
        assert_eq!(end_of_epoch(&mut conn, version, "epochs", 0, -1, 1), (error::NONE, -1, -1), "v{version}");
    }
    assert_eq!(end_of_epoch(&mut conn, 4, "epochs", 0, 0, 0), (error::NONE, 0, 3));
    assert_eq!(end_of_epoch(&mut conn, 4, "epochs", 0, 1, 0).0, error::UNKNOWN_LEADER_EPOCH);
    assert_eq!(end_of_epoch(&mut conn, 4, "epochs", 9, -1, 0).0, error::UNKNOWN_TOPIC_OR_PARTITION);
    assert_eq!(end_of_epoch(&mut conn, 4, "missing", 0, -1, 0).0, error::UNKNOWN_TOPIC_OR_PARTITION);

    // Fetch v9+ and ListOffsets v4+ check current_leader_epoch: 0 passes, 1 is unknown.
    let mut fenced = fetch_request("epochs", 0, 0, 0);
    fenced.topics[0].partitions[0].current_leader_epoch = 1;
    assert_eq!(fetch(&mut conn, 12, fenced.clone()).error_code, error::UNKNOWN_LEADER_EPOCH);
    fenced.topics[0].partitions[0].current_leader_epoch = 0;
    assert_eq!(fetch(&mut conn, 12, fenced).error_code, error::NONE);
    let list = |conn: &mut KafkaConnection, current_leader_epoch: i32| {
        use list_offsets_request::*;
        let request = ListOffsetsRequest {
            replica_id: -1,
            topics: vec![ListOffsetsTopic {
                name: "epochs".to_owned(),
                partitions: vec![ListOffsetsPartition {
                    partition_index: 0,
                    current_leader_epoch,
                    timestamp: -1,
                    ..Default::default()
                }],
            }],
            ..Default::default()
        };
        let ResponseBody::ListOffsets(body) = conn.call(7, RequestBody::ListOffsets(request)).unwrap() else {
            panic!("not ListOffsets")
        };
        let p = &body.topics[0].partitions[0];
        (p.error_code, p.offset, p.leader_epoch)
    };
    assert_eq!(list(&mut conn, 0), (error::NONE, 3, 0));
    assert_eq!(list(&mut conn, 1).0, error::UNKNOWN_LEADER_EPOCH);
}
