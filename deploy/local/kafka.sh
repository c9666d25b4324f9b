#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, broker+controller) as a plain JVM process on loopback.
#   kafka.sh fetch|up|down|status
# Jars come from Maven Central (deploy/local/pom.xml) into $SLIDR_CACHE_DIR; data, logs and the pid
# file live in $SLIDR_HOME/kafka. `up` is idempotent; `down` stops only the process whose pid we wrote.
# Secure listener (off by default): with SLIDR_KAFKA_SASL_SSL_PORT set, the broker also listens SASL_SSL
# (SCRAM-SHA-512, TLS with the certificates of certs.sh in $SLIDR_CERTS_DIR, default $SLIDR_HOME/certs, made
# if missing) on 127.0.0.1:<port>. The SCRAM user $SLIDR_KAFKA_SASL_USERNAME (default slidr) with the password
# in $SLIDR_KAFKA_SASL_PASSWORD or the file $SLIDR_KAFKA_SASL_PASSWORD_FILE is created when the storage is
# formatted (a later password change needs a fresh storage folder). PLAINTEXT stays the inter-broker listener.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="$(realpath -m "${SLIDR_HOME:-.slidr}")/kafka"
CACHE="$(realpath -m "${SLIDR_CACHE_DIR:-.cache}")"
VERSION="${SLIDR_KAFKA_VERSION:-4.1.1}"
PORT="${SLIDR_KAFKA_PORT:-19092}"
CPORT="${SLIDR_KAFKA_CONTROLLER_PORT:-19093}"
SPORT="${SLIDR_KAFKA_SASL_SSL_PORT:-}"
CERTS="$(realpath -m "${SLIDR_CERTS_DIR:-${SLIDR_HOME:-.slidr}/certs}")"
SASL_USER="${SLIDR_KAFKA_SASL_USERNAME:-slidr}"
HEAP="${SLIDR_KAFKA_HEAP:--Xmx1G -Xms512m}"
LIBS="$CACHE/kafka-$VERSION/libs"
PIDFILE="$HOME_DIR/kafka.pid"

log() { echo "[kafka] $*" >&2; }

alive() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/${1:-$PORT}") 2>/dev/null; }

# "pid N, command" of the process listening on port $1, when ss can tell
holder() { ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*(("\([^"]*\)",pid=\([0-9]*\).*/pid \2, \1/p' | head -1; }

sasl_password() {
  if [[ -n "${SLIDR_KAFKA_SASL_PASSWORD:-}" ]]; then printf '%s' "$SLIDR_KAFKA_SASL_PASSWORD"
  elif [[ -n "${SLIDR_KAFKA_SASL_PASSWORD_FILE:-}" ]]; then head -n1 "$SLIDR_KAFKA_SASL_PASSWORD_FILE" | tr -d '\r'
  fi
}

fetch() {
  if [[ -f "$LIBS/kafka_2.13-$VERSION.jar" ]]; then return 0; fi
  command -v mvn >/dev/null || { log "Maven (mvn) is required to fetch the Kafka jars"; exit 1; }
  log "fetching org.apache.kafka:kafka_2.13:$VERSION and its runtime dependencies from Maven Central"
  mkdir -p "$LIBS.tmp"
  mvn -q -B -Dstyle.color=never -f "$HERE/pom.xml" -Dkafka.version="$VERSION" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp"
  rm -rf "$LIBS" && mv "$LIBS.tmp" "$LIBS"
}

write_config() {
  mkdir -p "$HOME_DIR/data" "$HOME_DIR/logs"
  local secure="" listeners="PLAINTEXT://127.0.0.1:$PORT" protomap="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
  if [[ -n "$SPORT" ]]; then
    listeners+=",SASL_SSL://127.0.0.1:$SPORT"; protomap+=",SASL_SSL:SASL_SSL"
    secure="sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$CERTS/server.pem
listener.name.sasl_ssl.ssl.client.auth=none
"
  fi
  cat > "$HOME_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=$listeners,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=$listeners
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protomap
log.dirs=$HOME_DIR/data
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true
log.retention.hours=168
PROPS
  if [[ -n "$secure" ]]; then printf '%s' "$secure" >> "$HOME_DIR/server.properties"; fi
  cat > "$HOME_DIR/log4j2.properties" <<PROPS
status = error
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = $HOME_DIR/logs/server.log
appender.file.filePattern = $HOME_DIR/logs/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
PROPS
}

java_cmd() { java $HEAP -XX:+UseG1GC -Djava.awt.headless=true \
  -Dlog4j2.configurationFile="$HOME_DIR/log4j2.properties" -cp "$LIBS/*" "$@"; }

# SCRAM credentials go into the metadata log at format time. The password reaches StorageTool through a java
# @argfile (mode 600, deleted at once), so it never shows in a command line (ps, /proc/*/cmdline).
format_storage() {
  local cid; cid="$(java_cmd kafka.tools.StorageTool random-uuid | tail -1)"
  log "formatting storage (cluster id $cid)"
  local args="$HOME_DIR/format.args" rc=0
  ( umask 077; printf '%s\n' kafka.tools.StorageTool format -t "$cid" -c "\"$HOME_DIR/server.properties\"" > "$args" )
  if [[ -n "$SPORT" ]]; then
    local pw; pw="$(sasl_password)"
    [[ -n "$pw" ]] || { rm -f "$args"; log "SLIDR_KAFKA_SASL_PASSWORD(_FILE) is required with SLIDR_KAFKA_SASL_SSL_PORT"; exit 1; }
    if [[ "$SASL_USER$pw" =~ [][,\"\\=[:space:]] ]]; then
      rm -f "$args"; log "the SCRAM user name and password may not hold spaces or any of , [ ] = \" \\"; exit 1
    fi
    printf '%s\n' --add-scram "\"SCRAM-SHA-512=[name=$SASL_USER,password=$pw]\"" >> "$args"
  fi
  java_cmd "@$args" > "$HOME_DIR/logs/format.log" 2>&1 || rc=$?
  rm -f "$args"
  if (( rc != 0 )); then cat "$HOME_DIR/logs/format.log" >&2; exit 1; fi
  if [[ -n "$SPORT" ]]; then echo "SCRAM-SHA-512 $SASL_USER" > "$HOME_DIR/scram-users"; else rm -f "$HOME_DIR/scram-users"; fi
}

up() {
  if alive; then log "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"; return 0; fi
  local p
  for p in "$PORT" "$CPORT" $SPORT; do
    if port_open "$p"; then log "port $p is taken by a process we did not start ($(holder "$p"))"; exit 1; fi
  done
  command -v java >/dev/null || { log "Java 17+ is required"; exit 1; }
  fetch
  if [[ -n "$SPORT" ]]; then bash "$HERE/certs.sh" "$CERTS"; fi
  write_config
  if [[ ! -f "$HOME_DIR/data/meta.properties" ]]; then
    format_storage
  elif [[ -n "$SPORT" ]] && ! grep -qx "SCRAM-SHA-512 $SASL_USER" "$HOME_DIR/scram-users" 2>/dev/null; then
    log "the storage in $HOME_DIR/data was formatted without the SCRAM user $SASL_USER (users are made at format"
    log "time): use another SLIDR_HOME, or remove $HOME_DIR/data (its topics are lost)"; exit 1
  fi
  log "starting Kafka $VERSION on 127.0.0.1:$PORT"
  # shellcheck disable=SC2086
  setsid nohup java $HEAP -XX:+UseG1GC -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$HOME_DIR/log4j2.properties" -cp "$LIBS/*" \
      kafka.Kafka "$HOME_DIR/server.properties" > "$HOME_DIR/logs/stdout.log" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 240); do
    if ! alive; then log "exited during start; see $HOME_DIR/logs"; tail -20 "$HOME_DIR/logs/stdout.log" >&2; rm -f "$PIDFILE"; exit 1; fi
    if port_open && grep -q "Kafka Server started" "$HOME_DIR/logs/server.log" 2>/dev/null; then
      log "up (pid $(cat "$PIDFILE"))"; return 0
    fi
    sleep 0.5
  done
  log "did not come up in 120 s"; exit 1
}

down() {
  if ! alive; then log "not running"; rm -f "$PIDFILE"; return 0; fi
  local pid; pid="$(cat "$PIDFILE")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && { log "forcing stop"; kill -KILL "$pid" 2>/dev/null || true; }
  rm -f "$PIDFILE"; log "stopped"
}

status() {
  if alive; then echo "kafka: running pid=$(cat "$PIDFILE") bootstrap=127.0.0.1:$PORT${SPORT:+ sasl_ssl=127.0.0.1:$SPORT} version=$VERSION data=$HOME_DIR/data"
  else echo "kafka: stopped"; return 3; fi
}

case "${1:-}" in
  fetch) fetch ;; up) up ;; down) down ;; status) status ;;
  *) echo "usage: $0 fetch|up|down|status" >&2; exit 2 ;;
esac
