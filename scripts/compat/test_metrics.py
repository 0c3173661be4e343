"""The operator's HTTP endpoints of a real node (--metrics-listen), read as Prometheus and a
person read them: /metrics parsed by the Prometheus project's own Python parser and checked
against load whose size the test knows (pyralog-bench over the native protocol, confluent-kafka
over Kafka's), consumer group lag against offsets a real group committed, open connections
against sockets the test holds, and /health, /config and an unknown path."""

import collections
import json
import math
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from admin import create_topic
from test_both_protocols import run_bench

HTTP_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 30.0
CONSUME_TIMEOUT_S = 30.0
CLIENT_CALL_TIMEOUT_S = 10.0
BENCH_TIMEOUT_S = 120.0
# The node exposes no event for a connection accepted or closed, nor for the first record of a
# background run stored: the metrics are polled this long, every POLL_INTERVAL_S.
CONNECTIONS_SETTLE_S = 10.0
FIRST_RECORD_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
# pyralog_* families that are node-wide, not per shard.
NODE_WIDE = ("pyralog_build_info", "pyralog_consumer_group_lag_messages", "pyralog_partition_")


def http_get(url: str):
    """GET url; returns (status, content type, body as text), 4xx and 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


class Scrape:
    """One /metrics exposition, parsed by prometheus_client, with the checks every scrape must
    pass: known types only, each series once, a shard label on per-shard families, and
    histograms whose buckets are cumulative, end at +Inf and agree with their _count."""

    def __init__(self, node):
        status, content_type, text = http_get(f"{node.metrics_url}/metrics")
        assert status == 200, text
        assert content_type.startswith("text/plain; version=0.0.4"), content_type
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self._check()

    def _check(self):
        untyped = [name for name, family in self.families.items() if family.type in ("unknown", "untyped")]
        assert untyped == [], f"families the parser could not type (a sample outside its family?): {untyped}"
        seen = collections.Counter((s.name, tuple(sorted(s.labels.items())))
                                   for family in self.families.values() for s in family.samples)
        assert [series for series, count in seen.items() if count > 1] == []
        for name, family in self.families.items():
            if name.startswith("pyralog_") and not name.startswith(NODE_WIDE):
                unlabelled = [s for s in family.samples if "shard" not in s.labels]
                assert unlabelled == [], f"{name}: samples without a shard label: {unlabelled[:3]}"
            if family.type == "histogram":
                self._check_histogram(family)

    @staticmethod
    def _check_histogram(family):
        buckets = collections.defaultdict(list)
        counts = {}
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            if sample.name == family.name + "_bucket":
                buckets[labels].append((float(sample.labels["le"]), sample.value))
            elif sample.name == family.name + "_count":
                counts[labels] = sample.value
        assert buckets, f"{family.name} has no buckets"
        assert set(buckets) == set(counts), f"{family.name}: series with buckets but no _count or back"
        for labels, series in buckets.items():
            bounds = [bound for bound, _ in series]
            values = [value for _, value in series]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{family.name}{labels}: {bounds}"
            assert values == sorted(values), f"{family.name}{labels}: buckets not cumulative: {values}"
            assert values[-1] == counts[labels], f"{family.name}{labels}: +Inf bucket != _count"

    def samples(self, sample_name: str, **labels):
        """The (labels, value) of every sample of that name whose labels include `labels`."""
        family_name = sample_name
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            if family_name not in self.families and family_name.endswith(suffix):
                family_name = family_name[: -len(suffix)]
        family = self.families.get(family_name)
        assert family is not None, f"no family for {sample_name}; families: {sorted(self.families)}"
        return [(s.labels, s.value) for s in family.samples
                if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]

    def total(self, sample_name: str, **labels) -> float:
        return sum(value for _, value in self.samples(sample_name, **labels))

    def by_topic(self, sample_name: str):
        """Sums per topic of a per-partition family."""
        sums = collections.Counter()
        for labels, value in self.samples(sample_name):
            sums[labels["topic"]] += value
        return dict(sums)

    def counters(self):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in self.families.values() if family.type in ("counter", "histogram")
                for s in family.samples if not s.name.endswith("_bucket")}


def assert_counters_never_fell(earlier: Scrape, later: Scrape):
    later_counters = later.counters()
    fell = [(series, value, later_counters.get(series)) for series, value in earlier.counters().items()
            if later_counters.get(series, -1) < value]
    assert fell == [], f"counters that fell or vanished between scrapes: {fell[:5]}"


def kafka_produce(bootstrap: str, topic: str, count: int, size: int):
    errors = []
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "error_cb": errors.append})
    for index in range(count):
        producer.produce(topic, value=index.to_bytes(4, "big") * (size // 4), partition=index % 2,
                         on_delivery=lambda error, _: error is not None and errors.append(error))
        producer.poll(0)
    remaining = producer.flush(FLUSH_TIMEOUT_S)
    assert remaining == 0 and errors == [], (remaining, errors[:5])


def test_counters_follow_a_known_load_on_both_protocols(start_node, bench_bin):
    node = start_node("--metrics-partitions")
    native_messages, native_bytes = 2_000, 200
    kafka_messages, kafka_bytes = 500, 100
    background_messages = 3_000
    create_topic(node.bootstrap, "kafka-load", 2)
    before = Scrape(node)
    produce = dict(api="produce")

    code, report, stderr = run_bench(bench_bin, "produce", "--broker", node.native, "--topic", "native-load",
                                     "--partitions", "2", "--partitioner", "round-robin",
                                     "--messages", str(native_messages), "--message-bytes", str(native_bytes))
    assert code == 0 and report["acked"] == native_messages, stderr
    after_native = Scrape(node)
    kafka_produce(node.bootstrap, "kafka-load", kafka_messages, kafka_bytes)
    after_kafka = Scrape(node)

    def grew(earlier, later, name, **labels):
        return later.total(name, **labels) - earlier.total(name, **labels)

    # Each protocol's produce is counted under its own label, and only there.
    assert grew(before, after_native, "pyralog_requests_total", protocol="native", **produce) > 0
    assert grew(before, after_native, "pyralog_requests_total", protocol="kafka", **produce) == 0
    assert grew(after_native, after_kafka, "pyralog_requests_total", protocol="kafka", **produce) > 0
    assert grew(after_native, after_kafka, "pyralog_requests_total", protocol="native", **produce) == 0
    # Requests carry at least their payload; every produce answered went into the latency histogram.
    assert grew(before, after_native, "pyralog_request_bytes_total", protocol="native", **produce) >= \
        native_messages * native_bytes
    assert grew(after_native, after_kafka, "pyralog_request_bytes_total", protocol="kafka", **produce) >= \
        kafka_messages * kafka_bytes
    for protocol, (earlier, later) in {"native": (before, after_native), "kafka": (after_native, after_kafka)}.items():
        assert grew(earlier, later, "pyralog_produce_latency_seconds_count", protocol=protocol) == \
            grew(earlier, later, "pyralog_requests_total", protocol=protocol, **produce), protocol
        assert grew(earlier, later, "pyralog_response_bytes_total", protocol=protocol, **produce) > 0
    # Sync mode: every acknowledged byte was flushed first.
    assert grew(before, after_kafka, "pyralog_flushed_bytes_total") >= \
        native_messages * native_bytes + kafka_messages * kafka_bytes
    assert grew(before, after_kafka, "pyralog_flush_duration_seconds_count") > 0
    assert after_kafka.by_topic("pyralog_partition_log_end_offset") == \
        {"native-load": native_messages, "kafka-load": kafka_messages}
    assert after_kafka.by_topic("pyralog_partition_high_watermark") == \
        {"native-load": native_messages, "kafka-load": kafka_messages}
    assert after_kafka.total("pyralog_partitions") == 4
    assert after_kafka.total("pyralog_log_size_bytes") == after_kafka.total("pyralog_partition_size_bytes")
    assert after_kafka.total("pyralog_log_size_bytes") >= native_messages * native_bytes + kafka_messages * kafka_bytes
    assert [labels for labels, _ in after_kafka.samples("pyralog_build_info")] != []
    assert after_kafka.total("process_resident_memory_bytes") > 0
    assert after_kafka.total("process_open_fds") > 0

    # Scraped while a rate-limited bench (about 3 s) produces.
    command = [bench_bin, "produce", "--broker", node.native, "--topic", "background", "--partitions", "2",
               "--messages", str(background_messages), "--rate", "1000", "--message-bytes", "100",
               "--json", "--deadline-secs", "60"]
    bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + FIRST_RECORD_TIMEOUT_S
        while True:
            during = Scrape(node)
            if during.by_topic("pyralog_partition_log_end_offset").get("background", 0) > 0:
                break
            assert bench.poll() is None and time.monotonic() < deadline, "no background record seen"
            time.sleep(POLL_INTERVAL_S)
        assert bench.poll() is None, "the background bench ended before the scrape: it was not mid-run"
        stdout, stderr = bench.communicate(timeout=BENCH_TIMEOUT_S)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 0, stderr.decode(errors="replace")
    assert json.loads(stdout.decode().strip().splitlines()[-1])["acked"] == background_messages
    after = Scrape(node)

    assert 0 < during.by_topic("pyralog_partition_log_end_offset")["background"] < background_messages
    assert grew(after_kafka, during, "pyralog_requests_total", protocol="native", **produce) > 0
    assert grew(during, after, "pyralog_requests_total", protocol="native", **produce) > 0
    assert after.by_topic("pyralog_partition_log_end_offset")["background"] == background_messages
    for earlier, later in [(before, after_native), (after_native, after_kafka), (after_kafka, during), (during, after)]:
        assert_counters_never_fell(earlier, later)


@pytest.mark.parametrize("per_partition", [False, True], ids=["per-topic", "per-partition"])
def test_consumer_group_lag_is_what_the_group_left_unread(start_node, per_partition):
    node = start_node("--group-initial-rebalance-delay-ms", "0", *(["--metrics-partitions"] * per_partition))
    topic, group, produced, consumed = "lagging", "lag-group", 100, 60
    create_topic(node.bootstrap, topic, 2)
    kafka_produce(node.bootstrap, topic, produced, 16)
    consumer = Consumer({"bootstrap.servers": node.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    try:
        consumer.subscribe([topic])
        taken = 0
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while taken < consumed and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None:
                assert message.error() is None, message.error()
                taken += 1
        assert taken == consumed
        consumer.commit(asynchronous=False)
        committed = {tp.partition: tp.offset for tp in consumer.committed(
            [TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=CLIENT_CALL_TIMEOUT_S)}
    finally:
        consumer.close()
    assert sum(committed.values()) == consumed, committed

    lag = Scrape(node).samples("pyralog_consumer_group_lag_messages", group=group, topic=topic)

    assert sum(value for _, value in lag) == produced - consumed
    if per_partition:
        by_partition = {int(labels["partition"]): value for labels, value in lag}
        assert by_partition == {p: produced // 2 - committed[p] for p in (0, 1)}, (by_partition, committed)
    else:
        assert [labels for labels, _ in lag] == [{"group": group, "topic": topic}]


def test_health_config_and_an_unknown_path(start_node):
    node = start_node("--metrics-partitions")

    status, content_type, body = http_get(f"{node.metrics_url}/health")
    assert (status, body) == (200, "ready: 2 shards serving\n"), body
    assert content_type.startswith("text/plain")

    status, content_type, body = http_get(f"{node.metrics_url}/config")
    assert status == 200 and content_type == "application/json", (status, content_type)
    config = json.loads(body)
    assert config["metrics-partitions"] is True
    assert config["data-dir"] == node.data_dir and node.data_dir.startswith("/")
    assert config["shards"] == 2
    assert config["metrics-listen"] == f"127.0.0.1:{node.metrics_port}"
    assert config["listen"] == node.native

    status, _, body = http_get(f"{node.metrics_url}/nope")
    assert status == 404, body
    assert "/nope is not served" in body


def native_connections(node) -> float:
    return Scrape(node).total("pyralog_connections", protocol="native")


def wait_for_connections(node, satisfied):
    """Polls the gauge until `satisfied(value)`, at most CONNECTIONS_SETTLE_S: an accept or a
    close on the node's side has no event a client can wait on."""
    deadline = time.monotonic() + CONNECTIONS_SETTLE_S
    value = native_connections(node)
    while not satisfied(value) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        value = native_connections(node)
    return value


def test_the_connections_gauge_counts_open_sockets(node):
    idle = native_connections(node)
    sockets = [socket.create_connection(("127.0.0.1", node.native_port), timeout=HTTP_TIMEOUT_S) for _ in range(3)]
    try:
        opened = wait_for_connections(node, lambda value: value >= idle + 3)
        assert opened >= idle + 3, f"{opened} native connections with 3 open (idle: {idle})"
    finally:
        for sock in sockets:
            sock.close()
    closed = wait_for_connections(node, lambda value: value <= idle)
    assert closed == idle, f"{closed} native connections {CONNECTIONS_SETTLE_S}s after closing all 3"
