#!/usr/bin/env bash
# Same-hour A/B of two builds on the request path: alternating rounds of
#   - produce cached 100 B (many small requests per second: the per-request cost shows),
#   - fetch near the end, native and Kafka (closed loop, one fetch in flight: round trips).
# Each round starts a fresh node of one build; rounds alternate A, B, A, B, ... so the shared
# machine's drift falls on both. Prints one line per round; compare medians.
#   scripts/compare-binaries.sh DIR_A DIR_B [ROUNDS] [SECONDS]
# DIR_A and DIR_B hold release builds of `pyralog` and `pyralog-bench` (e.g. target/release of
# two worktrees). Every run stops by itself (--messages or --duration).
set -euo pipefail
dir_a=$1
dir_b=$2
rounds="${3:-3}"
secs="${4:-5}"
work=$(mktemp -d /var/tmp/pyralog-compare.XXXXXX)
node=""
cleanup() { [[ -n "$node" ]] && kill -TERM "$node" 2>/dev/null && wait "$node" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
round() { # label, build dir
  local label=$1 dir=$2
  rm -rf "$work/data"
  # Metrics on a free port: the older build may not know the flag, so only when it does.
  local metrics=()
  "$dir/pyralog" --help | grep -q -- --metrics-listen && metrics=(--metrics-listen 127.0.0.1:0)
  "$dir/pyralog" --data-dir "$work/data" --listen 127.0.0.1:7470 --kafka-listen 127.0.0.1:9492 \
    --durability cached "${metrics[@]}" >"$work/node.log" 2>&1 &
  node=$!
  for _ in $(seq 100); do grep -q ready "$work/node.log" && break; sleep 0.1; done
  local bench="$dir/pyralog-bench"
  local produce tail_native tail_kafka
  produce=$("$bench" produce --broker 127.0.0.1:7470 --topic small --message-bytes 100 --messages 3000000 --json 2>/dev/null)
  "$bench" produce --broker 127.0.0.1:7470 --topic tail --message-bytes 1024 --messages 200000 --linger-ms 1 \
    >/dev/null 2>&1
  tail_native=$("$bench" fetch --broker 127.0.0.1:7470 --topic tail --behind 100 --fetch-bytes 65536 \
    --duration "$secs" --json 2>/dev/null)
  tail_kafka=$("$bench" fetch --protocol kafka --broker 127.0.0.1:9492 --topic tail --behind 100 \
    --fetch-bytes 65536 --duration "$secs" --json 2>/dev/null)
  kill -TERM "$node"
  wait "$node" || true
  node=""
  printf '%s  produce cached 100 B %9s msg/s | fetch native %6s/s p50 %4s p99 %4s us | fetch kafka %6s/s p50 %4s p99 %4s us\n' \
    "$label" \
    "$(echo "$produce" | field "round(d['msgs_per_sec'])")" \
    "$(echo "$tail_native" | field "round(d['msgs_per_sec'])")" \
    "$(echo "$tail_native" | field "d['latency_us']['p50']")" \
    "$(echo "$tail_native" | field "d['latency_us']['p99']")" \
    "$(echo "$tail_kafka" | field "round(d['msgs_per_sec'])")" \
    "$(echo "$tail_kafka" | field "d['latency_us']['p50']")" \
    "$(echo "$tail_kafka" | field "d['latency_us']['p99']")"
}

echo "A = $dir_a, B = $dir_b; $(nproc) CPUs, kernel $(uname -r)"
for i in $(seq "$rounds"); do
  round "A$i" "$dir_a"
  round "B$i" "$dir_b"
done
