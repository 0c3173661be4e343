#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit, property and integration tests (the
# integration tests start the real daemon on 127.0.0.1 and mount a small tmpfs, so they need
# root, as on CI and the developers' machines), then the real-client Kafka suite
# (scripts/compat: kcat, confluent-kafka, kafka-python, kafkajs, aiokafka, installed by it when
# missing). Works on a fresh Debian machine with the Rust toolchain and Python 3.
set -euo pipefail
cd "$(dirname "$0")/.."
# Builds into the repository's target/ (the README's by-hand build and every script share it),
# or into $CARGO_TARGET_DIR when set (CI keeps one across its fresh clones).
if [[ "$(id -u)" != 0 ]]; then
  echo "scripts/test.sh: the full-disk test mounts a tmpfs and needs root" >&2
  exit 1
fi
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=1
bash scripts/compat/run.sh 2>&1 | tee -a "$log" || status=1
# One closing line for the whole run: cargo prints one per test binary (the last of them often
# a doc-test binary with nothing in it), pytest one for the compat suite.
awk '/^test result:/ || /^(=+ )?[0-9]+ (passed|failed).* in [0-9.]+s/ {
       for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
