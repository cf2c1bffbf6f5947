#!/usr/bin/env bash
# Installs, starts and stops the local test servers of kgs on 127.0.0.1:
#   kafka  - Apache Kafka (official broker jars from Maven Central), KRaft, single node, :9092
#   mongo  - SecantusDB (a MongoDB-wire server from PyPI), single-node replica set, :27017
#   ferretdb - FerretDB v1 (MongoDB-compatible, SQLite backend), built with Go, :27018
#   kafka-secure - a second Kafka for the least-privilege tests: SASL_SSL only
#            (local CA, SCRAM-SHA-512 users admin, kgs-producer, kgs-app), ACLs
#            enforced, :9094; CA in .cache/kafka-secure/tls/ca.pem, passwords
#            in .cache/kafka-secure/users/<user>
#   mongo-secure - a second SecantusDB for the same tests: SCRAM-SHA-256 auth
#            and TLS only, :27019; users admin (root), kgs-producer (readWrite
#            on database kgs-secure), kgs-app (custom role kgsAppServer),
#            kgs-reader (read only);
#            CA in .cache/secantus-secure/tls/ca.pem, passwords in
#            .cache/secantus-secure/users/<user>
#
# Usage: scripts/servers.sh {install|up|down|restart|status|logs} [kafka|mongo|ferretdb|kafka-secure|mongo-secure|all]
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
# keeps its state in .cache/instances/chaos/. KGS_KAFKA_PROXIED_PORT=P with
# KGS_KAFKA_PROXY_PORT=Q adds a plaintext listener on P that advertises
# 127.0.0.1:Q, where a TCP proxy forwards to P (kgs-chaos does this).
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
KAFKA_TEMPLATE="$ROOT/servers/kafka/server.properties"
KAFKA_SECURE=0

SECANTUS_VERSION="0.7.0b3"
MONGO_VENV="$CACHE/secantus/venv"
MONGO_HOME="$STATE/secantus"
MONGO_PORT="${KGS_MONGO_PORT:-27017}"
MONGO_SECURE=0
# The one database the secured instance's kgs users have rights on.
MONGO_SECURE_DB="kgs-secure"
MONGO_SECURE_USERS=(admin kgs-producer kgs-app kgs-reader)

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

# The kafka functions below serve both brokers; this points them at the
# secured one.
use_secure_kafka() {
  KAFKA_HOME="$STATE/kafka-secure"
  KAFKA_PORT="${KGS_KAFKA_SECURE_PORT:-9094}"
  KAFKA_CONTROLLER_PORT="${KGS_KAFKA_SECURE_CONTROLLER_PORT:-9095}"
  KAFKA_TEMPLATE="$ROOT/servers/kafka/server-secure.properties"
  KAFKA_SECURE=1
}

# The SCRAM users of the secured broker: `admin` is the broker itself (and
# sets the ACLs); `kgs-producer` and `kgs-app` get only what kgs needs.
# Writes a local CA (`ca.pem`) and a server key and certificate signed by
# it (`<name>.key`, `<name>.pem`, SAN 127.0.0.1 and localhost) into `dir`;
# the openssl output goes to `out`.
local_tls() {
  local dir="$1" name="$2" ca_name="$3" out="$4"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$ca_name" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" >"$out" 2>&1 &&
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$dir/$name.key" -out "$dir/$name.csr" >>"$out" 2>&1 &&
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/san.ext" &&
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
      -CAcreateserial -days 3650 -extfile "$dir/san.ext" -out "$dir/$name.pem" >>"$out" 2>&1
}

# A random password per user, in files readable by this user only.
local_passwords() {
  local dir="$1" u
  shift
  for u in "$@"; do
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$dir/$u")
  done
}

SECURE_USERS=(admin kgs-producer kgs-app)

# Once per secured instance: a local CA, the broker's key and certificate
# (SAN 127.0.0.1 and localhost) in Kafka's PEM keystore layout, and a random
# password per user (files readable by this user only).
kafka_secure_credentials() {
  local tls="$KAFKA_HOME/tls" users="$KAFKA_HOME/users"
  [[ -f "$tls/broker-keystore.pem" && -f "$users/admin" ]] && return 0
  command -v openssl >/dev/null || die "kafka-secure: openssl not found (it makes the local certificates)"
  rm -rf "$tls" "$users"
  mkdir -p "$tls" "$users"
  chmod 700 "$users"
  local out="$KAFKA_HOME/logs/tls.log"
  mkdir -p "$KAFKA_HOME/logs"
  {
    local_tls "$tls" broker "kgs local test CA" "$out" &&
      openssl pkcs8 -topk8 -nocrypt -in "$tls/broker.key" -out "$tls/broker.pk8" >>"$out" 2>&1
  } || die "kafka-secure: making the certificates failed, see $out"
  cat "$tls/broker.pk8" "$tls/broker.pem" "$tls/ca.pem" >"$tls/broker-keystore.pem"
  chmod 600 "$tls"/*.key "$tls/broker.pk8" "$tls/broker-keystore.pem"
  local_passwords "$users" "${SECURE_USERS[@]}"
  log "kafka-secure: made a local CA, the broker certificate and ${#SECURE_USERS[@]} SCRAM users"
}

# The least-privilege ACLs of the secured broker (see README, Security),
# set once per instance with the admin user.
kafka_secure_acls() {
  [[ -f "$KAFKA_HOME/acls.done" ]] && return 0
  local cfg="$KAFKA_HOME/admin.properties"
  (
    umask 077
    cat >"$cfg" <<EOF2
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cat "$KAFKA_HOME/users/admin")";
ssl.truststore.type=PEM
ssl.truststore.location=$KAFKA_HOME/tls/ca.pem
EOF2
  )
  local out="$KAFKA_HOME/logs/acls.log"
  acl() {
    kafka_java org.apache.kafka.tools.AclCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" \
      --command-config "$cfg" --add --force "$@" >>"$out" 2>&1 \
      || die "kafka-secure: setting ACLs failed ($*), see $out"
  }
  # The producer: create, check and write the pool topics (kgs.<pool>.<incarnation>),
  # read them back (recovery's search), its transactional ids, the committed
  # offsets of the app servers' groups (backlog) and its own reader group.
  acl --allow-principal User:kgs-producer --operation Create --operation Describe \
    --operation DescribeConfigs --operation Write --operation Read \
    --topic kgs. --resource-pattern-type prefixed
  acl --allow-principal User:kgs-producer --operation Write --operation Describe \
    --transactional-id kgs-producer. --resource-pattern-type prefixed
  acl --allow-principal User:kgs-producer --operation Describe \
    --group kgs. --resource-pattern-type prefixed
  acl --allow-principal User:kgs-producer --operation Read --operation Describe \
    --group kgs-producer. --resource-pattern-type prefixed
  # App servers: read the pool topics in their groups; nothing else.
  acl --allow-principal User:kgs-app --operation Read --operation Describe \
    --topic kgs. --resource-pattern-type prefixed
  acl --allow-principal User:kgs-app --operation Read --operation Describe \
    --group kgs. --resource-pattern-type prefixed
  touch "$KAFKA_HOME/acls.done"
  log "kafka-secure: ACLs set (producer and app-server principals)"
}

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
  local scram=()
  if ((KAFKA_SECURE)); then
    kafka_secure_credentials
    local u
    for u in "${SECURE_USERS[@]}"; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=$u,password=$(cat "$KAFKA_HOME/users/$u")]")
    done
  fi
  (
    umask 077
    sed -e "s|@DATA_DIR@|$data|" -e "s|@PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
      -e "s|@TLS_DIR@|$KAFKA_HOME/tls|g" \
      -e "s|@ADMIN_PASSWORD@|$( ((KAFKA_SECURE)) && cat "$KAFKA_HOME/users/admin")|g" \
      "$KAFKA_TEMPLATE" >"$KAFKA_HOME/server.properties"
    # A second listener whose advertised address is a proxy's (the chaos
    # run's delay/stall proxy): clients bootstrapped through the proxy are
    # told to reach the broker through it too, so they stay behind it.
    if [[ -n "${KGS_KAFKA_PROXIED_PORT:-}" ]]; then
      [[ -n "${KGS_KAFKA_PROXY_PORT:-}" ]] || die "kafka: KGS_KAFKA_PROXIED_PORT needs KGS_KAFKA_PROXY_PORT (the port the proxy listens on)"
      ((KAFKA_SECURE)) && die "kafka: the proxied listener is for the plaintext broker only"
      sed -i -e "s|^listeners=\(.*\)|listeners=\1,PROXIED://127.0.0.1:$KGS_KAFKA_PROXIED_PORT|" \
        -e "s|^advertised.listeners=\(.*\)|advertised.listeners=\1,PROXIED://127.0.0.1:$KGS_KAFKA_PROXY_PORT|" \
        -e "s|^listener.security.protocol.map=\(.*\)|listener.security.protocol.map=\1,PROXIED:PLAINTEXT|" \
        "$KAFKA_HOME/server.properties"
    fi
  )
  # Format the storage once; a formatted log dir keeps its cluster id across restarts.
  if [[ ! -f "$data/meta.properties" ]]; then
    local cluster_id
    cluster_id="$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$KAFKA_HOME/logs/format.log" | tail -n1)"
    [[ -n "$cluster_id" ]] || die "kafka: StorageTool random-uuid failed, see $KAFKA_HOME/logs/format.log"
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_HOME/server.properties" "${scram[@]}" \
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

# Pings SecantusDB; the secured one over TLS as its admin (once provisioned).
mongo_ping() {
  local secure_home=""
  ((MONGO_SECURE)) && [[ -f "$MONGO_HOME/provisioned" ]] && secure_home="$MONGO_HOME"
  "$(mongo_python)" - "$MONGO_PORT" "$secure_home" <<'EOF' >/dev/null 2>&1
import sys, pymongo
port, home = sys.argv[1], sys.argv[2]
uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
if home:
    pw = open(f"{home}/users/admin").read().strip()
    uri = (f"mongodb://admin:{pw}@127.0.0.1:{port}/?directConnection=true"
           f"&tls=true&tlsCAFile={home}/tls/ca.pem&authSource=admin")
c = pymongo.MongoClient(uri, serverSelectionTimeoutMS=1000)
c.admin.command("ping")
EOF
}

# The secured instance: its own home and port.
use_secure_mongo() {
  MONGO_HOME="$STATE/secantus-secure"
  MONGO_PORT="${KGS_MONGO_SECURE_PORT:-27019}"
  MONGO_SECURE=1
}

# Once per secured instance: a local CA, the server's certificate (SAN
# 127.0.0.1 and localhost) and a random password per user.
mongo_secure_credentials() {
  local tls="$MONGO_HOME/tls" users="$MONGO_HOME/users"
  # An instance made for another set of users is test data: made again.
  if [[ -f "$MONGO_HOME/provisioned" && "$(cat "$MONGO_HOME/provisioned")" != "${MONGO_SECURE_USERS[*]}" ]]; then
    pid_alive "$MONGO_HOME/secantus.pid" && die "mongo-secure: made for other users; run: scripts/servers.sh down mongo-secure"
    log "mongo-secure: made for other users; making it again"
    rm -rf "$tls" "$users" "$MONGO_HOME/data" "$MONGO_HOME/provisioned"
  fi
  [[ -f "$tls/server.pem" && -f "$users/admin" ]] && return 0
  command -v openssl >/dev/null || die "mongo-secure: openssl not found (it makes the local certificates)"
  rm -rf "$tls" "$users" "$MONGO_HOME/provisioned"
  mkdir -p "$tls" "$users" "$MONGO_HOME/logs"
  chmod 700 "$users"
  local out="$MONGO_HOME/logs/tls.log"
  local_tls "$tls" server "kgs local test CA (MongoDB)" "$out" \
    || die "mongo-secure: making the certificates failed, see $out"
  chmod 600 "$tls"/*.key
  local_passwords "$users" "${MONGO_SECURE_USERS[@]}"
  log "mongo-secure: made a local CA, the server certificate and ${#MONGO_SECURE_USERS[@]} passwords"
}

# Once per secured instance, as SecantusDB documents it: start without auth,
# create the users and the app servers' role, stop (`up` then starts it
# with --auth and TLS). The role is the README's (Security), with `find`
# and `collStats` on every collection of the database instead of one pool's.
mongo_secure_provision() {
  [[ -f "$MONGO_HOME/provisioned" ]] && return 0
  pid_alive "$MONGO_HOME/secantus.pid" && die "mongo-secure: running but not provisioned; run: scripts/servers.sh down mongo-secure"
  port_open "$MONGO_PORT" && die "mongo-secure: port $MONGO_PORT is taken by another process"
  rm -rf "$MONGO_HOME/data"
  mkdir -p "$MONGO_HOME/data" "$MONGO_HOME/logs"
  log "mongo-secure: creating the users (one start without auth)"
  "$MONGO_VENV/bin/secantusd-py" --host 127.0.0.1 --port "$MONGO_PORT" \
    --storage-path "$MONGO_HOME/data" --log-level WARNING --sync-on-commit \
    >>"$MONGO_HOME/logs/server.log" 2>&1 </dev/null &
  local pid=$! deadline=$((SECONDS + READY_TIMEOUT))
  until mongo_ping; do
    kill -0 "$pid" 2>/dev/null || die "mongo-secure: SecantusDB exited, see $MONGO_HOME/logs/server.log"
    ((SECONDS < deadline)) || { kill "$pid"; die "mongo-secure: no answer on :$MONGO_PORT"; }
    sleep 0.5
  done
  "$(mongo_python)" - "$MONGO_PORT" "$MONGO_HOME" "$MONGO_SECURE_DB" <<'EOF' >>"$MONGO_HOME/logs/provision.log" 2>&1 ||
import sys, pymongo
port, home, db = sys.argv[1:4]
pw = lambda u: open(f"{home}/users/{u}").read().strip()
a = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true").admin
a.command("createUser", "admin", pwd=pw("admin"), roles=[{"role": "root", "db": "admin"}])
a.command("createUser", "kgs-producer", pwd=pw("kgs-producer"),
          roles=[{"role": "readWrite", "db": db}])
a.command("createRole", "kgsAppServer", roles=[], privileges=[
    {"resource": {"db": db, "collection": ""}, "actions": ["find", "collStats"]},
    {"resource": {"db": db, "collection": "claims"}, "actions": ["find", "insert", "update"]},
    {"resource": {"db": db, "collection": "recycles"}, "actions": ["find", "insert"]},
    {"resource": {"db": db, "collection": "vanity"}, "actions": ["find", "insert"]},
])
a.command("createUser", "kgs-app", pwd=pw("kgs-app"),
          roles=[{"role": "kgsAppServer", "db": "admin"}])
a.command("createUser", "kgs-reader", pwd=pw("kgs-reader"), roles=[{"role": "read", "db": db}])
EOF
    {
      kill "$pid"
      die "mongo-secure: creating the users failed, see $MONGO_HOME/logs/provision.log"
    }
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  echo "${MONGO_SECURE_USERS[*]}" >"$MONGO_HOME/provisioned"
  log "mongo-secure: users ${MONGO_SECURE_USERS[*]} created"
}

mongo_up() {
  mongo_install
  local secure=()
  if ((MONGO_SECURE)); then
    mongo_secure_credentials
    mongo_secure_provision
    secure=(--auth --tls-cert-file "$MONGO_HOME/tls/server.pem" --tls-key-file "$MONGO_HOME/tls/server.key")
  fi
  if pid_alive "$MONGO_HOME/secantus.pid"; then
    log "mongo: already running (pid $(cat "$MONGO_HOME/secantus.pid"))"
  else
    port_open "$MONGO_PORT" && die "mongo: port $MONGO_PORT is taken by another process"
    mkdir -p "$MONGO_HOME/data" "$MONGO_HOME/logs"
    log "mongo: starting SecantusDB on 127.0.0.1:$MONGO_PORT (data: $MONGO_HOME/data)"
    # Default mode advertises a single-node replica set named "secantus".
    # --sync-on-commit: a journaled write is on disk before it is acknowledged.
    nohup "$MONGO_VENV/bin/secantusd-py" --host 127.0.0.1 --port "$MONGO_PORT" \
      --storage-path "$MONGO_HOME/data" --log-level WARNING --sync-on-commit "${secure[@]}" \
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
case "$which" in kafka | mongo | ferretdb | kafka-secure | mongo-secure | all) ;; *) die "unknown server '$which' (expected kafka, mongo, ferretdb, kafka-secure, mongo-secure or all)" ;; esac
want() { [[ "$which" == "$1" || ("$which" == all && "$1" != ferretdb) ]]; }
# The secured servers run the same functions with their own homes and ports.
if [[ "$which" == kafka-secure ]]; then
  use_secure_kafka
  want() { [[ "$1" == kafka ]]; }
elif [[ "$which" == mongo-secure ]]; then
  use_secure_mongo
  want() { [[ "$1" == mongo ]]; }
fi

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
    want kafka && ((KAFKA_SECURE)) && kafka_secure_acls
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
