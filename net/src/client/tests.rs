//! Client, producer and consumer against the in-memory [`FakeBroker`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::fake_broker::FakeBroker;
use super::*;

fn client(broker: &FakeBroker) -> Client {
    let options = ConnectOptions { request_timeout: Duration::from_secs(5), ..ConnectOptions::default() };
    Client::connect_with(&broker.addr().to_string(), options).expect("the fake broker is up")
}

fn batch(values: &[&[u8]]) -> Bytes {
    let mut builder = BatchBuilder::new(1_000, 0);
    for value in values {
        builder.append(1_000, None, value);
    }
    builder.finish()
}

type Reports = Arc<Mutex<Vec<DeliveryReport>>>;

fn producer<T: Transport>(client: &T, config: ProducerConfig) -> (Producer<T>, Reports) {
    let reports: Reports = Arc::default();
    let sink = Arc::clone(&reports);
    let producer =
        Producer::new(client.clone(), config, move |report| sink.lock().unwrap().push(report)).unwrap();
    (producer, reports)
}

#[test]
fn topics_offsets_produce_and_fetch_round_trip() {
    let broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("orders", 4).unwrap();
    assert_eq!(client.partition_count("orders").unwrap(), 4);
    // Even partitions advertise the listener's port, odd ones port 0 (the bootstrap fallback).
    for partition in 0..4 {
        let ack = client.produce("orders", partition, batch(&[b"a", b"b", b"c"]), Acks::Durable).unwrap();
        assert_eq!((ack.base_offset, ack.next_offset), (0, 3));
        assert!(ack.acknowledged_at.is_some_and(|at| at <= std::time::Instant::now()));
        let ack = client.produce("orders", partition, batch(&[b"d"]), Acks::Durable).unwrap();
        assert_eq!((ack.base_offset, ack.next_offset), (3, 4));
        assert_eq!(client.list_offsets("orders", partition, OFFSET_EARLIEST).unwrap(), 0);
        assert_eq!(client.list_offsets("orders", partition, OFFSET_LATEST).unwrap(), 4);
        let fetched = client.fetch("orders", partition, 0, 1 << 20, 0).unwrap();
        assert_eq!(fetched.high_watermark, 4);
        let values: Vec<_> = fetched.reader().map(|r| r.unwrap().value).collect();
        assert_eq!(values, [&b"a"[..], b"b", b"c", b"d"]);
    }
    assert_eq!(client.connection_ports(), [broker.addr().port()], "one listener, one connection");
    client.delete_topic("orders").unwrap();
    let error = client.partition_count("orders").unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::UnknownTopic, .. }), "{error}");
}

#[test]
fn server_and_client_side_errors_name_their_cause() {
    let broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("t", 1).unwrap();
    let error = client.create_topic("t", 1).unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::TopicAlreadyExists, .. }));
    assert_eq!(error.to_string(), "topic 't' already exists");
    let error = client.produce("t", 5, batch(&[b"x"]), Acks::Durable).unwrap_err();
    assert!(matches!(error, ClientError::UnknownPartition { partition: 5, partitions: 1, .. }), "{error}");
    let mut corrupt = BytesMut::from(&batch(&[b"x"])[..]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let error = client.produce("t", 0, corrupt.freeze(), Acks::Durable).unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::CorruptBatch, .. }), "{error}");
    let error = client.fetch("t", 0, 99, 1024, 0).unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::OffsetOutOfRange, .. }), "{error}");
}

#[test]
fn producer_cuts_batches_by_size_and_reports_every_record_in_order() {
    let broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("p", 3).unwrap();
    let config = ProducerConfig {
        batch_bytes: 1024,
        linger: Duration::from_secs(60),
        partitioner: Partitioner::RoundRobin,
        max_in_flight_batches: 2,
        ..ProducerConfig::new("p")
    };
    let (mut producer, reports) = producer(&client, config);
    for i in 0..300u32 {
        let partition = producer.send(None, &[i as u8; 100]).unwrap();
        assert_eq!(partition, i % 3);
    }
    assert!(producer.in_flight_batches() <= 2);
    producer.flush().unwrap();
    let reports = reports.lock().unwrap();
    assert!(reports.len() > 3, "1 KiB batches of 100-byte records: many batches");
    let mut next_offset = [0i64; 3];
    for report in reports.iter() {
        assert!(report.error.is_none(), "{:?}", report.error);
        assert!(report.first_enqueue <= report.last_enqueue && report.last_enqueue <= report.completed);
        let partition = report.partition as usize;
        assert_eq!(report.base_offset, next_offset[partition], "reports come in send order per partition");
        next_offset[partition] += i64::from(report.record_count);
    }
    assert_eq!(next_offset, [100, 100, 100]);
    for partition in 0..3 {
        assert_eq!(broker.next_offset("p", partition), Some(100));
    }
}

#[test]
fn producer_sends_a_lingering_batch_on_poll() {
    let broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("l", 1).unwrap();
    let config = ProducerConfig { linger: Duration::from_millis(20), ..ProducerConfig::new("l") };
    let (mut producer, reports) = producer(&client, config);
    producer.send(Some(b"key"), b"value").unwrap();
    let deadline = producer.linger_deadline().expect("a batch is open");
    producer.poll().unwrap();
    assert_eq!(producer.in_flight_batches() + reports.lock().unwrap().len(), 0, "linger not over yet");
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    producer.poll().unwrap();
    assert_eq!(producer.in_flight_batches() + reports.lock().unwrap().len(), 1, "sent once lingered");
    assert_eq!(producer.linger_deadline(), None);
    producer.flush().unwrap();
    let record = client.fetch("l", 0, 0, 1024, 0).unwrap().reader().next().unwrap().unwrap();
    assert_eq!((record.key.as_deref(), &record.value[..]), (Some(&b"key"[..]), &b"value"[..]));
}

#[test]
fn a_partition_at_its_in_flight_bound_keeps_filling_its_batch() {
    let broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("w", 1).unwrap();
    let config =
        ProducerConfig { linger: Duration::ZERO, max_in_flight_per_partition: 1, ..ProducerConfig::new("w") };
    let (mut producer, reports) = producer(&client, config);
    broker.hold_produce_responses(true);
    producer.send(None, b"first").unwrap();
    assert_eq!(producer.in_flight_batches(), 1, "a zero linger sends the first record at once");
    producer.send(None, b"second").unwrap();
    producer.send(None, b"third").unwrap();
    producer.poll().unwrap();
    assert_eq!(producer.in_flight_batches(), 1, "the partition is at its bound: the batch stays open");
    broker.hold_produce_responses(false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while reports.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the first batch was never acknowledged");
        std::thread::sleep(Duration::from_millis(1));
        producer.poll().unwrap();
    }
    assert_eq!(producer.in_flight_batches(), 1, "the acknowledgement made room for the open batch");
    producer.flush().unwrap();
    let reports = reports.lock().unwrap();
    let sent: Vec<_> = reports.iter().map(|r| (r.base_offset, r.record_count)).collect();
    assert_eq!(sent, [(0, 1), (1, 2)], "two requests: the first record alone, then the two that waited");
}

#[test]
fn acks_none_produces_without_responses() {
    let broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("n", 1).unwrap();
    let ack = client.produce("n", 0, batch(&[b"1", b"2"]), Acks::None).unwrap();
    assert_eq!(ack.base_offset, OFFSET_UNACKNOWLEDGED);
    // The connection answers in order, so this fetch sees the unacknowledged produce.
    let fetched = client.fetch("n", 0, 0, 1024, 1_000).unwrap();
    assert_eq!(fetched.reader().count(), 2);
}

#[test]
fn consumer_skips_records_before_its_offset_and_long_polls() {
    let broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("c", 2).unwrap();
    for _ in 0..3 {
        let values: Vec<Vec<u8>> = (0..10).map(|i| vec![i]).collect();
        let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        client.produce("c", 1, batch(&values), Acks::Durable).unwrap();
    }
    let mut consumer = Consumer::new(client.clone(), "c", &[1], StartAt::Offset(15)).unwrap();
    let records = consumer.poll(Duration::from_millis(10)).unwrap();
    let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (15..30).collect::<Vec<_>>(), "the batch holding 15 starts at 10");
    assert!(records.iter().all(|r| r.partition == 1));
    assert_eq!(consumer.position(1), Some(30));
    assert_eq!(consumer.lag(), 0);

    let mut latest = Consumer::new(client.clone(), "c", &[1], StartAt::Latest).unwrap();
    let started = Instant::now();
    assert!(latest.poll(Duration::from_millis(150)).unwrap().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(100), "an empty fetch waits at the broker");
    client.produce("c", 1, batch(&[b"new"]), Acks::Durable).unwrap();
    let records = latest.poll(Duration::from_millis(10)).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].offset, &records[0].value[..]), (30, &b"new"[..]));

    let mut earliest = Consumer::new(client, "c", &[1], StartAt::Earliest).unwrap();
    assert_eq!(earliest.poll(Duration::ZERO).unwrap().len(), 31);
}

#[test]
fn a_failed_fetch_loses_none_of_the_records_that_arrived_with_it() {
    let broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("f", 2).unwrap();
    let values: Vec<Vec<u8>> = (0..10).map(|i| vec![i]).collect();
    let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    client.produce("f", 0, batch(&values), Acks::Durable).unwrap();
    client.produce("f", 1, batch(&values[..2]), Acks::Durable).unwrap();
    // Offset 5 is inside partition 0's batch and past partition 1's end: one fetch answers
    // with records, the other with an error, often both before the consumer looks.
    let mut consumer = Consumer::new(client, "f", &[0, 1], StartAt::Offset(5)).unwrap();
    let mut offsets = Vec::new();
    let mut failures = 0;
    for _ in 0..4 {
        match consumer.poll(Duration::from_millis(10)) {
            Ok(records) => offsets.extend(records.iter().map(|r| (r.partition, r.offset))),
            Err(error) => {
                assert!(
                    matches!(error, ClientError::Server { code: ErrorCode::OffsetOutOfRange, .. }),
                    "{error}"
                );
                failures += 1;
            }
        }
    }
    assert_eq!(
        offsets,
        (5..10).map(|offset| (0, offset)).collect::<Vec<_>>(),
        "every record handed out once"
    );
    assert!(failures > 0, "the failing partition is reported");
}

#[test]
fn a_broker_that_goes_away_fails_producers_and_consumers() {
    let mut broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("gone", 1).unwrap();
    let (mut producer, reports) = producer(&client, ProducerConfig::new("gone"));
    producer.send(None, b"before").unwrap();
    producer.flush().unwrap();
    let mut consumer = Consumer::new(client.clone(), "gone", &[0], StartAt::Earliest).unwrap();
    broker.shutdown();

    let error = consumer.poll(Duration::from_millis(10)).unwrap_err();
    assert!(error.is_disconnect(), "{error}");
    producer.send(None, b"after").unwrap();
    let error = producer.flush().unwrap_err();
    assert!(error.is_disconnect() || matches!(error, ClientError::DeliveryFailed { .. }), "{error}");
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 2, "every batch is reported, the lost one too");
    assert!(reports[0].error.is_none());
    assert!(reports[1].error.is_some());
}

#[test]
fn consumer_prefetches_batch_after_batch_in_order() {
    let broker = FakeBroker::start().unwrap();
    let client = client(&broker);
    client.create_topic("pre", 1).unwrap();
    for round in 0..10u8 {
        let values: Vec<Vec<u8>> = (0..10).map(|i| vec![round, i]).collect();
        let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        client.produce("pre", 0, batch(&values), Acks::Durable).unwrap();
    }
    let mut consumer = Consumer::new(client, "pre", &[0], StartAt::Earliest).unwrap();
    // One byte per fetch: the broker still returns one whole batch, so each answer prefetches
    // the next batch.
    consumer.set_fetch_bytes_max(1);
    let mut offsets = Vec::new();
    for _ in 0..20 {
        let records = consumer.poll(Duration::from_millis(10)).unwrap();
        assert!(records.len() <= 10, "one batch per fetch");
        offsets.extend(records.iter().map(|r| r.offset));
        if offsets.len() == 100 {
            break;
        }
    }
    assert_eq!(offsets, (0..100).collect::<Vec<i64>>());
    assert_eq!(consumer.position(0), Some(100));
}

// The Kafka transport, against the fake broker's Kafka listener (same logs as its native one).

fn kafka_client(broker: &FakeBroker) -> KafkaClient {
    let options = ConnectOptions { request_timeout: Duration::from_secs(5), ..ConnectOptions::default() };
    KafkaClient::connect_with(&broker.kafka_addr().to_string(), options).expect("the fake broker is up")
}

#[test]
fn kafka_producer_and_consumer_round_trip_and_share_the_log_with_native() {
    let broker = FakeBroker::start().unwrap();
    let kafka = kafka_client(&broker);
    kafka.create_topic("k", 3).unwrap();
    let error = kafka.create_topic("k", 3).unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::TopicAlreadyExists, .. }), "{error}");
    assert_eq!(Transport::partition_count(&kafka, "k").unwrap(), 3);
    let config = ProducerConfig {
        batch_bytes: 1024,
        partitioner: Partitioner::RoundRobin,
        max_in_flight_batches: 8,
        ..ProducerConfig::new("k")
    };
    let (mut producer, reports) = producer(&kafka.session(), config);
    for i in 0..600u32 {
        assert_eq!(producer.send(Some(&i.to_be_bytes()), &[i as u8; 100]).unwrap(), i % 3);
    }
    producer.flush().unwrap();
    let mut next_offset = [0i64; 3];
    for report in reports.lock().unwrap().iter() {
        assert!(report.error.is_none(), "{:?}", report.error);
        let partition = report.partition as usize;
        assert_eq!(report.base_offset, next_offset[partition], "reports come in send order per partition");
        next_offset[partition] += i64::from(report.record_count);
    }
    assert_eq!(next_offset, [200, 200, 200]);

    // Read back over Kafka, and over the native protocol: the same records in the same order.
    let native = client(&broker);
    for partition in 0..3u32 {
        let mut over_kafka = Consumer::new(kafka.session(), "k", &[partition], StartAt::Earliest).unwrap();
        let mut over_native = Consumer::new(native.clone(), "k", &[partition], StartAt::Earliest).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        while a.len() < 200 || b.len() < 200 {
            a.extend(over_kafka.poll(Duration::from_millis(10)).unwrap());
            b.extend(over_native.poll(Duration::from_millis(10)).unwrap());
        }
        assert_eq!(a, b);
        let keys: Vec<u32> =
            a.iter().map(|r| u32::from_be_bytes(r.key.as_deref().unwrap().try_into().unwrap())).collect();
        assert_eq!(keys, (0..200).map(|i| i * 3 + partition).collect::<Vec<_>>());
        assert_eq!(over_kafka.lag(), 0);
        assert_eq!(kafka.list_offsets("k", partition, OFFSET_LATEST).unwrap(), 200);
        assert_eq!(kafka.list_offsets("k", partition, OFFSET_EARLIEST).unwrap(), 0);
    }
}

#[test]
fn kafka_acks_none_gets_no_response_and_the_next_request_still_lines_up() {
    let broker = FakeBroker::start().unwrap();
    let kafka = kafka_client(&broker);
    kafka.create_topic("n", 1).unwrap();
    let ack = kafka.produce_async("n", 0, batch(&[b"1", b"2"]), Acks::None).unwrap().wait().unwrap();
    assert_eq!(ack.base_offset, OFFSET_UNACKNOWLEDGED);
    // Nothing was expected for the acks-0 produce, so this response is matched to the fetch.
    let fetched = kafka.fetch_async("n", 0, 0, 1024, 1_000).unwrap().wait().unwrap();
    assert_eq!(fetched.reader().count(), 2);
    let ack = kafka.produce_async("n", 0, batch(&[b"3"]), Acks::Durable).unwrap().wait().unwrap();
    assert_eq!((ack.base_offset, ack.next_offset), (2, 3));
    assert!(ack.acknowledged_at.is_some(), "a durable ack records when it arrived");
}

#[test]
fn kafka_errors_map_to_the_native_codes() {
    let broker = FakeBroker::start().unwrap();
    let kafka = kafka_client(&broker);
    let error = Transport::partition_count(&kafka, "missing").unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::UnknownTopic, .. }), "{error}");
    kafka.create_topic("t", 1).unwrap();
    let error = kafka.produce_async("t", 5, batch(&[b"x"]), Acks::Durable).unwrap_err();
    assert!(matches!(error, ClientError::UnknownPartition { partition: 5, partitions: 1, .. }), "{error}");
    let mut corrupt = BytesMut::from(&batch(&[b"x"])[..]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let error = kafka.produce_async("t", 0, corrupt.freeze(), Acks::Durable).unwrap().wait().unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::CorruptBatch, .. }), "{error}");
    let error = kafka.fetch_async("t", 0, 99, 1024, 0).unwrap().wait().unwrap_err();
    assert!(matches!(error, ClientError::Server { code: ErrorCode::OffsetOutOfRange, .. }), "{error}");
    let error = super::kafka::kafka_error(crate::kafka::error::GROUP_ID_NOT_FOUND, "group g", None);
    assert!(matches!(error, ClientError::Kafka { code: 69, .. }), "{error}");
}

#[test]
fn kafka_pipelining_keeps_many_requests_in_flight_in_order() {
    let broker = FakeBroker::start().unwrap();
    let kafka = kafka_client(&broker);
    kafka.create_topic("p", 2).unwrap();
    let pending: Vec<_> = (0..200u32)
        .map(|i| kafka.produce_async("p", i % 2, batch(&[b"v"]), Acks::Durable).unwrap())
        .collect();
    for (i, pending) in pending.into_iter().enumerate() {
        assert_eq!(pending.wait().unwrap().base_offset, i as i64 / 2);
    }
    assert_eq!(kafka.connection().unwrap().in_flight(), 0);
}

#[test]
fn a_kafka_broker_that_goes_away_fails_producers_and_consumers() {
    let mut broker = FakeBroker::start().unwrap();
    let kafka = kafka_client(&broker);
    kafka.create_topic("gone", 1).unwrap();
    let (mut producer, reports) = producer(&kafka.session(), ProducerConfig::new("gone"));
    producer.send(None, b"before").unwrap();
    producer.flush().unwrap();
    let mut consumer = Consumer::new(kafka.session(), "gone", &[0], StartAt::Earliest).unwrap();
    assert_eq!(consumer.poll(Duration::from_millis(10)).unwrap().len(), 1);
    // A long-poll in flight when the broker goes: it fails at once, not at the timeout.
    let waiting = kafka.fetch_async("gone", 0, 1, 1024, 60_000).unwrap();
    // Let it park at the fake (which answers at once once it is told to stop).
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    broker.shutdown();
    assert!(waiting.wait().unwrap_err().is_disconnect());
    assert!(started.elapsed() < Duration::from_secs(3));

    // A prefetch answered before the shutdown may still come out (empty) first.
    let error = (0..3)
        .find_map(|_| consumer.poll(Duration::from_millis(10)).err())
        .expect("the consumer notices the broker is gone");
    assert!(error.is_disconnect(), "{error}");
    let _ = producer.send(None, b"after");
    let error = producer.flush().unwrap_err();
    assert!(error.is_disconnect() || matches!(error, ClientError::DeliveryFailed { .. }), "{error}");
    let reports = reports.lock().unwrap();
    assert!(reports[0].error.is_none());
    assert!(reports.len() == 1 || reports[1].error.is_some(), "the lost batch is reported as lost");
}

#[test]
fn a_client_on_the_other_protocols_port_is_told_which_port_it_reached() {
    let broker = FakeBroker::start().unwrap();
    let (native, kafka) = (broker.addr(), broker.kafka_addr());
    let error = Client::connect(&kafka.to_string()).unwrap_err();
    assert!(matches!(error, ClientError::WrongProtocol { found: Protocol::Kafka, .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains(&format!("{kafka} speaks the Kafka protocol")), "{text}");
    assert!(text.contains("native listener (--listen, default 127.0.0.1:7070)"), "{text}");

    let error = KafkaClient::connect(&native.to_string()).unwrap_err();
    assert!(matches!(error, ClientError::WrongProtocol { found: Protocol::Native, .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains(&format!("{native} speaks Pyralog's native protocol")), "{text}");
    assert!(text.contains("Kafka listener (--kafka-listen, default 127.0.0.1:9092)"), "{text}");
}

#[test]
fn a_port_that_speaks_neither_protocol_keeps_the_original_error() {
    // Accepts, reads a little and closes: neither a native nor a Kafka listener.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let closer = std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            let mut stream = stream.unwrap();
            let mut buf = [0u8; 16];
            let _ = std::io::Read::read(&mut stream, &mut buf);
        }
    });
    let error = Client::connect(&addr.to_string()).unwrap_err();
    assert!(matches!(error, ClientError::Disconnected { .. }), "{error}");
    closer.join().unwrap();
}

#[test]
fn a_refused_connection_says_no_node_is_listening_once() {
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    for error in [
        Client::connect(&addr.to_string()).unwrap_err(),
        KafkaClient::connect(&addr.to_string()).unwrap_err(),
    ] {
        assert!(error.is_disconnect(), "{error}");
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("no pyralog node is listening on {addr} (connection refused)")),
            "{text}"
        );
        assert!(text.contains("target/release/pyralog"), "{text}");
        // The cause is in the message once: nothing below it for a report to print again.
        assert!(std::error::Error::source(&error).is_none(), "{text}");
        assert_eq!(text.matches("refused").count(), 1, "{text}");
    }
}

#[test]
fn errors_name_the_topic_in_words_not_rust_names() {
    let broker = FakeBroker::start().unwrap();
    let native = client(&broker);
    let kafka = kafka_client(&broker);
    for error in
        [native.partition_count("nope").unwrap_err(), Transport::partition_count(&kafka, "nope").unwrap_err()]
    {
        assert!(matches!(error, ClientError::Server { code: ErrorCode::UnknownTopic, .. }), "{error}");
        assert_eq!(error.to_string(), "topic 'nope' does not exist");
    }
    assert_eq!(ErrorCode::UnknownTopic.to_string(), "the topic does not exist");
    let silent = ClientError::Server { code: ErrorCode::Overloaded, message: String::new() };
    assert_eq!(silent.to_string(), "the node is overloaded; try again later");
    kafka.create_topic("t", 1).unwrap();
    let text = kafka.create_topic("t", 1).unwrap_err().to_string();
    assert!(!text.contains("TopicAlreadyExists"), "{text}");
    assert!(text.contains("already exists"), "{text}");
}

#[test]
fn no_cause_is_both_in_a_message_and_below_it() {
    let corrupt = ClientError::CorruptBatch {
        topic: "t".into(),
        partition: 0,
        error: BatchError::Magic { at: 0, magic: 1 },
    };
    let io = KafkaClientError::from(std::io::Error::other("reset by peer"));
    for error in [&corrupt as &dyn std::error::Error, &io] {
        assert!(error.source().is_none(), "{error}");
    }
    assert!(
        corrupt.to_string().ends_with("magic 1, only magic 2 (RecordBatch v2) is supported"),
        "{corrupt}"
    );
    assert_eq!(io.to_string(), "connection: reset by peer");
}

// Leader changes, against a fake cluster whose nodes share one log.

fn cluster_client(broker: &FakeBroker, node: u32, leader_retry_budget: Duration) -> Client {
    let options = ConnectOptions {
        request_timeout: Duration::from_secs(5),
        leader_retry_budget,
        ..ConnectOptions::default()
    };
    Client::connect_with(&broker.node_addr(node).to_string(), options).expect("the fake cluster is up")
}

/// Every record of `partition`, in offset order: (offset, value).
fn log_of(client: &Client, topic: &str, partition: u32) -> Vec<(i64, Vec<u8>)> {
    let fetched = client.fetch(topic, partition, 0, 64 << 20, 0).unwrap();
    fetched.reader().map(|r| r.unwrap()).map(|r| (r.offset, r.value.to_vec())).collect()
}

#[test]
fn the_producer_follows_a_leader_change_and_acknowledges_every_record_once_in_order() {
    let broker = FakeBroker::start_cluster(2).unwrap();
    let client = cluster_client(&broker, 0, LEADER_RETRY_BUDGET_DEFAULT);
    client.create_topic("moving", 2).unwrap();
    let partitions = client.partitions("moving").unwrap();
    assert_eq!((partitions[1].leader_node, partitions[1].port), (1, broker.node_addr(1).port()));
    assert_eq!(partitions[1].replicas, [0, 1]);
    let config = ProducerConfig {
        batch_bytes: 256,
        linger: Duration::ZERO,
        partitioner: Partitioner::RoundRobin,
        max_in_flight_batches: 8,
        ..ProducerConfig::new("moving")
    };
    let (mut producer, reports) = producer(&client, config);
    for i in 0..400u32 {
        if i == 200 {
            // Both partitions change leaders while batches are on their way.
            broker.move_leader("moving", 0, 1);
            broker.move_leader("moving", 1, 0);
        }
        producer.send(None, format!("value-{i:03}").as_bytes()).unwrap();
    }
    producer.flush().unwrap();
    assert!(producer.leader_retries() > 0, "the old leaders refused some batches");
    let reports = reports.lock().unwrap();
    let mut next_offset = [0i64; 2];
    for report in reports.iter() {
        assert!(report.error.is_none(), "{:?}", report.error);
        let partition = report.partition as usize;
        assert_eq!(report.base_offset, next_offset[partition], "acknowledged in send order, once each");
        next_offset[partition] += i64::from(report.record_count);
    }
    assert_eq!(next_offset, [200, 200]);
    assert!(reports.iter().any(|r| r.retries > 0));
    for partition in 0..2 {
        let values: Vec<Vec<u8>> = log_of(&client, "moving", partition).into_iter().map(|(_, v)| v).collect();
        let sent: Vec<Vec<u8>> =
            (partition..400).step_by(2).map(|i| format!("value-{i:03}").into_bytes()).collect();
        assert_eq!(values, sent, "partition {partition}: nothing lost, copied or reordered");
    }
    let addrs = client.connection_addrs();
    assert!(addrs.contains(&broker.node_addr(0)) && addrs.contains(&broker.node_addr(1)), "{addrs:?}");
}

/// Node 0, leading partition 0, stores the first of five batches and dies before it answers
/// any; the producer (`idempotent` or not) sends the five again to node 1. Returns the
/// partition's log and the reports.
fn a_leader_dies_with_five_batches_unanswered(idempotent: bool) -> (Vec<(i64, Vec<u8>)>, Reports) {
    let mut broker = FakeBroker::start_cluster(3).unwrap();
    // Bootstrapped from node 0, which leads partition 0 and then goes away.
    let client = cluster_client(&broker, 0, LEADER_RETRY_BUDGET_DEFAULT);
    client.create_topic("crash", 1).unwrap();
    let config = ProducerConfig { linger: Duration::ZERO, idempotent, ..ProducerConfig::new("crash") };
    let (mut producer, reports) = producer(&client, config);
    for i in 0..10u8 {
        producer.send(None, &[i]).unwrap();
    }
    producer.flush().unwrap();
    broker.hold_produce_responses(true);
    for i in 10..15u8 {
        producer.send(None, &[i]).unwrap();
    }
    // The fake answers a connection's requests in turn: it stores the first of the five and
    // holds its answer, the other four wait behind it.
    while broker.next_offset("crash", 0) != Some(11) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Node 0 dies before it answers.
    broker.stop_node(0);
    broker.hold_produce_responses(false);
    producer.flush().unwrap();
    assert_eq!(broker.leader("crash", 0), (1, 2));
    // The client asks the metadata of the nodes still up.
    assert_eq!(client.metadata(&[]).unwrap().node_id, 1);
    {
        // The first ten may share batches (an idempotent producer keeps five of a partition's
        // batches in flight; the next one fills meanwhile); the last five are one each.
        let reports = reports.lock().unwrap();
        assert_eq!(reports.iter().map(|r| r.record_count).sum::<u32>(), 15);
        assert!(reports.iter().all(|r| r.error.is_none()), "every batch acknowledged");
        assert_eq!(
            reports.iter().filter(|r| r.retries == 1).count(),
            5,
            "the five unanswered ones, once each"
        );
    }
    (log_of(&client, "crash", 0), reports)
}

#[test]
fn batches_a_stopped_leader_never_answered_are_sent_again_at_least_once_without_idempotence() {
    let (log, reports) = a_leader_dies_with_five_batches_unanswered(false);
    // The batch node 0 stored is in the log twice; each acknowledgement names where its
    // record is.
    let values: Vec<u8> = log.iter().map(|(_, v)| v[0]).collect();
    assert_eq!(values, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 11, 12, 13, 14], "sent again in send order");
    acknowledgements_name_their_records(&log, &reports);
}

/// Each report's base offset is where its batch's first record is in `log`.
fn acknowledgements_name_their_records(log: &[(i64, Vec<u8>)], reports: &Reports) {
    let mut first = 0u8;
    for report in reports.lock().unwrap().iter() {
        assert_eq!(log[report.base_offset as usize].1, [first], "the batch from record {first}");
        first += report.record_count as u8;
    }
}

#[test]
fn batches_a_stopped_leader_never_answered_are_stored_once_by_an_idempotent_producer() {
    let (log, reports) = a_leader_dies_with_five_batches_unanswered(true);
    // The batch node 0 stored is recognised by its producer id and sequence when it comes
    // again: answered with its first offsets, not stored twice.
    let values: Vec<u8> = log.iter().map(|(_, v)| v[0]).collect();
    assert_eq!(values, (0..15).collect::<Vec<u8>>(), "each once, in send order");
    acknowledgements_name_their_records(&log, &reports);
}

/// Sends records 0..`count` (200 bytes each, one per batch) to the one partition of topic
/// "idem" that node 0 of `broker` leads, idempotently, and waits for every acknowledgement.
/// `before_sending` runs once the producer has its id. Returns the log and the reports.
fn produce_one_per_batch(
    broker: &FakeBroker,
    count: u8,
    before_sending: impl FnOnce(&mut Producer, &Reports),
) -> (Vec<(i64, Vec<u8>)>, Reports) {
    let client = cluster_client(broker, 0, LEADER_RETRY_BUDGET_DEFAULT);
    client.create_topic("idem", 1).unwrap();
    assert_eq!(broker.leader("idem", 0).0, 0);
    let config = ProducerConfig { batch_bytes: 256, linger: Duration::ZERO, ..ProducerConfig::new("idem") };
    let (mut producer, reports) = producer(&client, config);
    before_sending(&mut producer, &reports);
    let first = reports.lock().unwrap().len() as u8;
    for i in first..count {
        producer.send(None, &[i; 200]).unwrap();
    }
    producer.flush().unwrap();
    let reports_seen = reports.lock().unwrap();
    let errors: Vec<_> = reports_seen.iter().filter_map(|r| r.error.as_ref()).collect();
    assert!(errors.is_empty(), "every batch acknowledged: {errors:?}");
    assert!(reports_seen.iter().all(|r| r.record_count == 1), "one record per batch");
    drop(reports_seen);
    (log_of(&client, "idem", 0), reports)
}

/// The log holds records 0..`count`, each once, in send order, at the offsets acknowledged.
fn each_once_in_order(log: &[(i64, Vec<u8>)], reports: &Reports, count: u8) {
    let firsts: Vec<u8> = log.iter().map(|(_, v)| v[0]).collect();
    assert_eq!(firsts, (0..count).collect::<Vec<u8>>(), "each once, in send order");
    for (report, (offset, _)) in reports.lock().unwrap().iter().zip(log) {
        assert_eq!(report.base_offset, *offset);
    }
}

/// The leader refuses an idempotent producer's first batch (it is elected a moment later)
/// and takes those behind it. A leader takes an unknown producer's batch at any sequence, so
/// the first batch would never fit in again: it goes alone, and the next ones once it is
/// acknowledged.
#[test]
fn an_idempotent_producers_first_batch_of_a_partition_goes_alone() {
    let broker = FakeBroker::start_cluster(2).unwrap();
    broker.refuse_one_produce(0, 0);
    // The refusal is held back a moment, so any batch sent behind the first is there before
    // the producer hears of it.
    broker.hold_produce_responses_for(Duration::from_millis(200));
    let (log, reports) = produce_one_per_batch(&broker, 12, |_, _| {});
    each_once_in_order(&log, &reports, 12);
    assert_eq!(reports.lock().unwrap()[0].retries, 1, "the refused first batch, sent again");
}

/// Past its first batch, a batch the leader refuses while it takes the next ones: those
/// are refused as out of sequence (the leader knows the producer now), and go again after
/// the refused one.
#[test]
fn batches_refused_out_of_sequence_behind_a_refused_one_go_again_after_it() {
    let broker = FakeBroker::start_cluster(2).unwrap();
    let (log, reports) = produce_one_per_batch(&broker, 20, |producer, _| {
        producer.send(None, &[0; 200]).unwrap();
        producer.flush().unwrap();
        broker.refuse_one_produce(0, 1);
        // The refusal is held back a moment, so batches are sent behind the refused one
        // before the producer hears of it, however slowly this machine runs the test.
        broker.hold_produce_responses_for(Duration::from_millis(200));
    });
    each_once_in_order(&log, &reports, 20);
    let retried = reports.lock().unwrap().iter().filter(|r| r.retries > 0).count();
    assert!(retried >= 2, "the refused batch and those refused behind it went again: {retried}");
}

/// A fake cluster of `nodes`, a client bootstrapped from node 1 with `request_timeout`, and a
/// producer (no linger) of topic "paused", led by node 0, whose first record ("before") is
/// acknowledged.
fn producing_to_node_0_of(nodes: u32, request_timeout: Duration) -> (FakeBroker, Client, Producer, Reports) {
    let broker = FakeBroker::start_cluster(nodes).unwrap();
    let options = ConnectOptions {
        request_timeout,
        leader_retry_budget: LEADER_RETRY_BUDGET_DEFAULT,
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(&broker.node_addr(1).to_string(), options).unwrap();
    client.create_topic("paused", 1).unwrap();
    assert_eq!(broker.leader("paused", 0).0, 0);
    let config = ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::new("paused") };
    let (mut producer, reports) = producer(&client, config);
    producer.send(None, b"before").unwrap();
    producer.flush().unwrap();
    (broker, client, producer, reports)
}

/// A leader that stops answering without closing its connections (SIGSTOP, a cut network):
/// the produce times out, and the client reads the metadata again and follows the new
/// leader instead of failing the records.
#[test]
fn batches_a_silent_leader_did_not_answer_go_to_the_next_one() {
    let (broker, client, mut producer, reports) = producing_to_node_0_of(2, Duration::from_millis(300));
    // Node 0 stores the next batch and goes silent before it answers; the others elect
    // node 1.
    broker.pause_node(Some(0));
    producer.send(None, b"during").unwrap();
    while broker.next_offset("paused", 0) != Some(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
    broker.move_leader("paused", 0, 1);
    producer.flush().unwrap();
    broker.pause_node(None);
    let reports = reports.lock().unwrap();
    assert!(
        reports.iter().all(|r| r.error.is_none()),
        "{:?}",
        reports.iter().map(|r| &r.error).collect::<Vec<_>>()
    );
    assert_eq!(reports[1].retries, 1, "sent again to node 1 after the timeout");
    let values: Vec<Vec<u8>> = log_of(&client, "paused", 0).into_iter().map(|(_, v)| v).collect();
    // Node 0 stored the batch it never answered for; sent again, it is recognised (the
    // producer is idempotent by default).
    assert_eq!(values, [b"before".to_vec(), b"during".to_vec()]);
}

#[test]
fn batches_a_replaced_leader_leaves_unanswered_go_to_the_new_one_before_the_timeout() {
    let (broker, client, mut producer, reports) = producing_to_node_0_of(3, Duration::from_secs(20));
    // Node 0 stores the first of five batches and goes silent (the fake serves a
    // connection's requests in turn: the other four, and metadata asked there, wait behind
    // it); the others elect node 2.
    broker.pause_node(Some(0));
    for _ in 0..5 {
        producer.send(None, b"during").unwrap();
    }
    while broker.next_offset("paused", 0) != Some(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
    broker.move_leader("paused", 0, 2);
    let started = Instant::now();
    producer.flush().unwrap();
    let took = started.elapsed();
    broker.pause_node(None);
    // One look at the other nodes after LEADER_CHECK_INTERVAL (500 ms) finds node 2 for all
    // five; a look per batch would take 2.5 s, the request timeout 20 s.
    assert!(took < Duration::from_millis(2400), "took {took:?}");
    let reports = reports.lock().unwrap();
    let errors: Vec<_> = reports.iter().filter_map(|r| r.error.as_ref()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let retries: Vec<u32> = reports.iter().map(|r| r.retries).collect();
    assert_eq!(retries, [0, 1, 1, 1, 1, 1]);
    let (leader, epoch) = broker.leader("paused", 0);
    assert_eq!(
        client.leader_name("paused", 0),
        format!("node {leader} at {}, epoch {epoch}", broker.node_addr(2))
    );
    // Node 0 stored the first batch it never answered for, recognised when it came again
    // (the other four it refuses once it reads them: it no longer leads).
    let values = log_of(&client, "paused", 0);
    assert_eq!(values.len(), 6);
}

#[test]
fn the_consumer_keeps_its_position_across_leader_changes() {
    let mut broker = FakeBroker::start_cluster(2).unwrap();
    let client = cluster_client(&broker, 1, LEADER_RETRY_BUDGET_DEFAULT);
    client.create_topic("read", 1).unwrap();
    let produce = |from: u8| {
        let values: Vec<Vec<u8>> = (from..from + 10).map(|i| vec![i]).collect();
        let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        client.produce("read", 0, batch(&values), Acks::Durable).unwrap();
    };
    let mut consumer = Consumer::new(client.clone(), "read", &[0], StartAt::Earliest).unwrap();
    let mut consumed = Vec::new();
    let mut read_until = |consumer: &mut Consumer, count: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while consumed.len() < count {
            assert!(Instant::now() < deadline, "stuck at {} records", consumed.len());
            let records = consumer.poll(Duration::from_millis(50)).unwrap();
            consumed.extend(records.iter().map(|r| (r.offset, r.value[0])));
        }
    };
    produce(0);
    read_until(&mut consumer, 10);
    broker.move_leader("read", 0, 1);
    produce(10);
    read_until(&mut consumer, 20);
    broker.stop_node(1);
    produce(20);
    read_until(&mut consumer, 30);
    let expected: Vec<(i64, u8)> = (0..30).map(|i| (i64::from(i), i)).collect();
    assert_eq!(consumed, expected, "every record once, in order, across two leader changes");
    // The stopped node's lost connection at least; the move only if a fetch reached the old
    // leader after it (one already long-polling there answers with the new records).
    assert!(consumer.leader_retries() >= 1, "{}", consumer.leader_retries());
    assert_eq!(consumer.position(0), Some(30));
}

#[test]
fn a_fetch_a_replaced_leader_leaves_unanswered_goes_to_the_new_one_before_the_timeout() {
    let broker = FakeBroker::start_cluster(3).unwrap();
    let options = ConnectOptions {
        request_timeout: Duration::from_secs(20),
        leader_retry_budget: LEADER_RETRY_BUDGET_DEFAULT,
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(&broker.node_addr(1).to_string(), options).unwrap();
    client.create_topic("read", 1).unwrap();
    assert_eq!(broker.leader("read", 0).0, 0);
    let values: Vec<[u8; 1]> = (0..20).map(|i| [i]).collect();
    let values: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
    client.produce("read", 0, batch(&values[..10]), Acks::Durable).unwrap();
    let mut consumer = Consumer::new(client.clone(), "read", &[0], StartAt::Earliest).unwrap();
    let mut consumed = Vec::new();
    while consumed.len() < 10 {
        consumed.extend(consumer.poll(Duration::from_millis(100)).unwrap().iter().map(|r| r.value[0]));
    }
    // Node 0 goes silent with the next fetch long-polling there; the others elect node 2,
    // which takes ten more records.
    broker.pause_node(Some(0));
    broker.move_leader("read", 0, 2);
    let writer = Client::connect(&broker.node_addr(2).to_string()).unwrap();
    writer.produce("read", 0, batch(&values[10..]), Acks::Durable).unwrap();
    let started = Instant::now();
    while consumed.len() < 20 {
        assert!(started.elapsed() < Duration::from_secs(30), "stuck at {} records", consumed.len());
        consumed.extend(consumer.poll(Duration::from_millis(100)).unwrap().iter().map(|r| r.value[0]));
    }
    let took = started.elapsed();
    broker.pause_node(None);
    // Its long-poll wait (100 ms) plus LEADER_CHECK_INTERVAL (500 ms), then one look at
    // another node's metadata; the request timeout is 20 s.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(consumed, (0..20).collect::<Vec<u8>>(), "every record once, in order");
    assert_eq!(consumer.leader_retries(), 1);
}

#[test]
fn retries_are_bounded_and_end_naming_the_partition_and_its_leader() {
    let broker = FakeBroker::start_cluster(2).unwrap();
    let budget = Duration::from_millis(300);
    let client = cluster_client(&broker, 0, budget);
    client.create_topic("stuck", 1).unwrap();
    broker.refuse_leadership(true);
    let leader = format!("node 0 at {}, epoch 1", broker.node_addr(0));
    let check = |error: &ClientError, started: Instant| {
        let ClientError::LeaderUnavailable { topic, partition, leader: named, retries, last, .. } = error
        else {
            panic!("{error}")
        };
        assert_eq!((topic.as_str(), *partition, named.as_str()), ("stuck", 0, leader.as_str()));
        assert!(*retries > 2, "{error}");
        assert!(matches!(**last, ClientError::Server { code: ErrorCode::NotLeader, .. }), "{error}");
        assert!(!error.is_disconnect());
        let waited = started.elapsed();
        assert!(waited >= budget / 2 && waited < budget + Duration::from_secs(1), "{waited:?}");
        let text = error.to_string();
        assert!(text.starts_with("stuck/0: no leader took the request in "), "{text}");
        assert!(text.contains(&leader) && text.contains("does not lead stuck/0"), "{text}");
    };

    let started = Instant::now();
    check(&client.produce("stuck", 0, batch(&[b"x"]), Acks::Durable).unwrap_err(), started);

    let (mut producer, reports) = producer(&client, ProducerConfig::new("stuck"));
    producer.send(None, b"y").unwrap();
    let started = Instant::now();
    let error = producer.flush().unwrap_err();
    assert!(matches!(error, ClientError::DeliveryFailed { failed_batches: 1, .. }), "{error}");
    check(reports.lock().unwrap()[0].error.as_ref().unwrap(), started);

    let mut consumer = Consumer::new(client.clone(), "stuck", &[0], StartAt::Offset(0)).unwrap();
    let started = Instant::now();
    let error = loop {
        match consumer.poll(Duration::from_millis(50)) {
            Ok(records) => assert!(records.is_empty()),
            Err(error) => break error,
        }
    };
    check(&error, started);
    assert_eq!(broker.next_offset("stuck", 0), Some(0), "no node took anything");
}
