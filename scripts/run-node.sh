#!/usr/bin/env bash
# Builds the release binaries, starts a local node with its defaults (2 shards on this
# machine, sync durability, native protocol on 127.0.0.1:7070, Kafka on 127.0.0.1:9092) in a
# scratch data directory, drives it with the load generator (produce natively, then consume
# with verification over the native protocol and again over the Kafka listener: one log, two
# protocols) and prints the reports. The node is stopped
# with SIGTERM at the end, whatever happens.
#   scripts/run-node.sh [extra pyralog-bench produce flags]
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p pyralog -p pyralog-bench
data_dir=$(mktemp -d /var/tmp/pyralog-run.XXXXXX)
"$target/release/pyralog" --data-dir "$data_dir" --listen 127.0.0.1:7070 &
node=$!
trap 'kill -TERM $node 2>/dev/null; wait $node 2>/dev/null; rm -rf "$data_dir"' EXIT
for _ in $(seq 100); do
  "$target/release/pyralog" topic --broker 127.0.0.1:7070 list >/dev/null 2>&1 && break
  sleep 0.1
done
"$target/release/pyralog-bench" produce --broker 127.0.0.1:7070 --topic demo --partitions 2 \
  --messages 200000 --message-bytes 1024 "$@"
"$target/release/pyralog-bench" consume --broker 127.0.0.1:7070 --topic demo --messages 200000 --verify
"$target/release/pyralog-bench" consume --protocol kafka --broker 127.0.0.1:9092 --topic demo --messages 200000 --verify
"$target/release/pyralog" topic --broker 127.0.0.1:7070 describe demo
# What an operator sees: the node's Prometheus metrics (requests per protocol and API).
python3 - <<'PY'
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9644/metrics", timeout=5).read().decode()
print("metrics (http://127.0.0.1:9644/metrics), requests by protocol and API:")
for line in text.splitlines():
    if line.startswith("pyralog_requests_total"):
        print("  " + line)
PY
