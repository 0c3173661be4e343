#!/usr/bin/env bash
# The replicated benchmarks: three nodes on this one machine (node N on 127.0.0.N, as
# scripts/run-cluster.sh starts them), driven by pyralog-bench over the native protocol with
# acks=durable (Kafka's acks=all) and 1 KiB messages, topics of replication factor 3 and 1 in
# the same run. Every run stops by itself (--duration).
#
# Bounds, measured in the same run: fio's best durable sequential write on this disk (O_DIRECT,
# fdatasync after each write, 512 KiB to 4 MiB writes, queue depth 1 and 4). The three
# replicas share that one disk (and the machine's two cores), so RF 3 writes every client byte
# three times to it: the ratio reported is the bytes all replicas flushed per second (the
# nodes' pyralog_flushed_bytes counters) over the fio bound, and RF 3's client rate can be at
# most a third of RF 1's.
#
# Flush latency (pyralog_flush_duration_seconds, buckets doubling from 50 us) is read the same
# way for the 20k msg/s runs: a commit waits for W replicas' flushes, so their tail is the
# floor of the produce p99. The bound of that p99 is the disk's durable-write latency at the
# same load, measured by fio right after the RF 3 run: as many writers as the nodes had files
# flushing (a partition replica each), paced to the nodes' flushes per second and bytes per
# flush (O_DIRECT + O_DSYNC: a write and its flush in one), and the same writes from three
# writers (one per node: what a shard-wide journal would issue). The produce p99 is reported
# over the better of the two.
#
# Replication lag: each leader samples, every 10 ms tick and per follower, the age of the
# oldest batch that follower has not made durable (pyralog_replication_lag_seconds); its p99
# over the half-rate run is read from the three nodes' histograms (buckets grow by half again;
# interpolated inside the bucket).
#
# Cores: a node of a real cluster has its host's cores, one shard on each. Here three nodes
# share two, so by default each node runs one shard, pinned round-robin (nodes 1 and 3 on CPU
# 0, node 2 on CPU 1): three executors for two cores. `all` gives every node a shard on every
# core (six executors for two cores, each node as `pyralog` starts by default).
#   scripts/bench-cluster.sh [seconds per run] [shards per node: 1 (default) or all]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
layout="${2:-1}"
case "$layout" in
  1) node_flags() { echo "--cpus $((($1 - 1) % $(nproc)))"; } ;;
  all) ;;
  *) echo "usage: $0 [seconds per run] [shards per node: 1 or all]" >&2; exit 2 ;;
esac
target="${CARGO_TARGET_DIR:-target}"
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio; }
cargo build --release --locked -p pyralog -p pyralog-bench
base=$(mktemp -d /var/tmp/pyralog-bench-cluster.XXXXXX)
work=$base
source scripts/local-cluster.sh

echo "machine: $(nproc) cores, kernel $(uname -r), $(df -h "$work" | awk 'NR==2 {print $1}'), load $(cut -d' ' -f1-3 /proc/loadavg); shards: $layout per node"
source scripts/fio-bound.sh
echo "fio durable sequential writes (O_DIRECT, fdatasync after each):"
fio_bound=$(fio_best)
echo "bound: $fio_bound MiB/s"
# fio_paced writers writes/s bytes: p99 of durable writes (us) by that many writers, paced to
# that many writes (of that size, rounded up to 4 KiB) per second in all, into written blocks
# (as the nodes' flushes mostly go, see dma's ZERO_AHEAD_BYTES).
fio_paced() {
  local writers=$1 bs rate
  bs=$(python3 -c "print(max(4096, -(-int($3) // 4096) * 4096))")
  rate=$(python3 -c "print(int($2 * $bs / $writers))")
  fio --output-format=json --directory="$work" --name=p --numjobs="$writers" --group_reporting --size=32m \
    --overwrite=1 --ioengine=psync --direct=1 --sync=dsync --bs="$bs" --rate="$rate" --rw=write \
    --runtime=6 --time_based | python3 -c '
import json, sys
print(round(json.load(sys.stdin)["jobs"][0]["write"]["clat_ns"]["percentile"]["99.000000"] / 1e3))'
  rm -f "$work"/p.*
}

start_cluster
# Six partitions: two led from each node once preferred leaders are restored.
for rf in 1 3; do
  for topic in lat max half; do
    "$target/release/pyralog" topic --broker 127.0.0.1:7070 create "$topic$rf" --partitions 6 \
      --replication-factor "$rf" >/dev/null
  done
done
for _ in $(seq 100); do
  "$target/release/pyralog" cluster --node 127.0.0.1:9644 status | grep -q " 0 offline" && break
  sleep 0.1
done
sleep 6 # the preferred leaders take their partitions back (checked every 5 s)

bench() { "$target/release/pyralog-bench" produce --broker 127.0.0.1:7070 "$@" --json 2>/dev/null; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
report() { # name, json, target text
  echo "$2" | field "'%-30s %9.0f msg/s %7.1f MB/s  p50 %6d us  p99 %7d us  max %7d us  | %s' % ('$1', d['msgs_per_sec'], d['mb_per_sec'], d['latency_us']['p50'], d['latency_us']['p99'], d['latency_us']['max'], '$3')"
}
# The three nodes' metrics, concatenated.
scrape() { for n in 1 2 3; do curl -s "http://127.0.0.$n:9644/metrics"; done; }
flushed() { scrape | awk '/^pyralog_flushed_bytes_total/ {s += $NF} END {printf "%.0f\n", s}'; }
# p99 of a histogram (pyralog_NAME_seconds) between two scrapes (files), in ms.
hist_p99() {
  python3 - "$1" "$2" "$3" <<'EOF'
import re, sys
def buckets(path):
    counts = {}
    for line in open(path):
        m = re.match(r'pyralog_%s_seconds_bucket\{.*le="([^"]+)".*\} (\S+)' % sys.argv[3], line)
        if m:
            le = float("inf") if m[1] == "+Inf" else float(m[1])
            counts[le] = counts.get(le, 0) + float(m[2])
    return counts
before, after = buckets(sys.argv[1]), buckets(sys.argv[2])
cumulative = sorted((le, after[le] - before.get(le, 0)) for le in after)
total = cumulative[-1][1] if cumulative else 0
if total == 0:
    print("no samples")
    sys.exit()
want, low, below = 0.99 * total, 0.0, 0.0
for le, count in cumulative:
    if count >= want:
        high = le if le != float("inf") else low
        share = (want - below) / (count - below) if count > below else 1
        print("%.1f ms (%d samples)" % ((low + (high - low) * share) * 1000, total))
        break
    low, below = le, count
EOF
}
lat="--message-bytes 1024 --rate 20000 --duration $secs --linger-ms 1 --partitions 6"
big="--message-bytes 1024 --batch-bytes 1048576 --producers 2 --duration $secs --partitions 6"

# CPU time so far: the machine's (busy and idle jiffies, iowait counted idle) and each node's
# (user and system jiffies).
cpu_now() {
  awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat
  for pid in "${nodes[@]}"; do awk '{print $14, $15}' "/proc/$pid/stat"; done
}
# How busy the machine and each node were between two cpu_now outputs (files).
cpu_use() {
  python3 - "$1" "$2" "$(nproc)" <<'EOF'
import sys
before = [list(map(int, l.split())) for l in open(sys.argv[1])]
after = [list(map(int, l.split())) for l in open(sys.argv[2])]
busy, idle = (a - b for a, b in zip(after[0], before[0]))
elapsed = (busy + idle) / int(sys.argv[3])  # jiffies of one core
nodes = ["%d/%d%%" % ((a[0] - b[0]) * 100 / elapsed, (a[1] - b[1]) * 100 / elapsed)
         for a, b in zip(after[1:], before[1:])]
print("machine %d%% busy; nodes' user/system CPU, in %% of a core: %s" % (busy * 100 / (busy + idle), ", ".join(nodes)))
EOF
}

# Latency first, before gigabytes of writes leave the disk slow to answer fdatasync. Each
# with the p99 of the nodes' flushes (a write and its fdatasync) meanwhile, and for RF 3 how
# busy the cores were (three nodes and the load generator share them).
scrape >"$work/flush.before"
cpu_now >"$work/cpu.before"
r=$(bench --topic lat3 $lat)
cpu_now >"$work/cpu.after"
scrape >"$work/flush.after"
report "RF 3 acks=all 1 KiB at 20k/s" "$r" "target p99 < 3000 us; flush p99 $(hist_p99 "$work/flush.before" "$work/flush.after" flush_duration)"
echo "  $(cpu_use "$work/cpu.before" "$work/cpu.after")"
# The nodes' flushes during that run, for fio to replay: per second and bytes each.
total() { awk -v k="$2" 'index($1, k) == 1 {s += $NF} END {printf "%.0f\n", s}' "$1"; }
flushes=$(($(total "$work/flush.after" pyralog_flush_duration_seconds_count) - $(total "$work/flush.before" pyralog_flush_duration_seconds_count)))
flush_bytes=$(($(total "$work/flush.after" pyralog_flushed_bytes_total) - $(total "$work/flush.before" pyralog_flushed_bytes_total)))
seconds=$(echo "$r" | field "d['seconds']")
per_sec=$(python3 -c "print(round($flushes / $seconds))")
per_flush=$(python3 -c "print(round($flush_bytes / max($flushes, 1)))")
files=$((6 * 3))
as_nodes=$(fio_paced "$files" "$per_sec" "$per_flush")
as_journal=$(fio_paced 3 "$per_sec" "$per_flush")
bound=$((as_nodes < as_journal ? as_nodes : as_journal))
p99=$(echo "$r" | field "d['latency_us']['p99']")
echo "  the disk's bound: durable writes at the nodes' $per_sec/s of $per_flush B: p99 $as_nodes us from $files writers, $as_journal us from 3; produce p99 = $(python3 -c "print('%.1f' % ($p99 / $bound))")x the better"
scrape >"$work/flush.before"
r=$(bench --topic lat1 $lat)
scrape >"$work/flush.after"
report "RF 1 acks=all 1 KiB at 20k/s" "$r" "the cost of RF 3: compare p99; flush p99 $(hist_p99 "$work/flush.before" "$work/flush.after" flush_duration)"

for rf in 3 1; do
  before=$(flushed)
  r=$(bench --topic "max$rf" $big)
  after=$(flushed)
  seconds=$(echo "$r" | field "d['seconds']")
  disk=$(python3 -c "print('%.0f' % (($after - $before) / 1048576 / $seconds))")
  report "RF $rf acks=all 1 KiB max" "$r" "all replicas flushed $disk MiB/s = $(python3 -c "print('%.2f' % ($disk / $fio_bound))")x fio $fio_bound MiB/s (target 0.7x)"
  [[ $rf == 3 ]] && max3=$(echo "$r" | field "d['msgs_per_sec']")
done

half=$(python3 -c "print(int($max3 / 2))")
scrape >"$work/lag.before"
# The max run's batching (so the load generator's requests cost what they did there), paced.
r=$(bench --topic half3 $big --rate "$half" --linger-ms 1)
scrape >"$work/lag.after"
report "RF 3 acks=all at half max" "$r" "replication lag p99 $(hist_p99 "$work/lag.before" "$work/lag.after" replication_lag) (target < 50 ms)"
"$target/release/pyralog" cluster --node 127.0.0.1:9644 status | tail -1
