#!/usr/bin/env bash
# The real-client compatibility suite: builds the pyralog daemon and pyralog-bench, and runs
# kcat, confluent-kafka (librdkafka), kafka-python and kafkajs against it on 127.0.0.1 (one
# fresh node per test), then the cluster tests (three nodes, aiokafka too) in a network
# namespace of their own. Installs what is missing on a fresh Debian machine (as root): kcat,
# iptables and Node.js from Debian, the Python packages from PyPI at pinned versions, kafkajs
# from npm at the version scripts/compat/js/package-lock.json pins. Extra arguments go to
# pytest (-k NAME ...).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
PIP_PINS=(aiokafka==0.14.0 confluent-kafka==2.16.1 kafka-python==3.0.12 matplotlib==3.11.2 prometheus-client==0.26.0 pytest==9.2.0)
# The whole run, builds excluded, stops by itself even if a client call hangs.
SUITE_TIMEOUT_S=900

if ! command -v kcat >/dev/null; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "scripts/compat/run.sh: kcat is missing; install the Debian package kcat (needs root)" >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y kcat
fi

# iptables cuts links between the cluster tests' nodes.
if ! command -v iptables >/dev/null; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "scripts/compat/run.sh: iptables is missing; install the Debian package iptables (needs root)" >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y iptables
fi

# Node.js runs kafkajs (scripts/compat/js).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "scripts/compat/run.sh: node or npm is missing; install the Debian packages nodejs and npm (needs root)" >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm
fi
npm ci --prefix scripts/compat/js --prefer-offline --no-audit --no-fund --silent

missing=()
for pin in "${PIP_PINS[@]}"; do
  name=${pin%%==*}
  version=${pin##*==}
  installed=$("$PYTHON" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$name")
  if [[ "$installed" != "$version" ]]; then
    missing+=("$pin")
  fi
done
if ((${#missing[@]})); then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
fi

# The repository's target/ unless $CARGO_TARGET_DIR says otherwise (as every script).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -p pyralog -p pyralog-bench --locked
export PYRALOG_BIN="$CARGO_TARGET_DIR/debug/pyralog"
export PYRALOG_BENCH="$CARGO_TARGET_DIR/debug/pyralog-bench"

export PYTHONDONTWRITEBYTECODE=1
# The cluster tests bind 127.0.0.1-3 on fixed ports and cut links with iptables: they run in a
# network namespace of their own (unshare --net, loopback up), which vanishes with them.
timeout --kill-after=30 "$SUITE_TIMEOUT_S" "$PYTHON" -m pytest -q scripts/compat \
  --ignore=scripts/compat/test_cluster.py "$@"
exec timeout --kill-after=30 "$SUITE_TIMEOUT_S" unshare --net -- bash -c \
  'ip link set lo up && PYRALOG_NETNS=1 exec "$0" -m pytest -q scripts/compat/test_cluster.py "$@"' "$PYTHON" "$@"
