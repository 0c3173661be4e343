#!/usr/bin/env python3
"""librdkafka's producer (through confluent-kafka) against a broker: a figure users can set
beside Kafka's and Redpanda's, since it is the same client they would use.

    scripts/bench-librdkafka.py BROKER TOPIC [--messages N] [--message-bytes B] [--acks all|1|0]

Produces N messages of B bytes with batching (linger 5 ms, 1 MiB batches, lz4 off) as fast as
librdkafka will take them, waits for every delivery report, and prints one JSON object:
messages, bytes, seconds, msgs_per_sec, mb_per_sec, acked, errors. Exits 1 on delivery errors.
"""

import argparse
import json
import sys
import time

from confluent_kafka import Producer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("broker")
    parser.add_argument("topic")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--message-bytes", type=int, default=100)
    parser.add_argument("--acks", default="all")
    parser.add_argument("--idempotence", action="store_true")
    args = parser.parse_args()

    producer = Producer({
        "bootstrap.servers": args.broker,
        "acks": args.acks,
        "enable.idempotence": args.idempotence,
        "linger.ms": 5,
        "batch.size": 1 << 20,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1 << 20,
        "message.timeout.ms": 60_000,
    })
    value = b"x" * args.message_bytes
    outcome = {"acked": 0, "errors": 0, "first_error": None}

    def delivered(error, _message):
        if error is None:
            outcome["acked"] += 1
        else:
            outcome["errors"] += 1
            outcome["first_error"] = outcome["first_error"] or str(error)

    started = time.monotonic()
    for _ in range(args.messages):
        while True:
            try:
                producer.produce(args.topic, value, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    left = producer.flush(120)
    seconds = time.monotonic() - started
    report = {
        "client": "librdkafka " + __import__("confluent_kafka").libversion()[0],
        "messages": args.messages,
        "bytes": args.messages * args.message_bytes,
        "seconds": round(seconds, 3),
        "msgs_per_sec": round(args.messages / seconds),
        "mb_per_sec": round(args.messages * args.message_bytes / seconds / 1e6, 1),
        "acked": outcome["acked"],
        "errors": outcome["errors"] + left,
        "first_error": outcome["first_error"],
    }
    print(json.dumps(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
