#!/usr/bin/env bash
# Memory under a mixed load: one node (2 shards, sync), for SECONDS (default 600):
#   - pyralog-bench e2e over the native protocol: producers at a fixed rate, tailing consumers;
#   - the same over the Kafka listener on another topic;
#   - every 60 s a catch-up consumer reading the native topic from the start (disk reads).
# Samples the daemon's RSS every 5 s and prints the peak next to the budget the issue sets:
# cache bytes per shard + 64 MiB per shard. Every load stops by itself (--duration).
# Usage: scripts/soak.sh [SECONDS] [CACHE_BYTES_PER_SHARD]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
cache="${2:-268435456}"
shards=2
# The README's by-hand build's target directory: $CARGO_TARGET_DIR if set, else the repo's.
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p pyralog -p pyralog-bench
work=$(mktemp -d /var/tmp/pyralog-soak.XXXXXX)
node=""
cleanup() { [[ -n "$node" ]] && kill -TERM "$node" 2>/dev/null && wait "$node" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

"$target/release/pyralog" --data-dir "$work/data" --listen 127.0.0.1:7170 --kafka-listen 127.0.0.1:9192 \
  --shards "$shards" --cache-bytes "$cache" --segment-bytes 268435456 >"$work/node.log" 2>&1 &
node=$!
for _ in $(seq 100); do grep -q ready "$work/node.log" && break; sleep 0.1; done
grep -q ready "$work/node.log" || { cat "$work/node.log"; exit 1; }

bench="$target/release/pyralog-bench"
common=(--message-bytes 1024 --duration "$secs" --partitions 4 --producers 2 --consumers 2 --json)
"$bench" e2e --broker 127.0.0.1:7170 --topic soak-native --rate 20000 "${common[@]}" >"$work/native.json" 2>"$work/native.err" &
native=$!
"$bench" e2e --protocol kafka --broker 127.0.0.1:9192 --topic soak-kafka --rate 10000 "${common[@]}" >"$work/kafka.json" 2>"$work/kafka.err" &
kafka=$!

peak=0
start=$(date +%s)
next_catch_up=$((start + 60))
while kill -0 "$native" 2>/dev/null || kill -0 "$kafka" 2>/dev/null; do
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$node/status")
  (( rss > peak )) && peak=$rss
  now=$(date +%s)
  if (( now >= next_catch_up && now < start + secs - 30 )); then
    "$bench" consume --broker 127.0.0.1:7170 --topic soak-native --consumers 2 --duration 20 --idle-secs 5 --json \
      >"$work/catch-up.json" 2>/dev/null &
    next_catch_up=$((now + 60))
  fi
  echo "t=$((now - start))s rss=$((rss / 1024)) MiB peak=$((peak / 1024)) MiB"
  sleep 5
done
# A load that failed (errors, a shortfall of its consumers, a missed deadline) fails the soak.
native_exit=0
wait "$native" || native_exit=$?
kafka_exit=0
wait "$kafka" || kafka_exit=$?
budget_kib=$(( (cache / 1024 + 65536) * shards ))
echo "native e2e: $(python3 -c "import json; d=json.load(open('$work/native.json')); print(d['messages'], 'msgs', d['latency_us'])")"
echo "kafka e2e:  $(python3 -c "import json; d=json.load(open('$work/kafka.json')); print(d['messages'], 'msgs', d['latency_us'])")"
echo "peak RSS $((peak / 1024)) MiB; budget $((budget_kib / 1024)) MiB (cache $((cache / 1048576)) MiB x $shards + 64 MiB x $shards)"
echo "load exit codes: native e2e $native_exit, kafka e2e $kafka_exit (pyralog-bench --help explains them)"
status=0
(( peak <= budget_kib )) && echo "within budget" || { echo "OVER BUDGET"; status=1; }
(( native_exit == 0 && kafka_exit == 0 )) || { echo "A LOAD FAILED"; status=1; }
exit "$status"
