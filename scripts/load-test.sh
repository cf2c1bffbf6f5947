#!/usr/bin/env bash
# Load test of the example app server with Artillery (`make load-test`):
# tests/load/scenarios.yaml, GET /keys at 500 arrivals/s for 3 s.
#
# 1. Installs Artillery from npm into $KGS_CACHE_DIR/artillery (local, never
#    global; reused by later runs).
# 2. Unless KGS_LOAD_TARGET (e.g. http://127.0.0.1:8080) names a running app
#    server: starts the local servers if needed, builds the binaries, creates
#    a fresh pool, starts `kgs-producer run` and one example app server, and
#    waits until the app server has keys buffered.
# 3. Runs the scenario; the processor (tests/load/record-keys.js) records the
#    body of every 200 response.
# 4. Prints requests, status codes and latency percentiles, and fails unless
#    every served key is distinct (duplicates = 0) and every 200 was recorded.
#
# Results (Artillery's JSON report, the served keys, logs, summary.md) go to
# $KGS_CACHE_DIR/load-test/<timestamp>/. KGS_LOAD_PROFILE=debug uses the
# debug binaries (default release, as `make run`). Each run's pool stays in
# database $KGS_MONGODB_DB (default kgs-load) of the local server.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ARTILLERY_VERSION="${KGS_ARTILLERY_VERSION:-2.0.34}"
CACHE="${KGS_CACHE_DIR:-$ROOT/.cache}"
ART_DIR="$CACHE/artillery"
OUT="$CACHE/load-test/$(date -u +%Y%m%dT%H%M%SZ)"
PROFILE="${KGS_LOAD_PROFILE:-release}"
SCENARIO="$ROOT/tests/load/scenarios.yaml"
mkdir -p "$OUT"

say() { echo "load-test: $*" >&2; }
die() { say "error: $*"; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 not found ($2)"; }
need node "install Node.js 18+ (Debian: apt-get install nodejs npm)"
need npm "install npm"
need curl "apt-get install curl"
need python3 "apt-get install python3"

# --- 1. Artillery, installed locally -----------------------------------------
ARTILLERY="$ART_DIR/node_modules/.bin/artillery"
installed="$(node -p "require('$ART_DIR/node_modules/artillery/package.json').version" 2>/dev/null || true)"
if [[ "$installed" != "$ARTILLERY_VERSION" ]]; then
  say "installing artillery@$ARTILLERY_VERSION into $ART_DIR (npm, local)"
  mkdir -p "$ART_DIR"
  # Artillery depends on Playwright (browser engine); the HTTP scenario needs
  # no browser, so skip its download (a CDN outside the package registry).
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$ART_DIR" --no-audit --no-fund \
    --loglevel=error "artillery@$ARTILLERY_VERSION" >&2
fi
# No telemetry (and no network) from the run.
export ARTILLERY_DISABLE_TELEMETRY=true

# --- 2. The app server under test -------------------------------------------
pids=()
cleanup() {
  # SIGTERM: the app server returns its unused keys, the producer steps down.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

metric() { # metric <base url> <name>: an unlabelled metric's value, or 0
  { curl -fsS --max-time 5 "$1/metrics" 2>/dev/null || true; } | awk -v n="$2" '$1 == n { print $2; f = 1 } END { if (!f) print 0 }'
}

TARGET="${KGS_LOAD_TARGET:-}"
if [[ -z "$TARGET" ]]; then
  # The local servers, unless pointed elsewhere or already listening.
  port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
  [[ -n "${KGS_MONGODB_URI:-}" ]] || port_open 27017 || scripts/servers.sh up mongo
  [[ -n "${KGS_KAFKA_BROKERS:-}" ]] || port_open 9092 || scripts/servers.sh up kafka
  flags=()
  [[ "$PROFILE" == release ]] && flags=(--release)
  cargo build "${flags[@]}" -p kgs-producer -p kgs-consumer --bin kgs-producer --bin kgs-app-server --features kgs-consumer/app-server
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"

  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  export KGS_MONGODB_DB="${KGS_MONGODB_DB:-kgs-load}"
  export KGS_POOL="load-$(date -u +%H%M%S)-$RANDOM"
  export KGS_GROUP="kgs.$KGS_POOL"
  # 20,000 keys kept in the pool: plenty for 1,500 requests, and quick to
  # generate on the (slow) local MongoDB-wire server.
  export KGS_TARGET_SIZE=20000
  producer_addr="127.0.0.1:$(free_port)"
  app_addr="127.0.0.1:$(free_port)"
  TARGET="http://$app_addr"

  say "creating pool $KGS_POOL in database $KGS_MONGODB_DB (3 base62 characters)"
  "$BIN/kgs-producer" init --length 3 --partitions 2 >"$OUT/init.log" 2>&1 \
    || die "kgs-producer init failed: $(tail -3 "$OUT/init.log")"
  KGS_HTTP_ADDR="$producer_addr" \
    "$BIN/kgs-producer" run --batch-size 1000 --low-watermark 2 --high-watermark 4 \
    >"$OUT/producer.log" 2>&1 &
  pids+=($!)
  # Buffer up to 6,000 keys: the whole run is served from memory.
  KGS_HTTP_ADDR="$app_addr" KGS_BUFFER_LOW_WATERMARK=2000 KGS_BUFFER_HIGH_WATERMARK=6000 KGS_LOG=warn \
    "$BIN/kgs-app-server" >"$OUT/app-server.log" 2>&1 &
  pids+=($!)
  say "producer on $producer_addr, app server on $app_addr (logs in $OUT)"
  for _ in $(seq 1 240); do
    buffered="$(metric "$TARGET" kgs_consumer_buffered_keys)"
    [[ "${buffered%.*}" -ge 3000 ]] && break
    sleep 0.5
  done
  [[ "${buffered%.*}" -ge 3000 ]] || die "app server buffered only $buffered keys after 120 s (see $OUT)"
  say "app server has $buffered keys buffered"
fi
curl -fsS --max-time 5 "$TARGET/healthz" >/dev/null || die "no app server answers at $TARGET/healthz"

# --- 3. The run ----------------------------------------------------------------
KEYS="$OUT/keys.txt"
: >"$KEYS"
say "artillery run $SCENARIO --target $TARGET"
start=$(date +%s.%N)
KGS_LOAD_KEYS_FILE="$KEYS" "$ARTILLERY" run --target "$TARGET" --output "$OUT/report.json" \
  "$SCENARIO" >"$OUT/artillery.log" 2>&1 || die "artillery failed: $(tail -5 "$OUT/artillery.log")"
elapsed=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")

# --- 4. Report and the duplicate check ----------------------------------------
status=0
python3 - "$OUT/report.json" "$KEYS" "$TARGET" "$elapsed" "$PROFILE" >"$OUT/summary.md" <<'EOF' || status=$?
import collections, json, sys
report, keys_file, target, elapsed, profile = sys.argv[1:]
agg = json.load(open(report))["aggregate"]
c, rt = agg["counters"], agg["summaries"]["http.response_time"]
keys = [l for l in open(keys_file).read().split("\n") if l]
dups = [k for k, n in collections.Counter(keys).items() if n > 1]
codes = {k.split(".")[-1]: v for k, v in sorted(c.items()) if k.startswith("http.codes.")}
errors = {k[len("errors."):]: v for k, v in c.items() if k.startswith("errors.")}
print(f"- target: {target} (one example app server, {profile} build)")
print(f"- requests: {c.get('http.requests', 0)}, responses: {c.get('http.responses', 0)}, "
      f"virtual users created/completed/failed: {c.get('vusers.created', 0)}/"
      f"{c.get('vusers.completed', 0)}/{c.get('vusers.failed', 0)}; run took {elapsed} s")
print(f"- status codes: " + ", ".join(f"{k}: {v}" for k, v in codes.items()))
print(f"- errors: {errors or 'none'}")
print(f"- latency (ms): min {rt['min']}, median {rt['median']}, p95 {rt['p95']}, "
      f"p99 {rt['p99']}, max {rt['max']}")
print(f"- keys served (200 bodies recorded): {len(keys)}, distinct: {len(set(keys))}, "
      f"duplicates: {len(dups)}")
ok = not dups and len(keys) == codes.get("200", 0) and len(keys) > 0
sys.exit(0 if ok else 1)
EOF
cat "$OUT/summary.md"
((status == 0)) || die "duplicate keys, or the recorded keys do not match the 200 responses (see $OUT)"
say "passed: no key served twice ($OUT)"
