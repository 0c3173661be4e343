//! The daemon on loopback, driven through its real interfaces: the `pyralog` binary, the native
//! protocol and the client library.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::Node;
use pyralog_net::client::{BatchBuilder, Client, ClientError, Consumer, RecordReader, StartAt};
use pyralog_net::codec::{
    self, Acks, ErrorCode, FetchPartition, FetchRequest, ProducePartition, ProduceRequest, Request, Response,
};

fn batch(values: &[String]) -> Bytes {
    let mut builder = BatchBuilder::new(1_700_000_000_000, 1024);
    for value in values {
        builder.append(1_700_000_000_000, Some(b"key"), value.as_bytes());
    }
    builder.finish()
}

fn values(tag: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{tag}-{i:05}")).collect()
}

/// Every record of a partition from offset 0, as (offset, value).
fn read_partition(client: &Client, topic: &str, partition: u32) -> Vec<(i64, String)> {
    read_partition_from(client, topic, partition, 0, i64::MAX)
}

/// The records of a partition from `from` on, as (offset, value), in fetches of 1 MiB until
/// one returns nothing or the offset reaches `stop`.
fn read_partition_from(
    client: &Client,
    topic: &str,
    partition: u32,
    from: i64,
    stop: i64,
) -> Vec<(i64, String)> {
    let mut records = Vec::new();
    let mut offset = from;
    loop {
        let fetched = client.fetch(topic, partition, offset, 1 << 20, 0).expect("fetch");
        if fetched.records.is_empty() || offset >= stop {
            return records;
        }
        for record in fetched.reader() {
            let record = record.expect("fetched batches pass their CRC");
            if record.offset >= offset {
                records.push((record.offset, String::from_utf8(record.value.to_vec()).unwrap()));
                offset = record.offset + 1;
            }
        }
    }
}

/// Sends raw bytes on a fresh connection and returns what came back before the close or
/// the timeout.
fn raw_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        if let Some(len) = answer.get(..4).map(|p| u32::from_be_bytes(p.try_into().unwrap()) as usize) {
            if answer.len() >= 4 + len {
                break;
            }
        }
    }
    answer
}

fn decode_first_response(answer: &[u8]) -> codec::ResponseFrame {
    assert!(answer.len() >= 4, "expected a response, got {} bytes", answer.len());
    let len = u32::from_be_bytes(answer[..4].try_into().unwrap()) as usize;
    codec::decode_response(&Bytes::copy_from_slice(&answer[4..4 + len])).expect("a well-formed response")
}

#[test]
fn produce_and_fetch_through_both_shards_and_the_shared_port() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    client.create_topic("orders", 4).unwrap();
    let owners: Vec<u32> = client.partitions("orders").unwrap().iter().map(|p| p.shard).collect();
    assert!(owners.contains(&0) && owners.contains(&1), "partitions spread over both shards: {owners:?}");
    // A node of its own leads every partition, at the host the client asked.
    let metadata = client.metadata(&["orders"]).unwrap();
    let shard_ports: Vec<u16> = metadata.shards.iter().map(|s| s.port).collect();
    for p in &metadata.topics[0].partitions {
        assert_eq!((p.host.as_str(), p.leader_node, p.leader_epoch), ("", metadata.node_id, 0), "{p:?}");
        assert_eq!(p.replicas, [metadata.node_id]);
        assert_eq!(p.port, shard_ports[p.shard as usize]);
    }
    let [me] = &metadata.nodes[..] else { panic!("one node: {:?}", metadata.nodes) };
    assert_eq!((me.id, me.host.as_str(), me.shard_ports.clone()), (metadata.node_id, "", shard_ports));
    assert_eq!(me.port.to_string(), node.addr.rsplit(':').next().unwrap(), "the shared port");

    for partition in 0..4 {
        let first = client.produce("orders", partition, batch(&values("a", 10)), Acks::Durable).unwrap();
        assert_eq!((first.base_offset, first.next_offset), (0, 10));
    }
    // Through the shared port only: partitions owned by the other shard take the mesh hop.
    let shared =
        pyralog_net::client::Connection::connect(node.addr.parse().unwrap(), Default::default()).unwrap();
    let request = Request::Produce(ProduceRequest {
        topic: "orders".into(),
        acks: Acks::Durable,
        partitions: (0..4)
            .map(|p| ProducePartition { partition: p, records: batch(&values("b", 5)) })
            .collect(),
    });
    let response = shared.call(&request).unwrap();
    let Some(Response::Produce(results)) = response.body else { panic!("{response:?}") };
    assert!(
        results.iter().all(|r| r.error == ErrorCode::None && r.base_offset == 10 && r.next_offset == 15),
        "{results:?}"
    );

    for partition in 0..4 {
        let records = read_partition(&client, "orders", partition);
        let expected: Vec<(i64, String)> = values("a", 10)
            .into_iter()
            .chain(values("b", 5))
            .enumerate()
            .map(|(i, v)| (i as i64, v))
            .collect();
        assert_eq!(records, expected, "partition {partition}");
    }
    assert_eq!(client.list_offsets("orders", 2, codec::OFFSET_LATEST).unwrap(), 15);
    assert_eq!(client.list_offsets("orders", 2, codec::OFFSET_EARLIEST).unwrap(), 0);
    assert_eq!(client.list_offsets("orders", 2, 1_700_000_000_000).unwrap(), 0);
    assert_eq!(client.list_offsets("orders", 2, 1_800_000_000_000).unwrap(), -1);

    // A fetch from the middle of a batch returns the whole batch.
    let fetched = client.fetch("orders", 1, 3, 1 << 20, 0).unwrap();
    let first = RecordReader::new(fetched.records.clone()).next().unwrap().unwrap();
    assert_eq!(first.offset, 0);
}

#[test]
fn a_reader_catching_up_from_disk_gets_every_record_once_in_order() {
    // The node's shards cache 1 MiB each: nearly all of this is read from disk, each fetch
    // after a partition's first through its read ahead (the next fetches' reads, made while
    // one goes out), which the second round of produces overtakes halfway.
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    client.create_topic("history", 2).unwrap();
    let pad = "x".repeat(1000);
    let mut expected: Vec<Vec<(i64, String)>> = vec![Vec::new(), Vec::new()];
    let produce = |round: usize, expected: &mut Vec<Vec<(i64, String)>>| {
        for partition in 0..2u32 {
            for b in 0..12 {
                // Batches of about 900 KiB, and every fourth a short one.
                let count = if b % 4 == 3 { 3 } else { 880 };
                let values: Vec<String> =
                    (0..count).map(|i| format!("r{round}-p{partition}-b{b}-{i:04}-{pad}")).collect();
                let produced = client.produce("history", partition, batch(&values), Acks::Durable).unwrap();
                let records = &mut expected[partition as usize];
                assert_eq!(produced.base_offset, records.len() as i64);
                records.extend(
                    values.into_iter().enumerate().map(|(i, v)| (produced.base_offset + i as i64, v)),
                );
            }
        }
    };
    produce(0, &mut expected);
    let halfway: Vec<_> = (0..2).map(|p| read_partition_from(&client, "history", p, 0, 5000)).collect();
    produce(1, &mut expected);
    for partition in 0..2u32 {
        let mut records = halfway[partition as usize].clone();
        let from = records.last().unwrap().0 + 1;
        records.extend(read_partition_from(&client, "history", partition, from, i64::MAX));
        assert_eq!(records.len(), expected[partition as usize].len(), "partition {partition}");
        assert!(records == expected[partition as usize], "partition {partition}: a record differs");
        // And once more from the start, every fetch from disk.
        assert!(read_partition(&client, "history", partition) == expected[partition as usize]);
    }
}

#[test]
fn a_long_poll_fetch_wakes_when_data_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    client.create_topic("tail", 1).unwrap();
    let addr = node.addr.clone();
    let producer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        Client::connect(&addr).unwrap().produce("tail", 0, batch(&values("late", 1)), Acks::Durable).unwrap()
    });
    let started = Instant::now();
    let fetched = client.fetch("tail", 0, 0, 1 << 20, 10_000).unwrap();
    assert!(!fetched.records.is_empty(), "the fetch returned data, not a timeout");
    assert!(started.elapsed() < Duration::from_secs(9), "woken by the produce, not by max_wait");
    producer.join().unwrap();
}

#[test]
fn a_fetch_asking_for_everything_gets_at_most_the_partition_limit() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    client.create_topic("big", 1).unwrap();
    // Three 6 MiB batches (requests stay under the default 8 MiB --max-request-bytes).
    let value = "v".repeat(6 << 10);
    for round in 0..3 {
        let values: Vec<String> = (0..1024).map(|i| format!("{round}-{i}-{value}")).collect();
        client.produce("big", 0, batch(&values), Acks::Durable).unwrap();
    }
    let limit = pyralog_shard::FETCH_PARTITION_BYTES_MAX as usize;
    let fetched = client.fetch("big", 0, 0, u32::MAX, 0).unwrap();
    assert!(fetched.records.len() <= limit, "{} bytes for one partition", fetched.records.len());
    let records = fetched.reader().count();
    assert!(
        records.is_multiple_of(1024) && (1..3).contains(&(records / 1024)),
        "whole batches, not all three: {records}"
    );
    let rest = client.fetch("big", 0, records as i64, u32::MAX, 0).unwrap();
    assert_eq!(records + rest.reader().count(), 3 * 1024, "the next fetch goes on from there");
}

#[test]
fn a_fetch_naming_many_partitions_is_bounded_in_all() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    client.create_topic("wide", 4).unwrap();
    // Two 6 MiB batches in each of four partitions (spread over both shards): 48 MiB in all.
    let value = "v".repeat(6 << 10);
    for partition in 0..4 {
        for round in 0..2 {
            let values: Vec<String> = (0..1024).map(|i| format!("{partition}-{round}-{i}-{value}")).collect();
            client.produce("wide", partition, batch(&values), Acks::Durable).unwrap();
        }
    }
    let shared =
        pyralog_net::client::Connection::connect(node.addr.parse().unwrap(), Default::default()).unwrap();
    let fetch = |max_bytes: u32| {
        let partitions =
            (0..4).map(|partition| FetchPartition { partition, offset: 0, max_bytes: 0 }).collect();
        let request = Request::Fetch(FetchRequest {
            topic: "wide".into(),
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes,
            partitions,
        });
        let Some(Response::Fetch(results)) = shared.call(&request).unwrap().body else { panic!() };
        assert_eq!(results.len(), 4);
        for result in &results {
            assert_eq!(result.error, ErrorCode::None, "{}", result.message);
            assert_eq!(result.high_watermark, 2048, "a trimmed partition still reports where it is");
        }
        results.into_iter().map(|r| r.records.iter().map(Bytes::len).sum::<usize>()).collect::<Vec<_>>()
    };

    // Asking for everything: the response stops at the named limit, in partition order.
    let sizes = fetch(u32::MAX);
    let total: usize = sizes.iter().sum();
    assert!(total <= pyralog_shard::FETCH_RESPONSE_BYTES_MAX as usize, "{sizes:?}");
    assert!(sizes[0] > 0 && sizes[1] > 0 && sizes[3] == 0, "request order: {sizes:?}");
    // A small budget: the first batch comes whole, nothing else.
    let sizes = fetch(1);
    assert!(sizes[0] > 6 << 20 && sizes[0] < 7 << 20 && sizes[1..] == [0, 0, 0], "{sizes:?}");

    // Only the response's first batch may be larger than its partition's limit: with 1 byte
    // per partition, the first partition's 6 MiB batch comes and nothing else is read.
    let partitions = (0..4).map(|partition| FetchPartition { partition, offset: 0, max_bytes: 1 }).collect();
    let request = Request::Fetch(FetchRequest {
        topic: "wide".into(),
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: u32::MAX,
        partitions,
    });
    let Some(Response::Fetch(results)) = shared.call(&request).unwrap().body else { panic!() };
    let sizes: Vec<usize> = results.iter().map(|r| r.records.iter().map(Bytes::len).sum()).collect();
    assert!(sizes[0] > 6 << 20 && sizes[1..] == [0, 0, 0], "{sizes:?}");

    // A partition of one small batch named 5000 times: every copy up to FETCH_PARTITIONS_MAX
    // (4096) gets it (the budget holds them all), those past it only their offsets.
    client.create_topic("small", 1).unwrap();
    client.produce("small", 0, batch(&values("s", 1)), Acks::Durable).unwrap();
    let partitions = (0..5000).map(|_| FetchPartition { partition: 0, offset: 0, max_bytes: 0 }).collect();
    let request = Request::Fetch(FetchRequest {
        topic: "small".into(),
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: u32::MAX,
        partitions,
    });
    let Some(Response::Fetch(results)) = shared.call(&request).unwrap().body else { panic!() };
    assert_eq!(results.len(), 5000);
    assert!(results.iter().all(|r| r.error == ErrorCode::None && r.high_watermark == 1));
    let sizes: Vec<usize> = results.iter().map(|r| r.records.iter().map(Bytes::len).sum()).collect();
    assert!(sizes[..4096].iter().all(|&s| s > 0) && sizes[4096..].iter().all(|&s| s == 0));

    // Long-poll over several partitions: min_bytes counts them all, so data on one answers
    // at once (each partition used to wait out max_wait on its own).
    let partitions = vec![
        FetchPartition { partition: 0, offset: 2048, max_bytes: 0 },
        FetchPartition { partition: 1, offset: 0, max_bytes: 0 },
    ];
    let request = Request::Fetch(FetchRequest {
        topic: "wide".into(),
        max_wait_ms: 10_000,
        min_bytes: 1,
        max_bytes: 1,
        partitions,
    });
    let started = Instant::now();
    let Some(Response::Fetch(results)) = shared.call(&request).unwrap().body else { panic!() };
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(results[0].records.is_empty() && !results[1].records.is_empty());
}

#[test]
fn a_consumer_is_not_held_back_by_an_idle_partition_long_polling() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    client.create_topic("uneven", 2).unwrap();
    let mut consumer = Consumer::new(client.clone(), "uneven", &[0, 1], StartAt::Earliest).unwrap();
    let addr = node.addr.clone();
    let producer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        Client::connect(&addr)
            .unwrap()
            .produce("uneven", 1, batch(&values("busy", 3)), Acks::Durable)
            .unwrap()
    });
    // Both partitions long-poll for up to 10 s; only partition 1 gets data.
    let started = Instant::now();
    let mut records = Vec::new();
    while records.len() < 3 && started.elapsed() < Duration::from_secs(30) {
        records.extend(consumer.poll(Duration::from_secs(10)).unwrap());
    }
    assert_eq!(records.iter().map(|r| (r.partition, r.offset)).collect::<Vec<_>>(), [(1, 0), (1, 1), (1, 2)]);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "handed out when partition 1 answered, not after partition 0's max_wait"
    );
    producer.join().unwrap();
}

#[test]
fn bad_batches_unknown_names_and_malformed_frames_get_errors_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--max-request-bytes", "65536"]);
    let client = node.client();
    client.create_topic("t", 2).unwrap();

    // A wrong CRC: rejected, nothing appended.
    let mut corrupt = BytesMut::from(&batch(&values("x", 3))[..]);
    let last = corrupt.len() - 2;
    corrupt[last] ^= 0x55;
    match client.produce("t", 0, corrupt.freeze(), Acks::Durable) {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::CorruptBatch);
            assert!(message.contains("CRC"), "{message}");
        }
        other => panic!("a corrupt batch must be refused: {other:?}"),
    }
    assert_eq!(client.list_offsets("t", 0, codec::OFFSET_LATEST).unwrap(), 0);

    // A valid CRC over a batch claiming 2^31 offsets for its one record: three of them once
    // pushed a segment's relative offsets past its index's u32 and crashed the shard, at
    // every start after. Refused like a corrupt batch.
    for _ in 0..3 {
        let mut wide = batch(&values("w", 1)).to_vec();
        wide[23..27].copy_from_slice(&i32::MAX.to_be_bytes()); // lastOffsetDelta
        pyralog_dma::batch::reseal_for_tests(&mut wide);
        match client.produce("t", 0, Bytes::from(wide), Acks::Durable) {
            Err(ClientError::Server { code, message }) => {
                assert_eq!(code, ErrorCode::CorruptBatch);
                assert!(message.contains("consecutive offsets"), "{message}");
            }
            other => panic!("a batch claiming more offsets than records must be refused: {other:?}"),
        }
    }
    assert_eq!(client.list_offsets("t", 0, codec::OFFSET_LATEST).unwrap(), 0);

    // Unknown topic and partition.
    match client.produce("nope", 0, batch(&values("x", 1)), Acks::Durable) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::UnknownTopic),
        Err(ClientError::UnknownPartition { .. }) => {}
        other => panic!("unknown topic: {other:?}"),
    }
    let shared =
        pyralog_net::client::Connection::connect(node.addr.parse().unwrap(), Default::default()).unwrap();
    let request = Request::Produce(ProduceRequest {
        topic: "t".into(),
        acks: Acks::Durable,
        partitions: vec![ProducePartition { partition: 9, records: batch(&values("x", 1)) }],
    });
    let Some(Response::Produce(results)) = shared.call(&request).unwrap().body else { panic!() };
    assert_eq!(results[0].error, ErrorCode::UnknownPartition);
    assert!(results[0].message.contains("no partition 9"), "{}", results[0].message);

    // Garbage: an error response and a close.
    let answer = raw_exchange(&node.addr, b"\x00\x00\x00\x08garbage!");
    assert_eq!(decode_first_response(&answer).error, ErrorCode::InvalidRequest);
    // An oversized frame: refused by its length prefix alone.
    let answer = raw_exchange(&node.addr, &(1u32 << 30).to_be_bytes());
    let response = decode_first_response(&answer);
    assert_eq!(response.error, ErrorCode::MessageTooLarge);
    assert!(response.message.contains("max-request-bytes"), "{}", response.message);
    // A connection cut in the middle of a frame.
    drop(raw_exchange(&node.addr, b"\x00\x00\x01\x00abc"));

    // Everyone else is still served.
    let ack = client.produce("t", 1, batch(&values("ok", 2)), Acks::Durable).unwrap();
    assert_eq!(ack.next_offset, 2);
    assert_eq!(read_partition(&client, "t", 1).len(), 2);
}

#[test]
fn topic_changes_made_at_once_are_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    // Sixteen clients create a topic each, then all the same one, at once (as producers
    // auto-creating a topic do). Shard 0 used to interleave them: each persisted the table it
    // had read before its awaits, dropping the others' topics, and a second create of one
    // name passed the check and removed the first one's open directory.
    let creators: Vec<_> = (0..16)
        .map(|i| {
            let addr = node.addr.clone();
            std::thread::spawn(move || {
                let client = Client::connect(&addr).unwrap();
                client.create_topic(&format!("t{i:02}"), 4).unwrap();
                client.create_topic("same", 4).is_ok()
            })
        })
        .collect();
    let won = creators.into_iter().map(|t| t.join().unwrap()).filter(|&created| created).count();
    assert_eq!(won, 1, "one create of a name wins");
    let client = node.client();
    client.produce("same", 0, batch(&values("kept", 3)), Acks::Durable).unwrap();
    node.terminate();

    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    let mut names: Vec<String> = client.metadata(&[]).unwrap().topics.into_iter().map(|t| t.name).collect();
    names.sort();
    let mut expected: Vec<String> = (0..16).map(|i| format!("t{i:02}")).collect();
    expected.insert(0, "same".into());
    assert_eq!(names, expected, "every topic created is in the table after a restart");
    assert_eq!(read_partition(&client, "same", 0).len(), 3, "the winner's files were not removed");
}

#[test]
fn a_node_stops_promptly_while_a_shard_waits_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    client.create_topic("poll", 2).unwrap();
    // A long-poll sent to one shard's port for a partition the other shard owns: the first
    // shard waits on the second for the answer.
    let partitions = client.partitions("poll").unwrap();
    let owned_elsewhere = partitions[0].clone();
    let other_port = partitions.iter().find(|p| p.shard != owned_elsewhere.shard).map(|p| p.port).unwrap();
    let waiting = std::thread::spawn(move || {
        let connection = pyralog_net::client::Connection::connect(
            format!("127.0.0.1:{other_port}").parse().unwrap(),
            Default::default(),
        )
        .unwrap();
        let partitions =
            vec![FetchPartition { partition: owned_elsewhere.partition, offset: 0, max_bytes: 0 }];
        let request = Request::Fetch(FetchRequest {
            topic: "poll".into(),
            max_wait_ms: 25_000,
            min_bytes: 1,
            max_bytes: 1,
            partitions,
        });
        connection.call(&request)
    });
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let status = node.terminate();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "stopping took {:?}", started.elapsed());
    // The waiting client got an answer or a closed connection, not a hang.
    let _ = waiting.join().unwrap();
}

#[test]
fn topics_survive_a_restart_and_can_be_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    client.create_topic("keep", 3).unwrap();
    client.create_topic("drop", 1).unwrap();
    assert!(matches!(
        client.create_topic("keep", 3),
        Err(ClientError::Server { code: ErrorCode::TopicAlreadyExists, .. })
    ));
    assert!(matches!(
        client.create_topic("bad/name", 1),
        Err(ClientError::Server { code: ErrorCode::InvalidTopic, .. })
    ));
    client.produce("keep", 2, batch(&values("k", 4)), Acks::Durable).unwrap();
    client.delete_topic("drop").unwrap();
    assert!(!dir.path().join("topics/drop").exists());
    assert!(node.terminate().success(), "SIGTERM stops the node cleanly");

    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    let topics: Vec<String> = client.metadata(&[]).unwrap().topics.into_iter().map(|t| t.name).collect();
    assert_eq!(topics, vec!["keep".to_string()]);
    assert_eq!(read_partition(&client, "keep", 2).len(), 4);
}

/// (partition, base offset, values) of a batch the node acknowledged.
type AcknowledgedBatch = (u32, i64, Vec<String>);

#[test]
fn kill9_during_produce_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    node.client().create_topic("durable", 2).unwrap();
    let acknowledged: Arc<Mutex<Vec<AcknowledgedBatch>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..2u32)
        .map(|partition| {
            let (addr, acknowledged, stop) = (node.addr.clone(), acknowledged.clone(), stop.clone());
            std::thread::spawn(move || {
                let client = Client::connect(&addr).unwrap();
                for round in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let batch_values = values(&format!("p{partition}r{round}"), 20);
                    match client.produce("durable", partition, batch(&batch_values), Acks::Durable) {
                        Ok(ack) => {
                            acknowledged.lock().unwrap().push((partition, ack.base_offset, batch_values))
                        }
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while acknowledged.lock().unwrap().len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    node.kill9();
    stop.store(true, Ordering::SeqCst);
    for producer in producers {
        producer.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 50, "the load ran before the kill ({} batches)", acknowledged.len());

    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    for partition in 0..2u32 {
        let stored = read_partition(&client, "durable", partition);
        // Offsets are contiguous from 0: no gap, no partial batch (every batch passed its CRC).
        assert!(stored.iter().enumerate().all(|(i, (offset, _))| *offset == i as i64));
        assert_eq!(stored.len() % 20, 0, "only whole batches");
        for (_, base, batch_values) in acknowledged.iter().filter(|(p, _, _)| *p == partition) {
            for (i, value) in batch_values.iter().enumerate() {
                let at = (*base as usize) + i;
                assert_eq!(stored.get(at).map(|(_, v)| v), Some(value), "acknowledged record at offset {at}");
            }
        }
        let next = client.produce("durable", partition, batch(&values("after", 1)), Acks::Durable).unwrap();
        assert_eq!(next.base_offset, stored.len() as i64, "new offsets continue with no gap");
    }
}

#[test]
fn a_second_node_on_the_same_port_or_data_dir_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    // Starts a second node that must refuse to run; returns what it said.
    let refused = |data_dir: &Path, listen: &str, kafka_listen: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_pyralog"))
            .args([
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--listen",
                listen,
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(["--kafka-listen", kafka_listen, "--shards", "1"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        String::from_utf8(output.stderr).unwrap()
    };
    let other = tempfile::tempdir().unwrap();
    let message = refused(other.path(), &node.addr, "127.0.0.1:0");
    assert!(message.contains("already in use"), "{message}");
    let message = refused(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    assert!(message.contains("in use by another pyralog"), "{message}");
    let file = other.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let message = refused(&file, "127.0.0.1:0", "127.0.0.1:0");
    assert!(message.contains("data directory"), "{message}");
    // Listening on every address needs an address to advertise to Kafka clients.
    let message = refused(other.path(), "127.0.0.1:0", "0.0.0.0:0");
    assert!(message.contains("--kafka-advertise"), "{message}");
    // Settings out of their ranges: a huge flush interval once overflowed a deadline, more
    // flush bytes than a partition may hold unflushed only stalled produces, segments past
    // 4 GiB panicked at the first position past 32 bits, and under a block at open.
    for (flag, value) in [
        ("--flush-interval-ms", "18446744073709551615"),
        ("--flush-bytes", "1073741824"),
        ("--segment-bytes", "8589934592"),
        ("--segment-bytes", "100"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_pyralog")).args([flag, value]).output().unwrap();
        assert_eq!(output.status.code(), Some(2));
        let message = String::from_utf8(output.stderr).unwrap();
        assert!(message.contains(flag) && message.contains("is not in"), "{message}");
    }
}

#[test]
fn io_memory_is_checked_against_the_memlock_limit() {
    // Starts a two-shard node under a soft memlock limit (KiB; at most the hard limit, 8 MiB
    // on these machines) and stops it; returns its exit
    // code and everything it printed. The shell lowers the limit (any user may lower it).
    let run = |memlock_kib: u64, extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "ulimit -S -l {memlock_kib} || exit 9; out={out}; \
             {bin} --data-dir {data} --listen 127.0.0.1:0 --kafka-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
             --shard-port-base 0 --kafka-shard-port-base 0 --shards 2 {extra} >$out 2>&1 & pid=$!; \
             for _ in $(seq 100); do grep -q ready $out && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done; \
             kill -TERM $pid 2>/dev/null; wait $pid; code=$?; cat $out; exit $code",
            out = dir.path().join("out").display(),
            bin = env!("CARGO_BIN_EXE_pyralog"),
            data = dir.path().join("data").display(),
        );
        let output = Command::new("bash").args(["-c", &script]).output().unwrap();
        let text =
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.code(), text)
    };
    // 1 MiB per shard by default, within the limit.
    let (_, text) = run(8 << 10, "");
    assert!(text.contains("io memory 1048576 B per shard"), "{text}");
    // The summary says whether disk buffers get huge pages, as this kernel's THP mode allows.
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let huge = thp.contains("[always]") || thp.contains("[madvise]");
    let line = text.lines().find(|line| line.trim_start().starts_with("disk buffers")).expect(&text);
    assert_eq!(line.contains("on 2 MiB transparent huge pages"), huge, "{line} with THP {thp}");
    // More than the limit allows every shard: a plain refusal.
    let (code, text) = run(1 << 10, "");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("memlock limit is 1024 KiB but 2 shards need 2048 KiB"), "{text}");
    let (code, text) = run(8 << 10, "--io-memory-bytes 8388608");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("lower --io-memory-bytes"), "{text}");
}

/// A small file system of its own, unmounted on drop. Needs root, as CI and the developers'
/// machines have.
struct SmallFileSystem {
    mount_point: tempfile::TempDir,
}

impl SmallFileSystem {
    fn new(size: &str) -> SmallFileSystem {
        let mount_point = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                mount_point.path().to_str().unwrap(),
            ])
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a {size} tmpfs needs root (CAP_SYS_ADMIN)");
        SmallFileSystem { mount_point }
    }
}

impl Drop for SmallFileSystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.mount_point.path()).status();
    }
}

#[test]
fn a_full_disk_fails_produce_with_a_storage_error_and_keeps_what_was_written() {
    let disk = SmallFileSystem::new("4m");
    let data_dir = disk.mount_point.path().join("data");
    let node = Node::start(&data_dir, &[]);
    let client = node.client();
    client.create_topic("full", 1).unwrap();
    let payload = "z".repeat(30_000);
    let mut acknowledged = 0i64;
    let error = loop {
        match client.produce("full", 0, batch(&[payload.clone(), payload.clone()]), Acks::Durable) {
            Ok(ack) => {
                assert_eq!(ack.base_offset, acknowledged);
                acknowledged = ack.next_offset;
                assert!(acknowledged < 1000, "a 4 MiB disk must fill up");
            }
            Err(error) => break error,
        }
    };
    match &error {
        ClientError::Server { code, message } => {
            assert_eq!(*code, ErrorCode::StorageError);
            assert!(message.contains("No space left"), "{message}");
        }
        other => panic!("expected a storage error, got {other:?}"),
    }
    assert!(acknowledged > 0);
    // The node is up, keeps refusing writes to the stopped partition, and serves what it has.
    assert!(matches!(
        client.produce("full", 0, batch(&values("more", 1)), Acks::Durable),
        Err(ClientError::Server { code: ErrorCode::StorageError, .. })
    ));
    let stored = read_partition(&client, "full", 0);
    assert_eq!(stored.len() as i64, acknowledged);
    assert!(stored.iter().all(|(_, v)| *v == payload));
    drop(node);
}

#[test]
fn a_disk_filling_under_concurrent_producers_leaves_the_shard_serving() {
    let disk = SmallFileSystem::new("4m");
    let data_dir = disk.mount_point.path().join("data");
    let node = Node::start(&data_dir, &[]);
    let client = node.client();
    client.create_topic("full", 1).unwrap();
    client.create_topic("other", 2).unwrap();
    // A partition of "other" on the shard that owns "full".
    let shard = client.partitions("full").unwrap()[0].shard;
    let neighbour = client.partitions("other").unwrap().into_iter().find(|p| p.shard == shard).unwrap();
    client.produce("other", neighbour.partition, batch(&values("before", 1)), Acks::Durable).unwrap();
    // Four producers at once fill the disk, so batches arrive while the failing flush runs
    // (they used to stay pending, and the flusher spun on a log that refused to flush,
    // holding the whole core).
    let payload = "z".repeat(30_000);
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let addr = node.addr.clone();
            let payload = payload.clone();
            std::thread::spawn(move || {
                let client = Client::connect(&addr).unwrap();
                for _ in 0..200 {
                    if client
                        .produce("full", 0, batch(&[payload.clone(), payload.clone()]), Acks::Durable)
                        .is_err()
                    {
                        return;
                    }
                }
                panic!("a 4 MiB disk must fill up");
            })
        })
        .collect();
    for producer in producers {
        producer.join().unwrap();
    }
    // The shard still serves its other partitions (reads; the disk is full for writes).
    let (done, answer) = std::sync::mpsc::channel();
    let addr = node.addr.clone();
    std::thread::spawn(move || {
        let client = Client::connect(&addr).unwrap();
        let _ =
            done.send(client.fetch("other", neighbour.partition, 0, 1 << 20, 0).map(|f| f.reader().count()));
    });
    let records = answer.recv_timeout(Duration::from_secs(10)).expect("the shard answers");
    assert_eq!(records.unwrap(), 1);
    drop(node);
}

#[test]
fn in_cached_mode_a_failed_flush_ends_the_partition_at_what_is_on_disk() {
    let disk = SmallFileSystem::new("4m");
    let data_dir = disk.mount_point.path().join("data");
    let node = Node::start(&data_dir, &["--durability", "cached", "--flush-interval-ms", "5"]);
    let client = node.client();
    client.create_topic("full", 1).unwrap();
    let payload = "z".repeat(30_000);
    // Acknowledged from memory until a flush fails; the produces after it are refused.
    let mut acknowledged = 0i64;
    while client.produce("full", 0, batch(&[payload.clone(), payload.clone()]), Acks::Durable).is_ok() {
        acknowledged += 2;
        assert!(acknowledged < 1000, "a 4 MiB disk must fill up");
    }
    // What the failed flush held is gone (cached mode's promise says so): the partition now
    // ends where the disk does, and every offset below that end reads back.
    let end = client.list_offsets("full", 0, codec::OFFSET_LATEST).unwrap();
    assert!(end > 0 && end < acknowledged, "end {end}, acknowledged {acknowledged}");
    let stored = read_partition(&client, "full", 0);
    assert_eq!(stored.len() as i64, end, "a consumer reaches the end, not a gap it waits on");
    assert!(stored.iter().all(|(_, v)| *v == payload));
    drop(node);
}

/// A GET of `path` on a fresh connection: the whole answer, or what came before the timeout.
fn http_get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("the metrics listener");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn the_metrics_endpoints_stay_answerable_when_every_slot_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    assert!(http_get(&node.metrics_addr, "/health").starts_with("HTTP/1.1 200 OK"));
    // Clients that connect and send nothing hold every slot (pyralog_net::http::CONNECTIONS_MAX).
    let idle: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(&node.metrics_addr).unwrap()).collect();
    let started = Instant::now();
    let mut busy = http_get(&node.metrics_addr, "/health");
    while !busy.starts_with("HTTP/1.1 503") && started.elapsed() < Duration::from_secs(5) {
        busy = http_get(&node.metrics_addr, "/health");
    }
    assert!(busy.starts_with("HTTP/1.1 503") && busy.contains("busy"), "{busy}");
    drop(idle);
    let started = Instant::now();
    let mut health = http_get(&node.metrics_addr, "/health");
    while !health.starts_with("HTTP/1.1 200") && started.elapsed() < Duration::from_secs(5) {
        health = http_get(&node.metrics_addr, "/health");
    }
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
    assert!(http_get(&node.metrics_addr, "/nothing").starts_with("HTTP/1.1 404"));
}

#[test]
fn a_config_file_given_twice_or_missing_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
    std::fs::write(&a, "default-partitions = 3\n").unwrap();
    std::fs::write(&b, "default-partitions = 4\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_pyralog"))
        .args(["--config", a.to_str().unwrap(), "--config", b.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8(output.stderr).unwrap();
    assert!(message.contains("'--config <FILE>' cannot be used multiple times"), "{message}");
    // A data directory named like the subcommand does not hide the file.
    let missing = dir.path().join("missing.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_pyralog"))
        .args(["--data-dir", "topic", "--config", missing.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8(output.stderr).unwrap();
    assert!(message.contains("cannot read config file") && message.contains("missing.toml"), "{message}");
    assert!(!dir.path().join("topic").exists());
}

#[test]
fn the_node_id_is_kept_in_the_data_directory_and_another_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--node-id", "3"]);
    node.client().create_topic("kept", 1).unwrap();
    assert!(node.terminate().success());
    let meta = std::fs::read_to_string(dir.path().join("node.meta")).unwrap();
    assert!(meta.contains("node-id 3\n"), "{meta}");
    let cluster_id = meta.lines().find_map(|l| l.strip_prefix("cluster-id ")).unwrap().to_owned();

    let output = Command::new(env!("CARGO_BIN_EXE_pyralog"))
        .args(["--data-dir", dir.path().to_str().unwrap(), "--node-id", "4"])
        .args(["--listen", "127.0.0.1:0", "--kafka-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8(output.stderr).unwrap();
    assert!(message.contains("belongs to node 3, not node 4: start it with --node-id 3"), "{message}");

    // Without the flag it runs as the stored node, in the same cluster, with its data.
    let node = Node::start(dir.path(), &[]);
    let metadata = node.client().metadata(&[]).unwrap();
    assert_eq!((metadata.node_id, metadata.topics[0].partitions[0].leader_node), (3, 3));
    let topics: Vec<String> = metadata.topics.into_iter().map(|t| t.name).collect();
    assert_eq!(topics, vec!["kept".to_string()]);
    assert!(node.terminate().success());
    let meta = std::fs::read_to_string(dir.path().join("node.meta")).unwrap();
    assert!(meta.contains(&format!("cluster-id {cluster_id}")), "the cluster id stays: {meta}");
}

#[test]
fn a_replication_factor_on_a_cluster_of_one_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let client = node.client();
    let refused = client.create_replicated_topic("replicated", 1, 3, 0).unwrap_err().to_string();
    assert!(refused.contains("cluster of one") && refused.contains("--seeds"), "{refused}");
    client.create_replicated_topic("single", 1, 1, 0).unwrap();
    let topics: Vec<String> = client.metadata(&[]).unwrap().topics.into_iter().map(|t| t.name).collect();
    assert_eq!(topics, vec!["single".to_string()]);
}

/// `pyralog topic describe ... | head -1`: the command ends when the pipe closes, quietly
/// (SIGPIPE, as other tools), not with a panic and a backtrace from `println!` on EPIPE.
#[test]
fn an_admin_command_piped_into_head_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    // Over 64 KiB of lines (a pipe's buffer), so the command is still writing when the
    // reader goes.
    node.client().create_topic("wide", 2000).unwrap();
    let mut describe = std::process::Command::new(env!("CARGO_BIN_EXE_pyralog"))
        .args(["topic", "--broker", &node.addr, "describe", "wide"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = std::io::BufReader::new(describe.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert!(first.starts_with("topic 'wide': 2000 partitions"), "{first}");
    drop(stdout);
    let output = describe.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{:?} {stderr}", output.status);
}
