# Sourced by scripts/run-cluster.sh and scripts/bench-cluster.sh: starts three nodes, node N on
# 127.0.0.N (native 7070, Kafka 9092, node-to-node 9100, metrics 9644; the per-shard ports
# follow each), all seeded with one another, with their data in $base/nodeN, and stops them
# with SIGTERM (each hands its leaderships over first) and removes $base on exit. The caller
# sets $target (the binaries' target directory) and $base (a scratch directory).
# Linux routes all of 127.0.0.0/8 to loopback.
seeds="1@127.0.0.1:9100,2@127.0.0.2:9100,3@127.0.0.3:9100"
nodes=()
stop_cluster() {
  for pid in "${nodes[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${nodes[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$base"
}
trap stop_cluster EXIT
# More flags for node N alone: the caller may define node_flags N (printing them) before
# sourcing this file.
declare -F node_flags >/dev/null || node_flags() { :; }
# Starts the nodes ("$@": more flags for each) and returns once every node's view (its
# /cluster endpoint) lists all three as registered; exits, showing the nodes' last lines, if
# that takes over 30 s.
start_cluster() {
  local n ready
  for n in 1 2 3; do
    "$target/release/pyralog" --data-dir "$base/node$n" --node-id "$n" --seeds "$seeds" \
      --listen "127.0.0.$n:7070" --kafka-listen "127.0.0.$n:9092" --metrics-listen "127.0.0.$n:9644" $(node_flags "$n") "$@" \
      >"$base/node$n.out" 2>&1 &
    nodes+=($!)
  done
  for _ in $(seq 300); do
    ready=0
    for n in 1 2 3; do
      python3 -c 'import json, sys, urllib.request
view = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/cluster", timeout=2))
sys.exit(0 if len(view["nodes"]) == 3 else 1)' "127.0.0.$n:9644" 2>/dev/null && ready=$((ready + 1))
    done
    ((ready == 3)) && return
    sleep 0.1
  done
  tail -n 5 "$base"/node*.out
  echo "$(basename "$0"): the cluster did not form" >&2
  exit 1
}
