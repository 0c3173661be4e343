"""What clients see of a node whose shards are Kafka brokers of their own (the suite's nodes run
two shards): each consumer group is listed by one broker only, a replication factor above 1 is
refused with a message saying it counts nodes, and a transactional producer fails at once
instead of waiting for a transaction coordinator that does not exist."""

import collections
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from admin import admin_client, create_topic

CLIENT_CALL_TIMEOUT_S = 10.0
# init_transactions() is given this long; the node must refuse well within it.
INIT_TRANSACTIONS_TIMEOUT_S = 30.0
INIT_TRANSACTIONS_REFUSED_WITHIN_S = 5.0
GROUPS = [f"listed-{index}" for index in range(8)]


def commit_as_group(bootstrap: str, group: str, topic: str):
    """Commits an offset for `group` without joining it: the group then exists, Empty."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 1)], asynchronous=False)
    finally:
        consumer.close()


def test_each_group_is_listed_by_exactly_one_broker_the_one_that_coordinates_it(node):
    create_topic(node.bootstrap, "committed", 1)
    for group in GROUPS:
        commit_as_group(node.bootstrap, group, "committed")
    admin = AdminClient({"bootstrap.servers": node.bootstrap})
    described = admin.describe_consumer_groups(GROUPS)
    coordinators = {group: future.result(timeout=CLIENT_CALL_TIMEOUT_S).coordinator.id
                    for group, future in described.items()}
    brokers = set(admin.list_topics(timeout=CLIENT_CALL_TIMEOUT_S).brokers)
    # Otherwise one broker lists everything and the test proves nothing about the others.
    assert set(coordinators.values()) == brokers, (coordinators, brokers)

    # kafka-python asks every broker of the metadata and concatenates their lists.
    kafka_python = admin_client(node.bootstrap)
    try:
        counts = collections.Counter(group["group_id"] for group in kafka_python.list_groups())
        assert {group: counts[group] for group in GROUPS} == {group: 1 for group in GROUPS}, counts
        for broker in sorted(brokers):
            listed_here = sorted(g["group_id"] for g in kafka_python.list_groups(broker_ids=[broker]))
            coordinated_here = sorted(g for g, coordinator in coordinators.items() if coordinator == broker)
            assert listed_here == coordinated_here, f"broker {broker}"
    finally:
        kafka_python.close()
    # librdkafka asks every broker too (and drops repeats itself since 2.x).
    listed = admin.list_consumer_groups().result(timeout=CLIENT_CALL_TIMEOUT_S)
    assert listed.errors == [], listed.errors
    assert set(GROUPS) <= {group.group_id for group in listed.valid}, listed.valid


def test_a_replication_factor_above_one_is_refused_saying_it_counts_nodes_not_shard_brokers(node):
    admin = AdminClient({"bootstrap.servers": node.bootstrap})
    brokers = admin.list_topics(timeout=CLIENT_CALL_TIMEOUT_S).brokers
    # What a tool sizing replication by the broker count asks for.
    assert len(brokers) == 2, brokers
    future = admin.create_topics([NewTopic("replicated", 1, len(brokers))])["replicated"]
    try:
        future.result(timeout=CLIENT_CALL_TIMEOUT_S)
        raise AssertionError("a topic with replication factor 2 was created on a single node")
    except KafkaException as failure:
        error = failure.args[0]
    assert error.name() == "INVALID_REPLICATION_FACTOR", error
    message = error.str()
    assert "counts nodes" in message and "shard" in message, message
    assert "only 1" in message, message


def test_init_transactions_fails_at_once_saying_transactions_are_not_supported(node):
    producer = Producer({"bootstrap.servers": node.bootstrap, "transactional.id": "payments"})
    started = time.monotonic()
    try:
        producer.init_transactions(INIT_TRANSACTIONS_TIMEOUT_S)
        raise AssertionError("init_transactions succeeded on a node without transactions")
    except KafkaException as failure:
        error = failure.args[0]
    elapsed = time.monotonic() - started
    assert elapsed < INIT_TRANSACTIONS_REFUSED_WITHIN_S, f"refused after {elapsed:.1f}s: {error}"
    assert "transactions are not supported" in error.str(), error
    assert error.fatal() and not error.retriable(), error
