#!/usr/bin/env bash
# Soak run of the replication simulator: `scripts/simulate.sh SEEDS [FIRST]` runs seeds
# FIRST..FIRST+SEEDS (FIRST defaults to 10000, past the ones `cargo test` runs) in release
# mode and exits non-zero at the first failing seed, printing it and its replay command.
# Extra arguments after FIRST go to the simulator (--replicas 5, --bug NAME, --no-faults).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/simulate.sh SEEDS [FIRST] [simulator arguments]" >&2
  exit 2
fi
seeds=$1
first=${2:-10000}
shift $(( $# >= 2 ? 2 : 1 ))
cargo build --release --locked -p pyralog-replication --features sim --example simulate
exec "${CARGO_TARGET_DIR:-target}/release/examples/simulate" --seeds "$first..$((first + seeds))" "$@"
