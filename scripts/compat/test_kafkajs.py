"""kafkajs (JavaScript, protocol code of its own, no librdkafka) against the Kafka listener:
js/roundtrip.js creates and deletes topics with its admin client, writes gzip-compressed
records with headers through its idempotent producer, and reads them back through a consumer
group that commits; this test judges what it saw."""

import json
import os
import subprocess

JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
RECORDS = 600
RUN_TIMEOUT_S = 90


def test_kafkajs_admin_producer_and_consumer_group_round_trip(node):
    done = subprocess.run(["node", os.path.join(JS_DIR, "roundtrip.js"), node.bootstrap, str(RECORDS)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"roundtrip.js exited {done.returncode}: {done.stderr[-3000:]}"
    seen = json.loads(done.stdout)

    assert seen["created"] is True
    [topic] = seen["metadata"]["topics"]
    assert sorted(p["partitionId"] for p in topic["partitions"]) == [0, 1, 2]
    assert all(p["partitionErrorCode"] == 0 and p["leader"] >= 0 for p in topic["partitions"])

    # Every acknowledged record is read once, at its offset, with its key and header; the
    # offsets of a partition run from 0 without a gap.
    acknowledged = {(r["p"], r["o"]): r for r in seen["acknowledged"]}
    assert len(acknowledged) == RECORDS
    read = {}
    for record in seen["read"]:
        key = (record["p"], record["o"])
        assert key not in read, f"offset {key} read twice"
        read[key] = record
    assert read == acknowledged
    ends = {p: 1 + max(o for (q, o) in acknowledged if q == p) for p in range(3)}
    assert sorted(acknowledged) == sorted((p, o) for p in range(3) for o in range(ends[p]))

    # The high watermarks and the group's commits are where the records end.
    assert {int(o["partition"]): int(o["high"]) for o in seen["offsets"]} == ends
    [committed] = seen["committed"]
    assert {int(c["partition"]): int(c["offset"]) for c in committed["partitions"]} == ends

    assert "js-orders" in seen["listed"] and "js-scratch" not in seen["listed"]
