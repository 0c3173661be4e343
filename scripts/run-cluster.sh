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
source scripts/local-cluster.sh
start_cluster
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
