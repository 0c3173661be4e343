#!/usr/bin/env bash
# Fuzzes the request decoders with cargo-fuzz (libFuzzer).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      default 60
#
# Targets (net/fuzz/fuzz_targets): kafka_request (the Kafka listener's entry point and every
# API's body decoder at every schema version), native_request (the native protocol) and
# cluster_frame (node-to-node frames: net::cluster::frame).
# cargo-fuzz needs nightly compiler flags; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
set -euo pipefail
cd "$(dirname "$0")/../net"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in kafka_request native_request cluster_frame; do
    echo "== fuzzing $target for ${seconds}s"
    cargo fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=4096
done
