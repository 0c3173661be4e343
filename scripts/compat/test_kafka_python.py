"""kafka-python against the Kafka listener: topic admin, and produce then consume through a
consumer group with a commit."""

import collections
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from admin import ADMIN_TIMEOUT_MS, admin_client

CONSUME_TIMEOUT_S = 30.0
DELETE_VISIBLE_TIMEOUT_S = 10.0


def test_kafka_python_admin_creates_and_deletes_topics(node):
    admin = admin_client(node.bootstrap)
    try:
        created = admin.create_topics([NewTopic("ledger", 3, 1), NewTopic("events", 1, 1)],
                                      timeout_ms=ADMIN_TIMEOUT_MS)
        assert {t["name"]: (t["error_code"], t["num_partitions"]) for t in created["topics"]} == {
            "ledger": (0, 3), "events": (0, 1)}
        assert {"ledger", "events"} <= set(admin.list_topics())
        described = {t["name"]: t for t in admin.describe_topics(["ledger", "events"])}
        assert sorted(p["partition_index"] for p in described["ledger"]["partitions"]) == [0, 1, 2]
        assert [p["partition_index"] for p in described["events"]["partitions"]] == [0]
        assert described["ledger"]["topic_id"] != described["events"]["topic_id"]

        deleted = admin.delete_topics(["ledger"], timeout_ms=ADMIN_TIMEOUT_MS)
        assert [(t["name"], t["error_code"]) for t in deleted["topics"]] == [("ledger", 0)]
        deadline = time.monotonic() + DELETE_VISIBLE_TIMEOUT_S
        while "ledger" in admin.list_topics() and time.monotonic() < deadline:
            time.sleep(0.1)
        topics = set(admin.list_topics())
        assert "ledger" not in topics, f"deleted topic still listed after {DELETE_VISIBLE_TIMEOUT_S}s"
        assert "events" in topics
    finally:
        admin.close()


def test_kafka_python_produces_and_consumes_through_a_group_and_commits(node):
    topic, group, partitions, messages = "orders", "order-readers", 3, 600
    admin = admin_client(node.bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)], timeout_ms=ADMIN_TIMEOUT_MS)
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=node.bootstrap, acks="all", linger_ms=5)
    try:
        futures = [producer.send(topic, key=f"customer-{i % 37}".encode(), value=str(i).encode())
                   for i in range(messages)]
        producer.flush(timeout=30)
        delivered = [future.get(timeout=10) for future in futures]
    finally:
        producer.close(timeout=10)
    end_offsets = collections.Counter(metadata.partition for metadata in delivered)
    assert sum(end_offsets.values()) == messages

    consumer = KafkaConsumer(bootstrap_servers=node.bootstrap, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=500,
                             request_timeout_ms=15000)
    try:
        consumer.subscribe([topic])
        records = []
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while len(records) < messages and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records += batch
        assert len(records) == messages, (
            f"consumed {len(records)} of {messages} in {CONSUME_TIMEOUT_S}s; assignment {consumer.assignment()}")
        assert {tp.partition for tp in consumer.assignment()} == set(range(partitions))
        values = collections.Counter(int(r.value) for r in records)
        assert set(values) == set(range(messages)) and max(values.values()) == 1
        for partition in range(partitions):
            mine = [r for r in records if r.partition == partition]
            assert [r.offset for r in mine] == list(range(end_offsets[partition]))
            assert [int(r.value) for r in mine] == sorted(int(r.value) for r in mine)
        consumer.commit()
        for partition in range(partitions):
            committed = consumer.committed(TopicPartition(topic, partition))
            assert committed == end_offsets[partition], f"partition {partition}: committed {committed}"
    finally:
        consumer.close(autocommit=False)
