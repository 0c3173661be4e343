#!/usr/bin/env bash
# What a consumer catching up asks of the disk: starts a node (2 shards, sync), produces
# SECONDS of 1 KiB messages in 1 MiB batches to 2 partitions, then consumes 80% of them from
# the start (stopping before the partitions run dry, so the rate is the reading's), and
# prints from /proc/diskstats of the data dir's disk: the bytes read per byte consumed (below
# 1: part came from the cache), the read requests the disk saw with their average size and
# time, and how many were in flight on average. Uses the release binaries in BINDIR (default:
# $CARGO_TARGET_DIR/release if set, else the repo's target/release, where the README's build
# puts them). Usage:
#   scripts/read-amplification.sh [SECONDS] [BINDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
target="${CARGO_TARGET_DIR:-target}"
bin="${2:-$target/release}"
work=$(mktemp -d /var/tmp/pyralog-amp.XXXXXX)
node=""
cleanup() { [[ -n "$node" ]] && kill -TERM "$node" 2>/dev/null && wait "$node" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
disk=$(lsblk -no PKNAME "$(df --output=source "$work" | tail -1)" 2>/dev/null || true)
[[ -n "$disk" ]] || disk=$(basename "$(df --output=source "$work" | tail -1)")
"$bin/pyralog" --data-dir "$work/data" --listen 127.0.0.1:7070 --kafka-listen 127.0.0.1:9092 >"$work/node.log" 2>&1 &
node=$!
for _ in $(seq 100); do grep -q ready "$work/node.log" && break; sleep 0.1; done
acked=$("$bin/pyralog-bench" produce --topic amp --message-bytes 1024 --batch-bytes 1048576 --producers 2 \
  --partitions 2 --duration "$secs" --json 2>/dev/null | python3 -c "import json, sys; print(json.load(sys.stdin)['acked'])")
# Reads completed, sectors read, milliseconds spent reading (summed over requests).
reads() { awk -v d="$disk" '$3 == d {print $4, $6, $7}' /proc/diskstats; }
before=$(reads)
report=$("$bin/pyralog-bench" consume --topic amp --messages $((acked * 4 / 5)) --json 2>/dev/null)
after=$(reads)
echo "$report" | python3 -c "
import json, sys
d = json.load(sys.stdin)
(r0, s0, ms0), (r1, s1, ms1) = [list(map(int, x.split())) for x in ('$before', '$after')]
disk, requests, ms = (s1 - s0) * 512, max(r1 - r0, 1), ms1 - ms0
print('consumed %.0f MB at %.0f MB/s; disk ($disk) read %.0f MB: %.2fx' % (d['bytes'] / 1e6, d['mb_per_sec'], disk / 1e6, disk / d['bytes']))
print('%d read requests of %.0f KiB on average, %.2f ms each; %.2f in flight on average' % (requests, disk / requests / 1024, ms / requests, ms / 1000 / d['seconds']))"
