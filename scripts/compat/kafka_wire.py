"""Kafka's wire format by hand: just enough to send requests no client library lets a test
shape itself (the same idempotent batch twice) and to look at batches as the broker stores
them (base offset, codec, producer id), which client libraries hide.

Only non-flexible request versions are spoken here (request header v1, response header v0):
InitProducerId v0, Produce v3, Fetch v4. Field layouts follow Kafka's message schemas
(shared/kafka-messages/*.json). Every socket operation has a timeout.
"""

import socket
import struct
import time

API_PRODUCE = 0
API_FETCH = 1
API_METADATA = 3
API_FIND_COORDINATOR = 10
API_INIT_PRODUCER_ID = 22
API_OFFSET_FOR_LEADER_EPOCH = 23

ERROR_NONE = 0
ERROR_NOT_LEADER_OR_FOLLOWER = 6
ERROR_NOT_ENOUGH_REPLICAS = 19
ERROR_FENCED_LEADER_EPOCH = 74
ERROR_UNKNOWN_LEADER_EPOCH = 75
ERROR_DUPLICATE_SEQUENCE_NUMBER = 46

CODEC_NONE = 0
CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}

BATCH_HEADER_BYTES = 61


def _crc32c_table():
    # CRC-32C (Castagnoli), reflected polynomial 0x82F63B78.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def uvarint(value: int) -> bytes:
    """Unsigned varint, as in the flexible versions' lengths and tags."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint(value: int) -> bytes:
    """Zig-zag varint, as in a record's fields."""
    return uvarint((value << 1) ^ (value >> 63))


def read_varint(data: bytes, position: int):
    """Returns (value, position after it)."""
    shift = 0
    zigzag = 0
    while True:
        byte = data[position]
        position += 1
        zigzag |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (zigzag >> 1) ^ -(zigzag & 1), position
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def record(offset_delta: int, key, value, timestamp_delta: int = 0) -> bytes:
    body = bytearray()
    body.append(0)  # attributes
    body += varint(timestamp_delta)
    body += varint(offset_delta)
    for field in (key, value):
        if field is None:
            body += varint(-1)
        else:
            body += varint(len(field)) + field
    body += varint(0)  # headers
    return varint(len(body)) + bytes(body)


def record_batch(records, producer_id=-1, producer_epoch=-1, base_sequence=-1, base_timestamp_ms=None):
    """An uncompressed RecordBatch v2 of (key, value) pairs, CRC-32C over attributes onward."""
    assert records, "a batch holds at least one record"
    if base_timestamp_ms is None:
        base_timestamp_ms = int(time.time() * 1000)
    body = b"".join(record(i, key, value) for i, (key, value) in enumerate(records))
    after_crc = struct.pack(
        ">hiqqqhii",
        0,  # attributes: no codec, CreateTime, not transactional
        len(records) - 1,  # lastOffsetDelta
        base_timestamp_ms,
        base_timestamp_ms,  # maxTimestamp: every record has delta 0
        producer_id,
        producer_epoch,
        base_sequence,
        len(records),
    ) + body
    # batchLength counts from partitionLeaderEpoch: epoch 4 + magic 1 + crc 4 + the rest.
    batch_length = 4 + 1 + 4 + len(after_crc)
    return struct.pack(">qiibI", 0, batch_length, -1, 2, crc32c(after_crc)) + after_crc


def parse_batches(data: bytes):
    """Splits a record set into batch headers (dicts), decoding uncompressed records too. A
    trailing partial batch (a fetch may end in one) is ignored, as clients do."""
    batches = []
    position = 0
    while len(data) - position >= BATCH_HEADER_BYTES:
        base_offset, batch_length = struct.unpack_from(">qi", data, position)
        end = position + 12 + batch_length
        if end > len(data):
            break
        (leader_epoch, magic, crc, attributes, last_offset_delta, base_timestamp, max_timestamp,
         producer_id, producer_epoch, base_sequence, count) = struct.unpack_from(
            ">ibIhiqqqhii", data, position + 12)
        assert magic == 2, f"magic {magic} at byte {position}"
        assert crc == crc32c(data[position + 21:end]), f"CRC mismatch in the batch at offset {base_offset}"
        batch = {
            "base_offset": base_offset,
            "leader_epoch": leader_epoch,
            "control": bool(attributes & 0x20),
            "last_offset_delta": last_offset_delta,
            "codec": attributes & 7,
            "producer_id": producer_id,
            "producer_epoch": producer_epoch,
            "base_sequence": base_sequence,
            "count": count,
            "records": None,
        }
        if attributes & 7 == CODEC_NONE:
            batch["records"] = _parse_records(data[position + BATCH_HEADER_BYTES:end], base_offset, count)
        batches.append(batch)
        position = end
    return batches


def _parse_records(data: bytes, base_offset: int, count: int):
    records = []
    position = 0
    for _ in range(count):
        length, position = read_varint(data, position)
        end = position + length
        position += 1  # attributes
        _, position = read_varint(data, position)  # timestamp delta
        offset_delta, position = read_varint(data, position)
        fields = []
        for _ in range(2):
            size, position = read_varint(data, position)
            if size < 0:
                fields.append(None)
            else:
                fields.append(data[position:position + size])
                position += size
        records.append((base_offset + offset_delta, fields[0], fields[1]))
        position = end
    return records


class Reader:
    """Big-endian reads over a response body."""

    def __init__(self, data: bytes):
        self.data = data
        self.position = 0

    def take(self, fmt: str):
        values = struct.unpack_from(fmt, self.data, self.position)
        self.position += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def string(self):
        length = self.take(">h")
        if length < 0:
            return None
        value = self.data[self.position:self.position + length].decode()
        self.position += length
        return value

    def bytes(self):
        length = self.take(">i")
        if length < 0:
            return None
        value = self.data[self.position:self.position + length]
        self.position += length
        return value

    def array(self, read_one):
        count = self.take(">i")
        return None if count < 0 else [read_one() for _ in range(count)]

    # The flexible versions' encodings (KIP-482): unsigned varint lengths plus one, and tagged
    # fields.

    def uvarint(self):
        value, shift = 0, 0
        while True:
            byte = self.data[self.position]
            self.position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def compact_string(self):
        length = self.uvarint() - 1
        if length < 0:
            return None
        value = self.data[self.position:self.position + length].decode()
        self.position += length
        return value

    def compact_bytes(self):
        length = self.uvarint() - 1
        if length < 0:
            return None
        value = self.data[self.position:self.position + length]
        self.position += length
        return value

    def compact_array(self, read_one):
        count = self.uvarint() - 1
        return None if count < 0 else [read_one() for _ in range(count)]

    def tags(self, read_tag=None):
        """Reads a tagged-field section: `read_tag(tag)` reads the fields it knows (and must
        read each whole); the others are skipped."""
        for _ in range(self.uvarint()):
            tag, size = self.uvarint(), self.uvarint()
            end = self.position + size
            if read_tag is not None and read_tag(tag):
                assert self.position == end, f"tagged field {tag}: read {self.position - end + size} of {size} bytes"
            self.position = end


def string(value) -> bytes:
    if value is None:
        return struct.pack(">h", -1)
    encoded = value.encode()
    return struct.pack(">h", len(encoded)) + encoded


def array(items) -> bytes:
    items = list(items)
    return struct.pack(">i", len(items)) + b"".join(items)


def compact_string(value) -> bytes:
    if value is None:
        return uvarint(0)
    encoded = value.encode()
    return uvarint(len(encoded) + 1) + encoded


def compact_bytes(value) -> bytes:
    return uvarint(0) if value is None else uvarint(len(value) + 1) + value


def compact_array(items) -> bytes:
    items = list(items)
    return uvarint(len(items) + 1) + b"".join(items)


NO_TAGS = uvarint(0)


def _fetched_partition(reader, topic: str, partition: int, head: str):
    """The one partition of a Fetch response's topics: (error, high watermark, records);
    `head` reads each partition's fixed fields, index, error and high watermark first."""
    def partition_data():
        index, error, high_watermark, *_ = reader.take(head)
        reader.array(lambda: reader.take(">qq"))  # aborted transactions
        return index, error, high_watermark, reader.bytes() or b""

    topics = reader.array(lambda: (reader.string(), reader.array(partition_data)))
    assert len(topics) == 1 and topics[0][0] == topic, topics
    (index, error, high_watermark, records), = topics[0][1]
    assert index == partition
    return error, high_watermark, records


class Connection:
    """One TCP connection to the Kafka listener, one request in flight at a time."""

    def __init__(self, address: str, timeout_s: float = 10.0, client_id: str = "compat-wire"):
        host, port = address.rsplit(":", 1)
        self.socket = socket.create_connection((host, int(port)), timeout=timeout_s)
        self.client_id = client_id
        self.correlation_id = 0

    def close(self):
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def request(self, api_key: int, api_version: int, body: bytes, flexible: bool = False) -> Reader:
        """Sends one request and reads its answer; `flexible`: the version uses the flexible
        encoding (request header v2, response header v1)."""
        self.correlation_id += 1
        header = struct.pack(">hhi", api_key, api_version, self.correlation_id) + string(self.client_id)
        if flexible:
            header += NO_TAGS
        frame = header + body
        self.socket.sendall(struct.pack(">i", len(frame)) + frame)
        size = struct.unpack(">i", self._read(4))[0]
        response = self._read(size)
        correlation_id = struct.unpack_from(">i", response)[0]
        assert correlation_id == self.correlation_id, (
            f"response for correlation id {correlation_id}, expected {self.correlation_id}")
        reader = Reader(response)
        reader.position = 4
        if flexible:
            reader.tags()
        return reader

    def _read(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self.socket.recv(count - len(data))
            if not chunk:
                raise ConnectionError(f"the broker closed the connection after {len(data)} of {count} bytes")
            data += chunk
        return bytes(data)

    def init_producer_id(self, version: int = 0):
        """InitProducerId v0/v1 for a non-transactional producer: (error, producer id, epoch)."""
        assert version in (0, 1)
        reader = self.request(API_INIT_PRODUCER_ID, version, string(None) + struct.pack(">i", 60_000))
        _throttle, error, producer_id, epoch = reader.take(">ihqh")
        return error, producer_id, epoch

    def topic_id(self, topic: str) -> bytes:
        """The topic's id, by Metadata v12 (flexible)."""
        body = compact_array([bytes(16) + compact_string(topic) + NO_TAGS]) + struct.pack(">bb", 0, 0) + NO_TAGS
        reader = self.request(API_METADATA, 12, body, flexible=True)
        reader.take(">i")  # throttle
        reader.compact_array(lambda: (reader.take(">i"), reader.compact_string(), reader.take(">i"),
                                      reader.compact_string(), reader.tags()))  # brokers
        reader.compact_string()  # cluster id
        reader.take(">i")  # controller

        def topic_metadata():
            error = reader.take(">h")
            name = reader.compact_string()
            topic_id = reader.data[reader.position:reader.position + 16]
            reader.position += 16
            reader.take(">b")  # internal
            reader.compact_array(lambda: (reader.take(">hiii"), [reader.compact_array(lambda: reader.take(">i"))
                                                                 for _ in range(3)], reader.tags()))
            reader.take(">i")  # authorized operations
            reader.tags()
            return name, error, topic_id

        (name, error, topic_id), = reader.compact_array(topic_metadata)
        assert (name, error) == (topic, 0), (name, error)
        return topic_id

    def produce_v10(self, topic: str, partition: int, records: bytes, acks: int = -1, timeout_ms: int = 10_000):
        """Produce v10 (flexible; KIP-951 leader hints) of one record set to one partition:
        (error, base offset, (leader id, leader epoch) named or None, {broker id: "host:port"}
        of the endpoints named)."""
        body = (compact_string(None) + struct.pack(">hi", acks, timeout_ms)
                + compact_array([compact_string(topic) + compact_array([
                    struct.pack(">i", partition) + compact_bytes(records) + NO_TAGS]) + NO_TAGS])
                + NO_TAGS)
        reader = self.request(API_PRODUCE, 10, body, flexible=True)
        leader = []

        def partition_response():
            index, error, base_offset, _append_time, _start = reader.take(">ihqqq")
            reader.compact_array(lambda: (reader.take(">i"), reader.compact_string(), reader.tags()))
            reader.compact_string()  # error message
            reader.tags(lambda tag: tag == 0 and leader.append(reader.take(">ii")) is None and reader.tags() is None)
            return index, error, base_offset

        topics = reader.compact_array(lambda: (reader.compact_string(), reader.compact_array(partition_response),
                                               reader.tags()))
        reader.take(">i")  # throttle
        endpoints = self._node_endpoints(reader)
        (index, error, base_offset), = topics[0][1]
        assert topics[0][0] == topic and index == partition, topics
        return error, base_offset, (leader[0] if leader else None), endpoints

    def fetch_v16(self, topic_id: bytes, partition: int, offset: int, max_bytes: int = 1 << 20):
        """Fetch v16 (topic ids; KIP-951 leader hints) of one partition: (error, high
        watermark, records, (leader id, leader epoch) named or None, {broker id: "host:port"}
        of the endpoints named)."""
        body = (struct.pack(">iiibii", 0, 1, max_bytes, 0, 0, -1)
                + compact_array([topic_id + compact_array([
                    struct.pack(">iiqiqi", partition, -1, offset, -1, -1, max_bytes) + NO_TAGS]) + NO_TAGS])
                + compact_array([]) + compact_string("") + NO_TAGS)
        reader = self.request(API_FETCH, 16, body, flexible=True)
        reader.take(">ihi")  # throttle, error, session
        leader = []

        def partition_data():
            index, error, high_watermark, _stable, _start = reader.take(">ihqqq")
            reader.compact_array(lambda: (reader.take(">qq"), reader.tags()))  # aborted transactions
            reader.take(">i")  # preferred read replica
            records = reader.compact_bytes()
            reader.tags(lambda tag: tag == 1 and leader.append(reader.take(">ii")) is None and reader.tags() is None)
            return index, error, high_watermark, records

        def topic_response():
            answered_id = reader.data[reader.position:reader.position + 16]
            reader.position += 16
            partitions = reader.compact_array(partition_data)
            reader.tags()
            return answered_id, partitions

        topics = reader.compact_array(topic_response)
        endpoints = self._node_endpoints(reader)
        (answered_id, partitions), = topics
        (index, error, high_watermark, records), = partitions
        assert answered_id == topic_id and index == partition, (answered_id, index)
        return error, high_watermark, records, (leader[0] if leader else None), endpoints

    def _node_endpoints(self, reader):
        """A flexible response's last tagged section, whose tag 0 is NodeEndpoints (KIP-951)."""
        endpoints = {}

        def node_endpoints(tag):
            if tag != 0:
                return False
            for node_id, host, port in reader.compact_array(
                    lambda: (reader.take(">i"), reader.compact_string(), reader.take(">i"), reader.compact_string(),
                             reader.tags())[:3]):
                endpoints[node_id] = f"{host}:{port}"
            return True

        reader.tags(node_endpoints)
        return endpoints

    def find_coordinator(self, group: str):
        """FindCoordinator v1 for a consumer group: (error, error message, node id, host, port)."""
        reader = self.request(API_FIND_COORDINATOR, 1, string(group) + struct.pack(">b", 0))
        _throttle, error = reader.take(">ih")
        message = reader.string()
        node_id = reader.take(">i")
        host = reader.string()
        port = reader.take(">i")
        return error, message, node_id, host, port

    def produce(self, topic: str, partition: int, records: bytes, acks: int = -1, timeout_ms: int = 10_000):
        """Produce v3 of one record set to one partition: (error, base offset)."""
        body = (
            string(None)  # transactional id
            + struct.pack(">hi", acks, timeout_ms)
            + array([string(topic) + array([struct.pack(">ii", partition, len(records)) + records])])
        )
        reader = self.request(API_PRODUCE, 3, body)

        def partition_response():
            index, error, base_offset, _append_time = reader.take(">ihqq")
            return index, error, base_offset

        topics = reader.array(lambda: (reader.string(), reader.array(partition_response)))
        assert len(topics) == 1 and topics[0][0] == topic, topics
        (index, error, base_offset), = topics[0][1]
        assert index == partition
        return error, base_offset

    def fetch(self, topic: str, partition: int, offset: int, max_bytes: int = 1 << 20, max_wait_ms: int = 0):
        """Fetch v4 of one partition: (error, high watermark, the raw record set)."""
        body = (
            struct.pack(">iiiib", -1, max_wait_ms, 0, max_bytes, 0)
            + array([string(topic) + array([struct.pack(">iqi", partition, offset, max_bytes)])])
        )
        reader = self.request(API_FETCH, 4, body)
        reader.take(">i")  # throttle
        return _fetched_partition(reader, topic, partition, ">ihqq")

    def metadata(self, topic: str):
        """Metadata v7 (the first with leader epochs) of one topic, without auto-creation:
        ({broker id: "host:port"}, {partition: (error, leader id, leader epoch, replica ids,
        in-sync replica ids)})."""
        reader = self.request(API_METADATA, 7, array([string(topic)]) + struct.pack(">b", 0))
        reader.take(">i")  # throttle

        def broker():
            node_id = reader.take(">i")
            host = reader.string()
            port = reader.take(">i")
            reader.string()  # rack
            return node_id, f"{host}:{port}"

        brokers = dict(reader.array(broker))
        reader.string()  # cluster id
        reader.take(">i")  # controller

        def partition():
            error, index, leader, epoch = reader.take(">hiii")
            replicas = reader.array(lambda: reader.take(">i"))
            in_sync = reader.array(lambda: reader.take(">i"))
            reader.array(lambda: reader.take(">i"))  # offline replicas
            return index, (error, leader, epoch, replicas, in_sync)

        def topic_metadata():
            error = reader.take(">h")
            name = reader.string()
            reader.take(">b")  # internal
            return name, error, dict(reader.array(partition))

        topics = reader.array(topic_metadata)
        assert len(topics) == 1 and topics[0][0] == topic, topics
        return brokers, topics[0][2]

    def fetch_at_epoch(self, topic: str, partition: int, offset: int, current_leader_epoch: int,
                       max_bytes: int = 1 << 20):
        """Fetch v9 (the first naming current_leader_epoch, KIP-320) of one partition: (error,
        high watermark, the raw record set)."""
        body = (
            struct.pack(">iiiibii", -1, 0, 0, max_bytes, 0, 0, -1)  # no fetch session
            + array([string(topic) + array([struct.pack(">iiqqi", partition, current_leader_epoch, offset, -1,
                                                         max_bytes)])])
            + array([])  # forgotten topics
        )
        reader = self.request(API_FETCH, 9, body)
        reader.take(">ihi")  # throttle, error, session
        return _fetched_partition(reader, topic, partition, ">ihqqq")  # v5+: log start offset

    def offset_for_leader_epoch(self, topic: str, partition: int, leader_epoch: int,
                                current_leader_epoch: int = -1):
        """OffsetForLeaderEpoch v3 (a consumer's: replica id -1) of one partition: (error,
        leader epoch, end offset)."""
        body = (
            struct.pack(">i", -1)
            + array([string(topic) + array([struct.pack(">iii", partition, current_leader_epoch, leader_epoch)])])
        )
        reader = self.request(API_OFFSET_FOR_LEADER_EPOCH, 3, body)
        reader.take(">i")  # throttle
        topics = reader.array(lambda: (reader.string(), reader.array(lambda: reader.take(">hiiq"))))
        assert len(topics) == 1 and topics[0][0] == topic, topics
        (error, index, epoch, end_offset), = topics[0][1]
        assert index == partition
        return error, epoch, end_offset

    def stored_batches(self, topic: str, partition: int, deadline_s: float = 10.0):
        """Every batch of a partition from offset 0 to the high watermark, as stored."""
        batches = []
        offset = 0
        deadline = time.monotonic() + deadline_s
        while True:
            assert time.monotonic() < deadline, f"{topic}/{partition}: still reading at offset {offset}"
            error, high_watermark, records = self.fetch(topic, partition, offset)
            assert error == ERROR_NONE, f"fetch {topic}/{partition} at {offset}: error {error}"
            if offset >= high_watermark:
                return batches
            found = parse_batches(records)
            assert found, f"fetch {topic}/{partition} at {offset} below the high watermark returned no batch"
            batches += found
            offset = found[-1]["base_offset"] + found[-1]["last_offset_delta"] + 1
