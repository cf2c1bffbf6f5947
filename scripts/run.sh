#!/usr/bin/env bash
# `make run`: the main job on the local default servers. Installs and starts
# Kafka and the MongoDB-wire server if needed, creates a 3-letter pool, starts
# the producer and one example app server, and asks it for keys.
# Ctrl-C stops the producer and the app server gracefully (the app server
# returns its unused keys); the servers keep running (scripts/servers.sh down).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

POOL="${KGS_POOL:-demo3}"
HTTP_APP="${KGS_APP_ADDR:-127.0.0.1:8080}"
HTTP_PRODUCER="${KGS_PRODUCER_ADDR:-127.0.0.1:9100}"
LOGS="$ROOT/.cache/run"
mkdir -p "$LOGS"

started=$SECONDS
# Build tools and server runtimes: installed as root, else named in one line.
scripts/prereqs.sh run
[[ -n "${KGS_MONGODB_URI:-}" ]] || scripts/servers.sh up mongo
[[ -n "${KGS_KAFKA_BROKERS:-}" ]] || scripts/servers.sh up kafka

cargo build --release -p kgs-producer -p kgs-consumer --bin kgs-producer --bin kgs-app-server --features kgs-consumer/app-server
BIN="$ROOT/target/release"

built=$SECONDS
echo "run: built after $((built - started))s; creating pool $POOL (3 base62 characters: 238,328 keys; a re-run reuses it)"
# Only the first 10,000 keys before the producer starts: it generates the
# rest while it publishes, so the first key is seconds away, not a minute.
"$BIN/kgs-producer" init --pool "$POOL" --length 3 --partitions 4 --initial-keys 10000

pids=()
cleanup() {
  ((${#pids[@]})) || return 0
  echo "run: stopping (SIGTERM: the app server returns its unused keys)"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait
  pids=()
}
# Ctrl-C / SIGTERM is the normal way to end `make run`: stop gracefully, exit 0.
trap cleanup EXIT
trap 'cleanup; exit 0' INT TERM

"$BIN/kgs-producer" run --pool "$POOL" --http-addr "$HTTP_PRODUCER" >"$LOGS/producer.log" 2>&1 &
pids+=($!)
KGS_POOL="$POOL" KGS_HTTP_ADDR="$HTTP_APP" "$BIN/kgs-app-server" >"$LOGS/app-server.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 120); do
  curl -fsS "http://$HTTP_APP/healthz" >/dev/null 2>&1 && break
  sleep 0.5
done
# The first batch needs the producer to lead and move it, and the app server
# to claim it: a few seconds on a fresh pool.
echo "run: waiting for the first batch to reach the app server..."
first=""
for _ in $(seq 1 240); do
  if first="$(curl -fsS --max-time 5 "http://$HTTP_APP/keys" 2>/dev/null)"; then break; fi
  first=""
  sleep 0.25
done
if [[ -z "$first" ]]; then
  echo "run: error: no key after 60s; see $LOGS/producer.log and $LOGS/app-server.log" >&2
  exit 1
fi
echo "run: first key $first, $((SECONDS - built))s after the build ($((SECONDS - started))s in all); nine more:"
for _ in $(seq 1 9); do
  curl -sS --max-time 10 "http://$HTTP_APP/keys"; echo
done
cat <<EOF

run: kgs is running (pool $POOL). Where things are:
  keys          curl http://$HTTP_APP/keys          (one key per request)
  pool stats    curl http://$HTTP_APP/keys/count    and  $BIN/kgs-producer stats --pool $POOL
  metrics       http://$HTTP_APP/metrics (app server)   http://$HTTP_PRODUCER/metrics (producer)
  logs          $LOGS/producer.log   $LOGS/app-server.log
  servers       scripts/servers.sh status | logs | down   (Kafka :9092, MongoDB-wire :27017)
  next          make test (the suite), README.md (configuration, operations)
  stop          Ctrl-C (the app server returns its unused keys; servers keep running)
EOF
wait
