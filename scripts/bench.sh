#!/usr/bin/env bash
# `make bench`: the throughput benchmarks of kgs in one go, against the
# configured servers (KGS_MONGODB_URI / KGS_KAFKA_BROKERS, else the local
# test servers, started if needed), printing one table per part and
# appending them, with the machine and the command, to BENCHMARKS.md.
#
#   1. producer: keys moved+published per second, next to the raw rate of
#      the same database writes (batch 1,000 and 10,000; producer/examples/bench.rs)
#   2. init: generation of a whole 3-letter pool (238,328 keys) next to raw
#      insert_many of the same documents
#   3. end to end: the `make run` stack (fresh 3-letter pool, 4 partitions,
#      one producer, one example app server, their defaults), GET /keys at a
#      fixed offered rate for 60 s with kgs-load (an open-model pacer), the
#      share of non-200 answers after the first 5 s, and duplicate keys
#      counted from the response bodies (the run fails if there is one)
#
# KGS_BENCH_RATE (default 3000), KGS_BENCH_DURATION (60s), KGS_BENCH_PARTS
# (default "producer init e2e"), KGS_BENCH_NO_APPEND=1 leaves BENCHMARKS.md alone,
# KGS_BENCH_BIN=<dir> uses the binaries of another build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RATE="${KGS_BENCH_RATE:-3000}"
DURATION="${KGS_BENCH_DURATION:-60s}"
PARTS="${KGS_BENCH_PARTS:-producer init e2e}"
say() { echo "bench: $*" >&2; }

export KGS_MONGODB_URI="${KGS_MONGODB_URI:-}"
export KGS_KAFKA_BROKERS="${KGS_KAFKA_BROKERS:-}"
if [[ -z "$KGS_MONGODB_URI" ]]; then
  scripts/servers.sh up mongo
  KGS_MONGODB_URI="mongodb://127.0.0.1:${KGS_MONGO_PORT:-27017}/?directConnection=true"
fi
if [[ -z "$KGS_KAFKA_BROKERS" ]]; then
  scripts/servers.sh up kafka
  KGS_KAFKA_BROKERS="127.0.0.1:${KGS_KAFKA_PORT:-9092}"
fi

# KGS_BENCH_BIN: another build's release directory (e.g. an older commit's,
# for a before/after table); kgs-load is always this tree's.
cargo build --release -q -p kgs-tests --bin kgs-load
LOAD="$ROOT/target/release/kgs-load"
if [[ -n "${KGS_BENCH_BIN:-}" ]]; then
  BIN="$KGS_BENCH_BIN"
else
  say "building (release)"
  cargo build --release -q -p kgs-producer --bin kgs-producer --example bench
  cargo build --release -q -p kgs-consumer --features app-server --bin kgs-app-server
  BIN="$ROOT/target/release"
fi
OUT="$(mktemp -d)"
report="$OUT/report.md"
{
  echo
  echo "### make bench, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores, $(uname -m); MongoDB: \`$(sed -E 's#//[^@/]*@#//***@#' <<<"$KGS_MONGODB_URI")\`; Kafka: \`$KGS_KAFKA_BROKERS\`. Command: \`make bench\`."
} >"$report"

for part in $PARTS; do
  case "$part" in
    producer)
      say "producer vs raw (batch 1,000 and 10,000)"
      { echo; echo "Producer, keys moved+published per second:"; echo; } >>"$report"
      KGS_BENCH_SIZES=1000,10000 "$BIN/examples/bench" | tee -a "$report"
      ;;
    init)
      say "init of a 3-letter pool vs raw insert_many"
      { echo; echo "Init (generation) of a whole 3-letter pool:"; echo; } >>"$report"
      KGS_BENCH_MODE=init "$BIN/examples/bench" | tee -a "$report"
      ;;
    e2e)
      say "end to end: $RATE GET /keys per second for $DURATION against the make-run stack"
      db="kgs-bench-e2e-$(date +%s)"
      app=127.0.0.1:18080
      prod=127.0.0.1:19100
      export KGS_MONGODB_DB="$db" KGS_POOL=bench3
      "$BIN/kgs-producer" init --length 3 --partitions 4 --initial-keys 10000 >"$OUT/init.log" 2>&1
      "$BIN/kgs-producer" run --http-addr "$prod" >"$OUT/producer.log" 2>&1 &
      ppid=$!
      KGS_HTTP_ADDR="$app" "$BIN/kgs-app-server" >"$OUT/app-server.log" 2>&1 &
      apid=$!
      trap 'kill -TERM $ppid $apid 2>/dev/null || true' EXIT
      # Settled: the pool fully generated (238,328 keys) and the app
      # server's buffer refilled, as a stack that has been up a minute is.
      for _ in $(seq 1 600); do
        gen="$(curl -fsS "http://$prod/metrics" 2>/dev/null | awk '/^kgs_producer_keys_generated/ {print $2}')" || true
        [[ "${gen:-0}" == 238328 ]] && break
        sleep 0.5
      done
      [[ "${gen:-0}" == 238328 ]] || { say "error: the pool was not generated in 300 s (see $OUT)"; exit 1; }
      sleep 10
      set +e
      "$LOAD" --addr "$app" --rate "$RATE" --duration "$DURATION" --warmup 5s >"$OUT/load.txt"
      load_rc=$?
      set -e
      # Put-back: the app server stops gracefully and returns its buffer;
      # the producer (still running) re-batches those keys.
      kill -TERM $apid 2>/dev/null || true
      wait $apid 2>/dev/null || true
      back="$(sed -E 's/\x1b\[[0-9;]*m//g' "$OUT/app-server.log" | sed -nE 's/.*app server stopped.*keys_returned=([0-9]+).*/\1/p' | tail -1)"
      t0=$SECONDS
      for _ in $(seq 1 1200); do
        got="$(curl -fsS "http://$prod/metrics" 2>/dev/null | awk '/^kgs_producer_keys_returned_total/ {print $2}')" || true
        (( ${got:-0} >= ${back:-0} )) && break
        sleep 0.25
      done
      putback="the app server returned ${back:-?} unused keys at shutdown; the producer had re-batched ${got:-0} of them $((SECONDS - t0)) s later"
      kill -TERM $ppid 2>/dev/null || true
      wait $ppid 2>/dev/null || true
      trap - EXIT
      {
        echo
        echo "End to end, the make-run stack (3-letter pool, 4 partitions, producer and app server defaults), kgs-load --rate $RATE --duration $DURATION --warmup 5s:"
        echo
        echo '```text'
        cat "$OUT/load.txt"
        echo '```'
        echo
        echo "Put-back: $putback."
      } | tee -a "$report"
      ((load_rc == 0)) || { say "error: kgs-load failed (see $OUT)"; exit 1; }
      ;;
    *) say "error: unknown part $part (producer, init, e2e)"; exit 1 ;;
  esac
done
if [[ "${KGS_BENCH_NO_APPEND:-}" != 1 ]]; then
  cat "$report" >>BENCHMARKS.md
  say "appended to BENCHMARKS.md"
fi
say "logs in $OUT"
