#!/usr/bin/env bash
# fdatasync latency of 18 writers of 16 KiB (as many as replica logs in the RF 3 latency
# benchmark), O_DIRECT, fdatasync after each write, in three shapes of file: appends that
# extend it (what segment files do today), writes into fallocated (unwritten) space, and
# overwrites of blocks already written (no metadata to commit). Twice each. Needs fio.
#   scripts/fio-sync-latency.sh [DIR]   (default /var/tmp/fio-sync-latency, removed after)
set -euo pipefail
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio; }
dir=${1:-/var/tmp/fio-sync-latency}/run; rm -rf "$dir"; mkdir -p "$dir"
trap 'rm -rf "$dir"' EXIT
run() { # name flags...
  name=$1; shift
  fio --output-format=json --directory="$dir" --name=$name --numjobs=18 --group_reporting --size=16m --bs=16k \
    --rw=write --direct=1 --fdatasync=1 --ioengine=psync "$@" | python3 -c '
import json,sys; j=json.load(sys.stdin)["jobs"][0]; s=j["sync"]["lat_ns"]["percentile"]; w=j["write"]
print("%-10s sync p50 %6.2f p99 %6.2f p99.9 %6.2f ms; write p99 %5.2f ms; %.0f MiB/s" % (sys.argv[1], s["50.000000"]/1e6, s["99.000000"]/1e6, s["99.900000"]/1e6, w["clat_ns"]["percentile"]["99.000000"]/1e6, w["bw"]/1024))' $name
  rm -f "$dir"/*
}
for i in 1 2; do
run extend --fallocate=none
run falloc --fallocate=native
run overwrite --fallocate=none --overwrite=1
done
