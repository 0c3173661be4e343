"""kcat (librdkafka) against the Kafka listener: metadata, a keyed 100k round trip, a consume
from inside a batch, and compressed produce with every codec."""

import collections
import json
import subprocess
import zlib

import pytest

import kafka_wire
import kcat
from admin import create_topic


def test_kcat_metadata_lists_each_shard_as_a_broker_and_the_topics(start_node, pyralog_bin, kcat_bin):
    node = start_node("--kafka-advertise", "localhost:{kafka_port}")
    # Created over the native protocol: Kafka clients would go on to the advertised name.
    for name, count in (("orders", 4), ("audit", 1)):
        subprocess.run([pyralog_bin, "topic", "create", name, "--partitions", str(count), "--broker", node.native],
                       check=True, capture_output=True, timeout=30)

    metadata = json.loads(kcat.run(kcat_bin, node.bootstrap, "-L", "-J"))

    # Each shard is a broker, at the advertised host and a port of its own.
    brokers = sorted(metadata["brokers"], key=lambda b: b["id"])
    assert [b["id"] for b in brokers] == [0, 1]
    hosts_ports = [b["name"].rsplit(":", 1) for b in brokers]
    assert all(host == "localhost" for host, _ in hosts_ports), brokers
    ports = {int(port) for _, port in hosts_ports}
    assert len(ports) == 2 and node.kafka_port not in ports, brokers
    assert metadata["controllerid"] == 0
    topics = {topic["topic"]: topic for topic in metadata["topics"]}
    assert set(topics) == {"orders", "audit"}
    for name, count in (("orders", 4), ("audit", 1)):
        assert "error" not in topics[name], topics[name]
        partitions = sorted(topics[name]["partitions"], key=lambda p: p["partition"])
        assert [p["partition"] for p in partitions] == list(range(count))
        for partition in partitions:
            # The leader is the shard that owns the partition, its only replica.
            assert partition["leader"] in (0, 1)
            assert partition["replicas"] == [{"id": partition["leader"]}]
            assert partition["isrs"] == [{"id": partition["leader"]}]
    orders_leaders = {p["leader"] for p in topics["orders"]["partitions"]}
    assert orders_leaders == {0, 1}, "the partitions are spread over both shards"
    # The human listing names the same brokers.
    listing = kcat.run(kcat_bin, node.bootstrap, "-L").decode()
    for broker in brokers:
        assert f"broker {broker['id']} at {broker['name']}" in listing, listing
    assert 'topic "orders" with 4 partitions' in listing


def test_kcat_100k_keyed_messages_round_trip_in_partition_order(node, kcat_bin, tmp_path):
    messages, keys, partitions = 100_000, 1_000, 4
    create_topic(node.bootstrap, "keyed", partitions)
    source = tmp_path / "keyed.txt"
    source.write_text("".join(f"key-{i % keys}:{i}\n" for i in range(messages)))

    kcat.run(kcat_bin, node.bootstrap, "-P", "-t", "keyed", "-K:", "-l", str(source))
    records = kcat.consume(kcat_bin, node.bootstrap, "keyed")

    assert len(records) == messages
    values = collections.Counter(int(value) for _, _, _, value in records)
    assert set(values) == set(range(messages)), "some messages are missing"
    assert max(values.values()) == 1, f"delivered twice: {[v for v, n in values.items() if n > 1][:10]}"
    by_partition = collections.defaultdict(list)
    key_partitions = collections.defaultdict(set)
    for partition, offset, key, value in records:
        assert key == f"key-{int(value) % keys}".encode(), (partition, offset, key, value)
        by_partition[partition].append((offset, int(value)))
        key_partitions[key].add(partition)
    assert set(by_partition) == set(range(partitions)), "every partition gets keys"
    for partition, seen in by_partition.items():
        offsets = [offset for offset, _ in seen]
        assert offsets == list(range(len(seen))), f"partition {partition}: offsets not contiguous from 0"
        produced = [value for _, value in seen]
        assert produced == sorted(produced), f"partition {partition}: values out of produce order"
    for key, landed in key_partitions.items():
        # librdkafka's default partitioner (consistent_random): CRC-32 of the key.
        assert landed == {zlib.crc32(key) % partitions}, (key, landed)


def test_kcat_consume_from_an_offset_inside_a_batch_starts_at_that_offset(node, kcat_bin):
    messages = 200
    # A long linger puts the messages into a few large batches.
    kcat.run(kcat_bin, node.bootstrap, "-P", "-t", "batched", "-p", "0", "-X", "linger.ms=200",
             input_bytes="".join(f"m{i}\n" for i in range(messages)).encode())
    with kafka_wire.Connection(node.bootstrap) as wire:
        batches = wire.stored_batches("batched", 0)
        batch = max(batches, key=lambda b: b["count"])
        assert batch["count"] >= 3, f"kcat sent no batch of 3 or more records: {batches}"
        inside = batch["base_offset"] + batch["count"] // 2
        assert batch["base_offset"] < inside <= batch["base_offset"] + batch["last_offset_delta"]
        # The broker answers with the whole batch holding the offset, as Kafka does.
        error, high_watermark, records = wire.fetch("batched", 0, inside)
        assert (error, high_watermark) == (0, messages)
        assert kafka_wire.parse_batches(records)[0]["base_offset"] == batch["base_offset"]

    records = kcat.consume(kcat_bin, node.bootstrap, "batched", "-p", "0", "-o", str(inside))

    assert [offset for _, offset, _, _ in records] == list(range(inside, messages))
    assert [value for _, _, _, value in records] == [f"m{i}".encode() for i in range(inside, messages)]


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_kcat_compressed_produce_is_stored_compressed_and_consumed_intact(node, kcat_bin, codec):
    messages = 2_000
    topic = f"compressed-{codec}"
    values = [f"{codec}-{i:06d}-{'payload ' * (i % 20)}".encode() for i in range(messages)]
    # -d msg: librdkafka logs why it would send a batch uncompressed.
    _, log = kcat.run_with_stderr(kcat_bin, node.bootstrap, "-P", "-t", topic, "-p", "0", "-z", codec,
                                  "-X", "linger.ms=50", "-d", "msg",
                                  input_bytes=b"".join(value + b"\n" for value in values))

    records = kcat.consume(kcat_bin, node.bootstrap, topic)

    assert [offset for _, offset, _, _ in records] == list(range(messages))
    assert [value for _, _, _, value in records] == values
    with kafka_wire.Connection(node.bootstrap) as wire:
        batches = wire.stored_batches(topic, 0)
    assert sum(batch["count"] for batch in batches) == messages
    compressed = sum(b["count"] for b in batches if b["codec"] == kafka_wire.CODECS[codec])
    reasons = sorted({line.split("]: ", 1)[-1] for line in log.splitlines() if "not compressing" in line})
    # librdkafka sends a batch uncompressed when compressing does not make it smaller.
    assert compressed >= 0.9 * messages, (
        f"{compressed} of {messages} records stored with {codec}; librdkafka says: {reasons}")
