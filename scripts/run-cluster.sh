#!/usr/bin/env bash
# Builds the release binaries and starts a local three-node cluster, one node per loopback
# address: node N on 127.0.0.N (native 7070, Kafka 9092, node-to-node 9100, metrics 9644; the
# per-shard ports follow each), all seeded with one another, in scratch data directories.
# Then it drives the cluster: creates a topic through node 2 (replication factor 3, the
# default for three nodes), produces to it over Kafka through node 1 (acks=all), consumes it
# back with verification through node 3, shows who leads what, checks that the replicas agree,
# and stops every node with SIGTERM (each hands its leaderships over first), whatever happens.
# Linux routes all of 127.0.0.0/8 to loopback.
#   scripts/run-cluster.sh [extra pyralog-bench produce flags]
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p pyralog -p pyralog-bench
base=$(mktemp -d /var/tmp/pyralog-cluster.XXXXXX)
seeds="1@127.0.0.1:9100,2@127.0.0.2:9100,3@127.0.0.3:9100"
nodes=()
stop() {
  for pid in "${nodes[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${nodes[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$base"
}
trap stop EXIT
for n in 1 2 3; do
  "$target/release/pyralog" --data-dir "$base/node$n" --node-id "$n" --seeds "$seeds" \
    --listen "127.0.0.$n:7070" --kafka-listen "127.0.0.$n:9092" --metrics-listen "127.0.0.$n:9644" \
    >"$base/node$n.out" 2>&1 &
  nodes+=($!)
done
# Ready once every node's view (its /cluster endpoint) lists all three nodes as registered.
registered() {
  python3 -c 'import json, sys, urllib.request
view = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/cluster", timeout=2))
sys.exit(0 if len(view["nodes"]) == 3 else 1)' "$1" 2>/dev/null
}
for _ in $(seq 300); do
  ready=0
  for n in 1 2 3; do
    registered "127.0.0.$n:9644" && ready=$((ready + 1))
  done
  ((ready == 3)) && break
  sleep 0.1
done
((ready == 3)) || { tail -5 "$base"/node*.out; echo "run-cluster.sh: the cluster did not form" >&2; exit 1; }
echo "cluster formed: nodes 1, 2, 3 on 127.0.0.1-3"
"$target/release/pyralog" topic --broker 127.0.0.2:7070 create demo --partitions 4 --replication-factor 3
# Each partition elects its leader within a few election timeouts.
for _ in $(seq 100); do
  "$target/release/pyralog" cluster --node 127.0.0.1:9644 status | grep -q " 0 offline" && break
  sleep 0.1
done
"$target/release/pyralog-bench" produce --protocol kafka --broker 127.0.0.1:9092 --topic demo \
  --messages 200000 --message-bytes 1024 "$@"
"$target/release/pyralog-bench" consume --protocol kafka --broker 127.0.0.3:9092 --topic demo \
  --messages 200000 --verify
"$target/release/pyralog" cluster --node 127.0.0.1:9644 status
"$target/release/pyralog" cluster --node 127.0.0.1:9644 verify demo
