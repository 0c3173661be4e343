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
# Node 2 answered once the controller committed the topic; the others learn it from the
# controller's log a moment later, and each partition elects its leader within a few election
# timeouts: wait until nodes 1 and 3 (the producer's and the consumer's) list all four, led.
for _ in $(seq 100); do
  known=0
  for n in 1 3; do
    "$target/release/pyralog" cluster --node "127.0.0.$n:9644" status \
      | awk -F'\t' '$1 == "demo" && $3 ~ /^node/ {led++} / 0 offline/ {ok=1} END {exit !(led == 4 && ok)}' \
      && known=$((known + 1))
  done
  ((known == 2)) && break
  sleep 0.1
done
"$target/release/pyralog-bench" produce --protocol kafka --broker 127.0.0.1:9092 --topic demo \
  --messages 200000 --message-bytes 1024 "$@"
"$target/release/pyralog-bench" consume --protocol kafka --broker 127.0.0.3:9092 --topic demo \
  --messages 200000 --verify
# Whichever replica won each first election leads until the leader, every 5 s, hands the
# partition to its preferred replica (the first listed) once that one keeps up: wait for that
# (at most 15 s), so the status shows the leaders spread over the nodes as placed; and for
# the new leaders to hear from their followers: every follower in sync, and known to hold
# the leader's whole log durably (lag 0: a new leader learns that from the follower's
# answers a moment after it took over, and until then verify calls the follower behind).
for _ in $(seq 150); do
  "$target/release/pyralog" cluster --node 127.0.0.1:9644 status \
    | awk -F'\t' '$1 == "demo" {rows++; match($5, /[0-9]+/); if ($3 != "node " substr($5, RSTART, RLENGTH)) off++
                                 n = split($7, lags, " "); for (i = 1; i <= n; i++) if (lags[i] !~ /:0$/) lagging++}
                  /^0 under-replicated/ {steady = 1}
                  END {exit !(rows && !off && !lagging && steady)}' \
    && break
  sleep 0.1
done
"$target/release/pyralog" cluster --node 127.0.0.1:9644 status
"$target/release/pyralog" cluster --node 127.0.0.1:9644 verify demo
