#!/usr/bin/env bash
# The whole test suite (`make test`): starts the local Kafka and MongoDB-wire
# servers unless KGS_KAFKA_BROKERS / KGS_MONGODB_URI point elsewhere, builds
# the binaries the tests spawn, and runs every test of the workspace.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

need() {
  command -v "$1" >/dev/null || { echo "test: error: $1 not found ($2)" >&2; exit 1; }
}
need cargo "install Rust with rustup"
need cmake "rdkafka builds librdkafka with cmake: apt-get install cmake"
[[ -e /usr/include/curl/curl.h || -e /usr/include/x86_64-linux-gnu/curl/curl.h ]] \
  || { echo "test: error: curl headers missing: apt-get install libcurl4-openssl-dev (or run .ci/run)" >&2; exit 1; }

started=()
if [[ -z "${KGS_MONGODB_URI:-}" ]]; then started+=(mongo); fi
if [[ -z "${KGS_KAFKA_BROKERS:-}" ]]; then started+=(kafka); fi
for server in "${started[@]}"; do
  scripts/servers.sh up "$server"
done

# Tests spawn kgs-producer and the example app server as separate processes.
cargo build --workspace --bins --examples
cargo test --workspace --no-fail-fast "$@"

if ((${#started[@]})); then
  echo "test: local servers left running for the next run; stop them with: scripts/servers.sh down" >&2
fi
