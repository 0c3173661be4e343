#!/usr/bin/env bash
# Disk bytes read per byte a catching-up consumer receives: starts a node (2 shards, sync),
# produces SECONDS of 1 KiB messages in 1 MiB batches to 2 partitions, then consumes for
# SECONDS from the start and compares the sectors /proc/diskstats counts for the data dir's
# disk with the bytes consumed. Below 1 means part came from the cache. Uses the release
# binaries in BINDIR (default: the target directory's). Usage:
#   scripts/read-amplification.sh [SECONDS] [BINDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
bin="${2:-${CARGO_TARGET_DIR:-/var/tmp/pyralog-target}/release}"
work=$(mktemp -d /var/tmp/pyralog-amp.XXXXXX)
node=""
cleanup() { [[ -n "$node" ]] && kill -TERM "$node" 2>/dev/null && wait "$node" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
disk=$(lsblk -no PKNAME "$(df --output=source "$work" | tail -1)" 2>/dev/null || true)
[[ -n "$disk" ]] || disk=$(basename "$(df --output=source "$work" | tail -1)")
"$bin/pyralog" --data-dir "$work/data" --listen 127.0.0.1:7070 --kafka-listen 127.0.0.1:9092 >"$work/node.log" 2>&1 &
node=$!
for _ in $(seq 100); do grep -q ready "$work/node.log" && break; sleep 0.1; done
"$bin/pyralog-bench" produce --topic amp --message-bytes 1024 --batch-bytes 1048576 --producers 2 \
  --partitions 2 --duration "$secs" >/dev/null 2>&1
sectors() { awk -v d="$disk" '$3 == d {print $6}' /proc/diskstats; }
before=$(sectors)
report=$("$bin/pyralog-bench" consume --topic amp --duration "$secs" --json 2>/dev/null)
after=$(sectors)
echo "$report" | python3 -c "
import json, sys
d = json.load(sys.stdin); disk = ($after - $before) * 512
print('consumed %.0f MB at %.0f MB/s; disk ($disk) read %.0f MB: %.2fx' % (d['bytes'] / 1e6, d['mb_per_sec'], disk / 1e6, disk / d['bytes']))"
