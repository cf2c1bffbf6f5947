#!/usr/bin/env bash
# The whole test suite (`make test`): starts the local Kafka and MongoDB-wire
# servers unless KGS_KAFKA_BROKERS / KGS_MONGODB_URI point elsewhere, builds
# the binaries the tests spawn, and runs every test of the workspace.
#
# KGS_MONGO_IMPL picks the local MongoDB-wire server: `secantus` (default,
# SecantusDB on :27017) or `ferretdb` (FerretDB v1 + SQLite on :27018, no
# multi-document transactions).
#
# After the tests, a bounded chaos run (tests/src/bin/kgs-chaos) of the whole
# pipeline against its own server instance (`chaos`: Kafka :19092, SecantusDB
# :27117), stopped again afterwards. KGS_CHAOS_DURATION sets how long faults
# are injected (default 75s; 0 skips it), KGS_CHAOS_SEED replays a run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Build tools, server runtimes, Prometheus: installed as root, else named.
scripts/prereqs.sh test

started=()
case "${KGS_MONGO_IMPL:=secantus}" in
  secantus) mongo_server=mongo local_uri="" ;;
  ferretdb) mongo_server=ferretdb local_uri="mongodb://127.0.0.1:27018/?directConnection=true" ;;
  *) echo "test: error: KGS_MONGO_IMPL must be secantus or ferretdb, not '$KGS_MONGO_IMPL'" >&2; exit 1 ;;
esac
if [[ -z "${KGS_MONGODB_URI:-}" ]]; then
  started+=("$mongo_server")
  [[ -z "$local_uri" ]] || export KGS_MONGODB_URI="$local_uri"
fi
if [[ -z "${KGS_KAFKA_BROKERS:-}" ]]; then started+=(kafka); fi
# The secured Kafka of the least-privilege tests (tests/tests/security.rs).
if [[ -z "${KGS_KAFKA_SECURE_BROKERS:-}" ]]; then started+=(kafka-secure); fi
# ... and the secured SecantusDB (SCRAM + TLS; KGS_MONGO_SECURE_DIR names
# another instance's CA and passwords, KGS_MONGO_SECURE_PORT its port).
if [[ -z "${KGS_MONGO_SECURE_DIR:-}" ]]; then started+=(mongo-secure); fi
for server in "${started[@]}"; do
  scripts/servers.sh up "$server"
done

# Tests spawn kgs-producer and kgs-app-server as separate processes (the
# tests crate enables kgs-consumer's `app-server` feature, so --bins builds it).
cargo build --workspace --bins --examples
echo "test: MongoDB-wire server: ${KGS_MONGODB_URI:-local $KGS_MONGO_IMPL (default URI)}" >&2
cargo test --workspace --no-fail-fast "$@"
# docker/compose.yaml against the code and the binaries built above (no Docker engine needed).
python3 scripts/check-compose.py

chaos_duration="${KGS_CHAOS_DURATION:-75s}"
if [[ "$chaos_duration" != 0 ]]; then
  # The broker's second listener (19094) is the one the app servers reach
  # through kgs-chaos's network proxy on 19095.
  chaos_env=(KGS_SERVERS_INSTANCE=chaos KGS_KAFKA_PORT=19092 KGS_KAFKA_CONTROLLER_PORT=19093 KGS_MONGO_PORT=27117
    KGS_KAFKA_PROXIED_PORT=19094 KGS_KAFKA_PROXY_PORT=19095)
  # The chaos servers are restarted and killed by the run: never the shared ones.
  trap 'env "${chaos_env[@]}" scripts/servers.sh down >/dev/null 2>&1 || true' EXIT
  env "${chaos_env[@]}" scripts/servers.sh up
  cargo run -q -p kgs-tests --bin kgs-chaos -- --duration "$chaos_duration" \
    ${KGS_CHAOS_SEED:+--seed "$KGS_CHAOS_SEED"}
fi

if ((${#started[@]})); then
  echo "test: local servers left running for the next run; stop them with: scripts/servers.sh down (and down kafka-secure, down mongo-secure)" >&2
fi
