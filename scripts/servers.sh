#!/usr/bin/env bash
# Installs, starts and stops the local test servers of kgs on 127.0.0.1:
#   kafka  - Apache Kafka (official broker jars from Maven Central), KRaft, single node, :9092
#   mongo  - SecantusDB (a MongoDB-wire server from PyPI), single-node replica set, :27017
#   ferretdb - FerretDB v1 (MongoDB-compatible, SQLite backend), built with Go, :27018
#
# Usage: scripts/servers.sh {install|up|down|restart|status|logs} [kafka|mongo|ferretdb|all]
# (`all` is kafka + mongo; ferretdb is the second MongoDB-wire target, KGS_MONGO_IMPL=ferretdb)
#
# Everything lives in the git-ignored folder .cache/ (override with KGS_CACHE_DIR):
# installs are reused on a second run, data survives restarts, logs are kept in
# .cache/<server>/logs. `up` waits for readiness with a timeout and names what failed.
#
# A second, independent set of servers (e.g. for the chaos test, which restarts
# them) shares the installs but has its own data, logs and ports:
#   KGS_SERVERS_INSTANCE=chaos KGS_KAFKA_PORT=19092 KGS_KAFKA_CONTROLLER_PORT=19093 \
#   KGS_MONGO_PORT=27117 scripts/servers.sh up
# keeps its state in .cache/instances/chaos/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KGS_CACHE_DIR:-$ROOT/.cache}"

KAFKA_VERSION_FILE="$ROOT/servers/kafka/pom.xml"
# Installs are shared; state (data, logs, pid files) is per instance.
if [[ -n "${KGS_SERVERS_INSTANCE:-}" ]]; then
  STATE="$CACHE/instances/$KGS_SERVERS_INSTANCE"
else
  STATE="$CACHE"
fi

KAFKA_LIB="$CACHE/kafka/lib"
KAFKA_HOME="$STATE/kafka"
KAFKA_PORT="${KGS_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KGS_KAFKA_CONTROLLER_PORT:-9093}"

SECANTUS_VERSION="0.7.0b3"
MONGO_VENV="$CACHE/secantus/venv"
MONGO_HOME="$STATE/secantus"
MONGO_PORT="${KGS_MONGO_PORT:-27017}"

FERRETDB_BIN="$CACHE/ferretdb/bin"
FERRETDB_HOME="$STATE/ferretdb"
FERRETDB_PORT="${KGS_FERRETDB_PORT:-27018}"

# How long `up` waits for a server to answer before giving up.
READY_TIMEOUT="${KGS_SERVER_READY_TIMEOUT:-120}"

log() { printf 'servers: %s\n' "$*" >&2; }
die() { printf 'servers: error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------- kafka

kafka_install() {
  command -v java >/dev/null || die "java not found: Kafka needs a Java 17+ runtime"
  command -v mvn >/dev/null || die "mvn not found: Maven resolves the Kafka broker jars"
  local stamp="$KAFKA_LIB/.installed"
  # Reinstall when the pom (the pinned versions) changed.
  local sum
  sum="$(sha256sum "$KAFKA_VERSION_FILE" | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$sum" ]]; then
    return 0
  fi
  log "kafka: resolving broker jars with Maven (servers/kafka/pom.xml)"
  rm -rf "$KAFKA_LIB"
  mkdir -p "$KAFKA_LIB"
  mvn -q -B -f "$KAFKA_VERSION_FILE" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIB" \
    >"$CACHE/kafka/install.log" 2>&1 \
    || die "kafka: Maven could not resolve the broker jars, see $CACHE/kafka/install.log"
  echo "$sum" >"$stamp"
  log "kafka: installed $(ls "$KAFKA_LIB" | wc -l) jars"
}

# JVM flags shared by the tools and the broker.
kafka_jvm_args() {
  KAFKA_JVM=(-Xms256m -Xmx768m -XX:+UseG1GC
    -Dkafka.logs.dir="$KAFKA_HOME/logs"
    -Dlog4j2.configurationFile="$ROOT/servers/kafka/log4j2.properties"
    -cp "$KAFKA_LIB/*")
}

kafka_java() {
  kafka_jvm_args
  java "${KAFKA_JVM[@]}" "$@"
}

kafka_configure() {
  local data="$KAFKA_HOME/data"
  mkdir -p "$data" "$KAFKA_HOME/logs"
  sed -e "s|@DATA_DIR@|$data|" -e "s|@PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
    "$ROOT/servers/kafka/server.properties" >"$KAFKA_HOME/server.properties"
  # Format the storage once; a formatted log dir keeps its cluster id across restarts.
  if [[ ! -f "$data/meta.properties" ]]; then
    local cluster_id
    cluster_id="$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$KAFKA_HOME/logs/format.log" | tail -n1)"
    [[ -n "$cluster_id" ]] || die "kafka: StorageTool random-uuid failed, see $KAFKA_HOME/logs/format.log"
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_HOME/server.properties" \
      >>"$KAFKA_HOME/logs/format.log" 2>&1 \
      || die "kafka: storage format failed, see $KAFKA_HOME/logs/format.log"
    log "kafka: formatted storage (cluster id $cluster_id)"
  fi
}

kafka_up() {
  kafka_install
  if pid_alive "$KAFKA_HOME/kafka.pid"; then
    log "kafka: already running (pid $(cat "$KAFKA_HOME/kafka.pid"))"
    # Started earlier: its "started" log line may be long gone (or the log
    # replaced), so an open listener is the readiness signal.
    rm -f "$KAFKA_HOME/log.mark"
  else
    port_open "$KAFKA_PORT" && die "kafka: port $KAFKA_PORT is taken by another process"
    kafka_configure
    log "kafka: starting on 127.0.0.1:$KAFKA_PORT (logs: $KAFKA_HOME/logs)"
    # Mark where this start begins in the log, so readiness ignores older runs.
    local mark
    mark="$(wc -l <"$KAFKA_HOME/logs/server.log" 2>/dev/null || echo 0)"
    kafka_jvm_args
    nohup java "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_HOME/server.properties" \
      >>"$KAFKA_HOME/logs/stdout.log" 2>&1 </dev/null &
    echo $! >"$KAFKA_HOME/kafka.pid"
    echo "$mark" >"$KAFKA_HOME/log.mark"
  fi
  kafka_wait
}

# Ready = the listener is open and, after a fresh start (log.mark present),
# this start's "Kafka Server started" line is in the log: the port opens
# before the broker has joined its own KRaft quorum.
kafka_started() {
  [[ -f "$KAFKA_HOME/log.mark" ]] || return 0
  local mark
  mark="$(cat "$KAFKA_HOME/log.mark")"
  tail -n +"$((mark + 1))" "$KAFKA_HOME/logs/server.log" 2>/dev/null | grep -q "Kafka Server started"
}

kafka_wait() {
  local deadline=$((SECONDS + READY_TIMEOUT))
  until port_open "$KAFKA_PORT" && kafka_started; do
    pid_alive "$KAFKA_HOME/kafka.pid" \
      || die "kafka: broker exited during start-up, see $KAFKA_HOME/logs/server.log and stdout.log"
    ((SECONDS < deadline)) \
      || die "kafka: not ready on 127.0.0.1:$KAFKA_PORT after ${READY_TIMEOUT}s, see $KAFKA_HOME/logs/server.log"
    sleep 0.5
  done
  log "kafka: ready on 127.0.0.1:$KAFKA_PORT"
}

# ---------------------------------------------------------------- mongo (SecantusDB)

mongo_python() { echo "$MONGO_VENV/bin/python"; }

mongo_install() {
  command -v python3 >/dev/null || die "python3 not found: SecantusDB is a Python package"
  local stamp="$MONGO_VENV/.installed"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$SECANTUS_VERSION" ]]; then
    return 0
  fi
  log "mongo: installing secantusdb==$SECANTUS_VERSION into a venv"
  rm -rf "$MONGO_VENV"
  mkdir -p "$CACHE/secantus"
  local install_log="$CACHE/secantus/install.log"
  python3 -m venv "$MONGO_VENV" >"$install_log" 2>&1 \
    || die "mongo: python3 -m venv failed, see $install_log"
  "$MONGO_VENV/bin/pip" install -q "secantusdb==$SECANTUS_VERSION" >>"$install_log" 2>&1 \
    || die "mongo: pip install secantusdb==$SECANTUS_VERSION failed, see $install_log"
  echo "$SECANTUS_VERSION" >"$stamp"
  log "mongo: installed secantusdb==$SECANTUS_VERSION"
}

mongo_ping() {
  "$(mongo_python)" - "$MONGO_PORT" <<'EOF' >/dev/null 2>&1
import sys, pymongo
c = pymongo.MongoClient(f"mongodb://127.0.0.1:{sys.argv[1]}/?directConnection=true",
                        serverSelectionTimeoutMS=1000)
c.admin.command("ping")
EOF
}

mongo_up() {
  mongo_install
  if pid_alive "$MONGO_HOME/secantus.pid"; then
    log "mongo: already running (pid $(cat "$MONGO_HOME/secantus.pid"))"
  else
    port_open "$MONGO_PORT" && die "mongo: port $MONGO_PORT is taken by another process"
    mkdir -p "$MONGO_HOME/data" "$MONGO_HOME/logs"
    log "mongo: starting SecantusDB on 127.0.0.1:$MONGO_PORT (data: $MONGO_HOME/data)"
    # Default mode advertises a single-node replica set named "secantus".
    # --sync-on-commit: a journaled write is on disk before it is acknowledged.
    nohup "$MONGO_VENV/bin/secantusd-py" --host 127.0.0.1 --port "$MONGO_PORT" \
      --storage-path "$MONGO_HOME/data" --log-level WARNING --sync-on-commit \
      >>"$MONGO_HOME/logs/server.log" 2>&1 </dev/null &
    echo $! >"$MONGO_HOME/secantus.pid"
  fi
  local deadline=$((SECONDS + READY_TIMEOUT))
  until mongo_ping; do
    pid_alive "$MONGO_HOME/secantus.pid" \
      || die "mongo: SecantusDB exited during start-up, see $MONGO_HOME/logs/server.log"
    ((SECONDS < deadline)) \
      || die "mongo: not answering ping on 127.0.0.1:$MONGO_PORT after ${READY_TIMEOUT}s, see $MONGO_HOME/logs/server.log"
    sleep 0.5
  done
  log "mongo: ready on 127.0.0.1:$MONGO_PORT"
}

# ---------------------------------------------------------------- ferretdb

ferretdb_install() {
  command -v go >/dev/null || die "go not found: FerretDB is built from the Go module proxy"
  local src="$ROOT/servers/ferretdb" stamp="$FERRETDB_BIN/.installed"
  local sum
  sum="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$sum" ]]; then
    return 0
  fi
  log "ferretdb: building servers/ferretdb with Go ($(grep -o "FerretDB v[0-9.]*" "$src/go.mod"))"
  mkdir -p "$FERRETDB_BIN"
  (cd "$src" && go build -o "$FERRETDB_BIN/kgs-ferretdb" .) >"$CACHE/ferretdb/install.log" 2>&1 \
    || die "ferretdb: go build failed, see $CACHE/ferretdb/install.log"
  echo "$sum" >"$stamp"
  log "ferretdb: built $FERRETDB_BIN/kgs-ferretdb"
}

ferretdb_up() {
  ferretdb_install
  if pid_alive "$FERRETDB_HOME/ferretdb.pid"; then
    log "ferretdb: already running (pid $(cat "$FERRETDB_HOME/ferretdb.pid"))"
  else
    port_open "$FERRETDB_PORT" && die "ferretdb: port $FERRETDB_PORT is taken by another process"
    mkdir -p "$FERRETDB_HOME/data" "$FERRETDB_HOME/logs"
    log "ferretdb: starting on 127.0.0.1:$FERRETDB_PORT (data: $FERRETDB_HOME/data)"
    nohup "$FERRETDB_BIN/kgs-ferretdb" --listen "127.0.0.1:$FERRETDB_PORT" \
      --data-dir "$FERRETDB_HOME/data" >>"$FERRETDB_HOME/logs/server.log" 2>&1 </dev/null &
    echo $! >"$FERRETDB_HOME/ferretdb.pid"
  fi
  local deadline=$((SECONDS + READY_TIMEOUT))
  until port_open "$FERRETDB_PORT"; do
    pid_alive "$FERRETDB_HOME/ferretdb.pid" \
      || die "ferretdb: exited during start-up, see $FERRETDB_HOME/logs/server.log"
    ((SECONDS < deadline)) \
      || die "ferretdb: not listening on 127.0.0.1:$FERRETDB_PORT after ${READY_TIMEOUT}s, see $FERRETDB_HOME/logs/server.log"
    sleep 0.2
  done
  log "ferretdb: ready on 127.0.0.1:$FERRETDB_PORT"
}

# ---------------------------------------------------------------- common

# Stops a server by its pid file: SIGTERM, then SIGKILL after a grace period.
stop_pid() {
  local name="$1" pidfile="$2" grace="${3:-30}"
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"
    log "$name: not running"
    return 0
  fi
  local pid
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + grace))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "$name: still running after ${grace}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "$pidfile"
  log "$name: stopped"
}

status_of() {
  local name="$1" pidfile="$2" port="$3"
  if pid_alive "$pidfile"; then
    if port_open "$port"; then
      echo "$name: running (pid $(cat "$pidfile")), listening on 127.0.0.1:$port"
    else
      echo "$name: running (pid $(cat "$pidfile")), not yet listening on 127.0.0.1:$port"
    fi
  elif port_open "$port"; then
    echo "$name: not started by this script, but 127.0.0.1:$port answers"
  else
    echo "$name: stopped"
    return 3
  fi
}

cmd="${1:-}"
which="${2:-all}"
case "$which" in kafka | mongo | ferretdb | all) ;; *) die "unknown server '$which' (expected kafka, mongo, ferretdb or all)" ;; esac
want() { [[ "$which" == "$1" || ("$which" == all && "$1" != ferretdb) ]]; }

case "$cmd" in
  install)
    want mongo && mongo_install
    want kafka && kafka_install
    want ferretdb && ferretdb_install
    ;;
  up)
    # Mongo first: its start is quicker, and Kafka's JVM start overlaps nothing else.
    want mongo && mongo_up
    want kafka && kafka_up
    want ferretdb && ferretdb_up
    ;;
  down)
    want kafka && stop_pid kafka "$KAFKA_HOME/kafka.pid" 60
    want mongo && stop_pid mongo "$MONGO_HOME/secantus.pid" 30
    want ferretdb && stop_pid ferretdb "$FERRETDB_HOME/ferretdb.pid" 30
    ;;
  restart)
    "$0" down "$which"
    "$0" up "$which"
    ;;
  status)
    rc=0
    want kafka && { status_of kafka "$KAFKA_HOME/kafka.pid" "$KAFKA_PORT" || rc=$?; }
    want mongo && { status_of mongo "$MONGO_HOME/secantus.pid" "$MONGO_PORT" || rc=$?; }
    want ferretdb && { status_of ferretdb "$FERRETDB_HOME/ferretdb.pid" "$FERRETDB_PORT" || rc=$?; }
    exit "$rc"
    ;;
  logs)
    want kafka && echo "kafka: $KAFKA_HOME/logs/server.log"
    want mongo && echo "mongo: $MONGO_HOME/logs/server.log"
    want ferretdb && echo "ferretdb: $FERRETDB_HOME/logs/server.log"
    ;;
  *)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    [[ -z "$cmd" || "$cmd" == -h || "$cmd" == --help ]] || exit 2
    ;;
esac
# `want x && ...` lists end with a false test when x is not wanted.
exit 0
