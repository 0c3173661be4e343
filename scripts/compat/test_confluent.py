"""confluent-kafka (librdkafka inside) against the Kafka listener: the idempotent producer,
compressed produce, a consumer group splitting and taking over partitions, committed offsets
across a node restart, and an idempotent batch sent again at the wire level (on the same
connection, on a new one, and after a restart)."""

import collections
import logging
import re
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

import kafka_wire
from admin import create_topic

FLUSH_TIMEOUT_S = 30.0
CONSUME_TIMEOUT_S = 30.0
GROUP_TIMEOUT_S = 20.0
CLIENT_CALL_TIMEOUT_S = 10.0


def produce(bootstrap: str, topic: str, messages, **config):
    """Produces (partition or None, key, value) messages; returns the delivery reports as
    (partition, offset, value), failing on any delivery error."""
    errors, delivered = [], []

    def on_delivery(error, message):
        if error is not None:
            errors.append(error)
        else:
            delivered.append((message.partition(), message.offset(), message.value()))

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "error_cb": errors.append, **config})
    for partition, key, value in messages:
        extra = {} if partition is None else {"partition": partition}
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery, **extra)
        producer.poll(0)
    remaining = producer.flush(FLUSH_TIMEOUT_S)
    assert remaining == 0, f"{remaining} messages undelivered after {FLUSH_TIMEOUT_S}s; errors: {errors[:5]}"
    assert errors == [], errors[:5]
    return delivered


def read_partitions(bootstrap: str, topic: str, partitions: int, count: int):
    """Reads `count` records from the start of every partition with assign() (no group
    membership); returns [(partition, offset, key, value)] in arrival order."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "compat-reader",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
    })
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        records = []
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            records.append((message.partition(), message.offset(), message.key(), message.value()))
        # Anything beyond `count` would be a duplicate: give it a moment to show up.
        extra = consumer.consume(num_messages=100, timeout=0.5)
        records += [(m.partition(), m.offset(), m.key(), m.value()) for m in extra if m.error() is None]
        return records
    finally:
        consumer.close()


def test_idempotent_producer_with_acks_all_delivers_each_message_once_in_order(node):
    topic, partitions, messages = "idempotent", 2, 20_000
    create_topic(node.bootstrap, topic, partitions)

    delivered = produce(node.bootstrap, topic,
                        [(None, f"key-{i % 100}".encode(), str(i).encode()) for i in range(messages)],
                        **{"enable.idempotence": True, "acks": "all"})

    assert len(delivered) == messages
    records = read_partitions(node.bootstrap, topic, partitions, messages)
    assert len(records) == messages, f"consumed {len(records)} of {messages}"
    assert sorted((p, o, v) for p, o, _, v in records) == sorted(delivered), "consumed != delivery reports"
    values = collections.Counter(int(value) for *_, value in records)
    assert set(values) == set(range(messages)) and max(values.values()) == 1
    for partition in range(partitions):
        seen = [(o, int(v)) for p, o, _, v in records if p == partition]
        assert [o for o, _ in seen] == list(range(len(seen))), f"partition {partition}: offsets not contiguous"
        assert [v for _, v in seen] == sorted(v for _, v in seen), f"partition {partition}: out of order"
    # The batches went through the idempotent path: a producer id and gap-free sequences.
    with kafka_wire.Connection(node.bootstrap) as wire:
        for partition in range(partitions):
            batches = wire.stored_batches(topic, partition)
            assert all(b["producer_id"] >= 0 for b in batches), f"partition {partition}: a batch has no producer id"
            assert len({(b["producer_id"], b["producer_epoch"]) for b in batches}) == 1
            sequence = 0
            for batch in batches:
                assert batch["base_sequence"] == sequence, (partition, batch)
                sequence += batch["count"]


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_confluent_compressed_produce_is_stored_compressed_and_consumed_intact(node, codec):
    topic, messages = f"compressed-{codec}", 2_000
    values = [f"{codec}-{i:06d}-{'payload ' * (i % 20)}".encode() for i in range(messages)]

    produce(node.bootstrap, topic, [(0, None, value) for value in values],
            **{"compression.codec": codec, "linger.ms": 50})

    records = read_partitions(node.bootstrap, topic, 1, messages)
    assert [offset for _, offset, _, _ in records] == list(range(messages))
    assert [value for *_, value in records] == values
    with kafka_wire.Connection(node.bootstrap) as wire:
        batches = wire.stored_batches(topic, 0)
    compressed = sum(b["count"] for b in batches if b["codec"] == kafka_wire.CODECS[codec])
    # librdkafka sends a batch uncompressed when compressing does not make it smaller.
    assert compressed >= 0.9 * messages, f"{compressed} of {messages} records stored with {codec}: {batches[:3]}"


class ClientLog(logging.Handler):
    """librdkafka's group debug log, kept for failure messages: the group errors (such as
    "JoinGroup error: Broker: Coordinator not available") never reach poll() or error_cb."""

    def __init__(self):
        super().__init__()
        self.lines = collections.deque(maxlen=2000)
        self.logger = logging.getLogger(f"rdkafka.{id(self)}")
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False

    def emit(self, record):
        self.lines.append(record.getMessage())

    def errors(self, limit: int = 5):
        found = [line for line in self.lines if re.search(r"error|fail", line, re.IGNORECASE)]
        return list(dict.fromkeys(found))[-limit:]


def partitions_of(consumer) -> set:
    return {tp.partition for tp in consumer.assignment()}


def group_consumer(bootstrap: str, group: str, log: ClientLog, **config) -> Consumer:
    return Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "debug": "cgrp",
        "logger": log.logger,
        **config,
    })


def close(consumer):
    """Closes a consumer that may be closed already."""
    try:
        consumer.close()
    except RuntimeError:
        pass


def test_two_consumers_in_a_group_split_the_partitions_and_one_takes_all_when_the_other_leaves(node):
    topic, everything = "grouped", {0, 1, 2, 3}
    create_topic(node.bootstrap, topic, 4)
    log, message_errors = ClientLog(), []
    first, second = (group_consumer(node.bootstrap, "split", log) for _ in range(2))
    try:
        first.subscribe([topic])
        second.subscribe([topic])
        mine, theirs = set(), set()
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for consumer in (first, second):
                message = consumer.poll(0.2)
                if message is not None and message.error() is not None:
                    message_errors.append(message.error())
            mine, theirs = partitions_of(first), partitions_of(second)
            if mine and theirs and not mine & theirs and mine | theirs == everything:
                break
        assert mine and theirs, (
            f"no split within {GROUP_TIMEOUT_S}s: assignments {mine} and {theirs}; "
            f"client errors {message_errors[:5]}; librdkafka: {log.errors()}")
        assert not mine & theirs, f"both consumers own {mine & theirs}"
        assert mine | theirs == everything, f"{everything - (mine | theirs)} unassigned"

        # ListGroups and DescribeGroups see the group as the clients do.
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": node.bootstrap})
        listed = admin.list_consumer_groups().result(timeout=CLIENT_CALL_TIMEOUT_S)
        assert "split" in {group.group_id for group in listed.valid}, listed.valid
        described = admin.describe_consumer_groups(["split"])["split"].result(timeout=CLIENT_CALL_TIMEOUT_S)
        assert str(described.state).endswith("STABLE"), described.state
        assert len(described.members) == 2, described.members
        assert {member.host for member in described.members} == {"/127.0.0.1"}, described.members
        described_partitions = {tp.partition for member in described.members for tp in member.assignment.topic_partitions}
        assert described_partitions == everything, described_partitions

        second.close()
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while partitions_of(first) != everything and time.monotonic() < deadline:
            first.poll(0.2)
        assert partitions_of(first) == everything, (
            f"the remaining consumer has {partitions_of(first)} {GROUP_TIMEOUT_S}s after the other left; "
            f"librdkafka: {log.errors()}")
    finally:
        close(first)
        close(second)


def test_a_static_member_that_restarts_gets_its_partitions_back_without_a_rebalance(node):
    topic, everything = "static", {0, 1, 2, 3}
    create_topic(node.bootstrap, topic, 4)
    log = ClientLog()
    revoked = []
    config = {"session.timeout.ms": 10000}
    stays = group_consumer(node.bootstrap, "static-group", log, **{"group.instance.id": "stays"}, **config)
    leaves = group_consumer(node.bootstrap, "static-group", log, **{"group.instance.id": "returns"}, **config)
    returned = None
    try:
        stays.subscribe([topic], on_revoke=lambda _, partitions: revoked.append(partitions))
        leaves.subscribe([topic])
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while time.monotonic() < deadline:
            stays.poll(0.2)
            leaves.poll(0.2)
            if partitions_of(stays) and partitions_of(leaves) and partitions_of(stays) | partitions_of(leaves) == everything:
                break
        kept, theirs = partitions_of(stays), partitions_of(leaves)
        assert kept and theirs and not kept & theirs, f"no split: {kept} and {theirs}; librdkafka: {log.errors()}"
        revoked.clear()

        # A static member does not leave the group when it closes; the same instance id coming
        # back within the session timeout takes its place and its partitions.
        leaves.close()
        returned = group_consumer(node.bootstrap, "static-group", log, **{"group.instance.id": "returns"}, **config)
        returned.subscribe([topic])
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while partitions_of(returned) != theirs and time.monotonic() < deadline:
            returned.poll(0.2)
            stays.poll(0.2)
        assert partitions_of(returned) == theirs, (
            f"the returning member has {partitions_of(returned)}, not {theirs}; librdkafka: {log.errors()}")
        for _ in range(10):
            stays.poll(0.2)
        assert partitions_of(stays) == kept, "the member that stayed kept its partitions"
        assert revoked == [], f"the member that stayed saw a rebalance: {revoked}"
    finally:
        close(stays)
        close(leaves)
        if returned is not None:
            close(returned)


def test_every_message_acknowledged_with_acks_all_survives_kill_9(node):
    """Durability over the Kafka listener: a librdkafka producer (acks=all, idempotent) runs
    while the node is killed with SIGKILL; after a restart every message whose delivery was
    reported is at its reported offset, with its value, and the log has no gaps."""
    import threading

    topic = "durable"
    create_topic(node.bootstrap, topic, 2)
    delivered = {}

    def on_delivery(error, message):
        if error is None:
            delivered[(message.partition(), message.offset())] = message.value()

    producer = Producer({
        "bootstrap.servers": node.bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "message.timeout.ms": 5000,
        "reconnect.backoff.max.ms": 100,
    })
    killer = threading.Timer(1.5, node.kill)
    killer.start()
    started, sequence = time.monotonic(), 0
    while time.monotonic() - started < 3.0:
        try:
            producer.produce(topic, value=b"m%08d" % sequence, on_delivery=on_delivery)
            sequence += 1
        except BufferError:
            pass
        producer.poll(0)
    killer.join()
    producer.flush(10)  # the rest fail: the node is down
    assert len(delivered) > 100, f"only {len(delivered)} deliveries before the kill"

    node.restart()
    probe = Consumer({"bootstrap.servers": node.bootstrap, "group.id": "durable-probe"})
    try:
        ends = [probe.get_watermark_offsets(TopicPartition(topic, p), timeout=CLIENT_CALL_TIMEOUT_S)[1] for p in (0, 1)]
    finally:
        probe.close()
    stored = {}
    for partition, offset, _key, value in read_partitions(node.bootstrap, topic, 2, sum(ends)):
        stored[(partition, offset)] = value
    assert len(stored) == sum(ends), f"read {len(stored)} of the {sum(ends)} stored messages"
    missing = [(at, value) for at, value in delivered.items() if stored.get(at) != value]
    assert not missing, f"{len(missing)} acknowledged messages lost or changed after kill -9, e.g. {missing[:3]}"
    for partition in (0, 1):
        offsets = sorted(offset for p, offset in stored if p == partition)
        assert offsets == list(range(len(offsets))), f"partition {partition} has gaps"


def test_offsets_committed_before_a_restart_are_honoured_after_it(node):
    topic, group, committed_at = "resume", "resume-group", 40
    create_topic(node.bootstrap, topic, 1)
    produce(node.bootstrap, topic, [(0, None, f"m{i}".encode()) for i in range(100)], acks="all")
    log = ClientLog()

    consumer = group_consumer(node.bootstrap, group, log, **{"enable.auto.commit": False})
    try:
        consumer.subscribe([topic])
        offsets = []
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while len(offsets) < committed_at and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                offsets.append(message.offset())
        assert offsets[:committed_at] == list(range(committed_at)), (
            f"consumed {offsets[:10]}... within {GROUP_TIMEOUT_S}s; librdkafka: {log.errors()}")
        consumer.commit(offsets=[TopicPartition(topic, 0, committed_at)], asynchronous=False)
        (before,) = consumer.committed([TopicPartition(topic, 0)], timeout=CLIENT_CALL_TIMEOUT_S)
        assert before.offset == committed_at
    finally:
        close(consumer)

    node.restart()

    consumer = group_consumer(node.bootstrap, group, log, **{"enable.auto.commit": False})
    try:
        (after,) = consumer.committed([TopicPartition(topic, 0)], timeout=CLIENT_CALL_TIMEOUT_S)
        assert after.offset == committed_at, f"committed offset after the restart: {after.offset}"
        consumer.subscribe([topic])
        first = None
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while first is None and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                first = message
        assert first is not None, f"nothing consumed after the restart; librdkafka: {log.errors()}"
        assert (first.offset(), first.value()) == (committed_at, f"m{committed_at}".encode()), (
            "the group did not resume from its committed offset")
    finally:
        close(consumer)


def test_a_resent_idempotent_batch_is_stored_once(node):
    topic = "resent"
    create_topic(node.bootstrap, topic, 1)
    records = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(10)]

    with kafka_wire.Connection(node.bootstrap) as wire:
        error, producer_id, epoch = wire.init_producer_id()
        assert (error, epoch) == (kafka_wire.ERROR_NONE, 0) and producer_id >= 0
        batch = kafka_wire.record_batch(records[:5], producer_id, epoch, base_sequence=0)
        first = wire.produce(topic, 0, batch)
        again = wire.produce(topic, 0, batch)
    # A client retries on a new connection after losing the old one.
    with kafka_wire.Connection(node.bootstrap) as wire:
        retried = wire.produce(topic, 0, batch)
        following = wire.produce(topic, 0, kafka_wire.record_batch(records[5:], producer_id, epoch, 5))

    assert first == (kafka_wire.ERROR_NONE, 0)
    for resent in (again, retried):
        # Kafka answers a duplicate with success, or DUPLICATE_SEQUENCE_NUMBER, and the
        # original base offset either way.
        assert resent[0] in (kafka_wire.ERROR_NONE, kafka_wire.ERROR_DUPLICATE_SEQUENCE_NUMBER), resent
        assert resent[1] == first[1], f"the re-sent batch got base offset {resent[1]}, not {first[1]}"
    assert following == (kafka_wire.ERROR_NONE, 5)
    consumed = read_partitions(node.bootstrap, topic, 1, len(records))
    assert [(o, k, v) for _, o, k, v in consumed] == [(i, k, v) for i, (k, v) in enumerate(records)]


def test_a_batch_resent_after_a_node_restart_is_still_stored_once(node):
    """The producer state behind duplicate detection is rebuilt from the log at start-up."""
    topic = "resent-across-restart"
    create_topic(node.bootstrap, topic, 1)
    records = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(3)]
    with kafka_wire.Connection(node.bootstrap) as wire:
        error, producer_id, epoch = wire.init_producer_id()
        assert error == kafka_wire.ERROR_NONE
        batch = kafka_wire.record_batch(records, producer_id, epoch, base_sequence=0)
        assert wire.produce(topic, 0, batch) == (kafka_wire.ERROR_NONE, 0)

    node.restart()

    with kafka_wire.Connection(node.bootstrap) as wire:
        error, base_offset = wire.produce(topic, 0, batch)
        assert error in (kafka_wire.ERROR_NONE, kafka_wire.ERROR_DUPLICATE_SEQUENCE_NUMBER), error
        assert base_offset == 0, f"the batch re-sent after the restart got base offset {base_offset}"
        _, high_watermark, _ = wire.fetch(topic, 0, 0)
    assert high_watermark == len(records), f"{high_watermark} records stored, {len(records)} sent"


def test_committed_offset_of_a_group_that_never_committed_is_unset(node):
    create_topic(node.bootstrap, "nothing-committed", 1)
    consumer = group_consumer(node.bootstrap, "never-committed", ClientLog())
    try:
        try:
            (offset,) = consumer.committed([TopicPartition("nothing-committed", 0)], timeout=CLIENT_CALL_TIMEOUT_S)
        except KafkaException as error:
            pytest.fail(f"committed() for a group with no offsets failed: {error}")
        assert offset.offset < 0, f"a group that never committed has offset {offset.offset}"
    finally:
        close(consumer)
