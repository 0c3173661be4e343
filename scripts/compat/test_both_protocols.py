"""Both protocols, one log: what pyralog-bench produces over the native protocol kcat consumes
over Kafka's, and the other way round; and keyed records land on the partition the Kafka Java
client's default partitioner (and the native client's key-hash partitioner) picks."""

import collections
import json
import struct
import subprocess

from confluent_kafka import Producer

import kcat
from admin import create_topic

BENCH_TIMEOUT_S = 120.0
BENCH_HEADER_BYTES = 20
UINT64 = (1 << 64) - 1


def bench_payload_filler(producer: int, sequence: int, size: int) -> bytes:
    """The filler pyralog-bench writes after its 20-byte header (bench/src/payload.rs), so a
    foreign producer can write payloads `pyralog-bench consume --verify` checks byte by byte."""
    seed = ((sequence ^ (producer << 40)) * 0x9E3779B97F4A7C15) & UINT64
    return bytes(
        ((seed >> ((position % 8) * 8)) & 0xFF) ^ ((position * 31) & 0xFF) ^ ((position >> 8) & 0xFF)
        for position in range(size)
    )


def bench_payload(producer: int, sequence: int, size: int) -> bytes:
    header = struct.pack(">IQQ", producer, sequence, 0)
    return header + bench_payload_filler(producer, sequence, size - BENCH_HEADER_BYTES)


def run_bench(bench_bin: str, *args):
    """Runs pyralog-bench with --json; returns (exit code, report, stderr)."""
    command = [bench_bin, *args, "--json", "--deadline-secs", "60"]
    result = subprocess.run(command, capture_output=True, timeout=BENCH_TIMEOUT_S)
    stderr = result.stderr.decode(errors="replace")
    try:
        report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"{' '.join(command)} exited {result.returncode} with no JSON report: {stderr}")
    return result.returncode, report, stderr


def test_bench_produces_natively_and_kcat_consumes_every_message(node, bench_bin, kcat_bin):
    topic, messages, size = "native-in", 1_000, 64
    code, report, stderr = run_bench(bench_bin, "produce", "--broker", node.native, "--topic", topic,
                                     "--partitions", "2", "--messages", str(messages),
                                     "--message-bytes", str(size), "--partitioner", "round-robin")
    assert code == 0, stderr
    assert (report["acked"], report["errors"]) == (messages, 0), report

    records = kcat.consume(kcat_bin, node.bootstrap, topic)

    assert len(records) == messages
    sequences = collections.Counter()
    by_partition = collections.defaultdict(list)
    producers = set()
    for partition, offset, key, value in records:
        assert key is None
        assert len(value) == size
        producer, sequence, _ = struct.unpack_from(">IQQ", value)
        producers.add(producer)
        assert value[BENCH_HEADER_BYTES:] == bench_payload_filler(producer, sequence, size - BENCH_HEADER_BYTES), (
            f"partition {partition} offset {offset}: payload damaged")
        sequences[sequence] += 1
        by_partition[partition].append((offset, sequence))
    assert len(producers) == 1, f"one bench producer wrote them all: {producers}"
    assert set(sequences) == set(range(messages)) and max(sequences.values()) == 1
    assert set(by_partition) == {0, 1}
    for partition, seen in by_partition.items():
        assert [o for o, _ in seen] == list(range(len(seen))), f"partition {partition}: offsets not contiguous"
        assert [s for _, s in seen] == sorted(s for _, s in seen), f"partition {partition}: out of order"


def test_kcat_produces_and_bench_consumes_natively_with_verify(node, bench_bin, kcat_bin, tmp_path):
    topic, messages, size, producer = "kafka-in", 1_000, 64, 7
    create_topic(node.bootstrap, topic, 2)
    # One file per message: kcat sends each file whole, so binary payloads need no delimiter.
    files = []
    for sequence in range(messages):
        path = tmp_path / f"m{sequence:05d}"
        path.write_bytes(bench_payload(producer, sequence, size))
        files.append(str(path))
    kcat.run(kcat_bin, node.bootstrap, "-P", "-t", topic, *files)

    code, report, stderr = run_bench(bench_bin, "consume", "--broker", node.native, "--topic", topic,
                                     "--messages", str(messages), "--verify", "--idle-secs", "5")

    assert code == 0, f"pyralog-bench consume --verify exited {code}: {stderr}"
    assert report["consumed"] == messages, report
    assert (report["verify_problems"], report["verify_unread"], report["verify_producers"]) == (0, 0, 1), report


# Kafka's murmur2 test vectors, the ones the native client's partitioner is tested with
# (net/src/client/partitioner.rs, murmur2_matches_kafka).
MURMUR2_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


def murmur2(data: bytes) -> int:
    """Kafka's Utils.murmur2: 32-bit murmur2, seed 0x9747b28c, as a signed Java int."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    h = (0x9747B28C ^ len(data)) & mask
    whole = len(data) - len(data) % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    tail = data[whole:]
    if tail:
        for i in reversed(range(len(tail))):
            h ^= tail[i] << (8 * i)
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def java_default_partition(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def test_keys_land_on_the_java_default_partitioners_partition(node, kcat_bin):
    topic, partitions = "placed", 7
    assert [(key, murmur2(key)) for key, _ in MURMUR2_VECTORS] == MURMUR2_VECTORS
    keys = [key for key, _ in MURMUR2_VECTORS] + [f"user-{i}".encode() for i in range(200)]
    expected = {key: java_default_partition(key, partitions) for key in keys}
    assert set(expected.values()) == set(range(partitions)), "the keys cover every partition"
    create_topic(node.bootstrap, topic, partitions)

    kcat.run(kcat_bin, node.bootstrap, "-P", "-t", topic, "-K:", "-X", "partitioner=murmur2_random",
             input_bytes=b"".join(key + b":kcat\n" for key in keys))
    errors = []
    producer = Producer({"bootstrap.servers": node.bootstrap, "partitioner": "murmur2_random",
                         "error_cb": errors.append})
    for key in keys:
        producer.produce(topic, key=key, value=b"confluent",
                         on_delivery=lambda error, _: error is not None and errors.append(error))
    assert producer.flush(30) == 0 and errors == [], errors[:5]

    records = kcat.consume(kcat_bin, node.bootstrap, topic)

    landed = collections.defaultdict(set)
    for partition, _, key, value in records:
        landed[(key, value)].add(partition)
    assert len(records) == 2 * len(keys)
    misplaced = [(key, client, sorted(found), expected[key])
                 for (key, client), found in landed.items() if found != {expected[key]}]
    assert misplaced == [], f"(key, client, partitions, Java's partition): {misplaced[:10]}"
    assert {client for _, client in landed} == {b"kcat", b"confluent"}
