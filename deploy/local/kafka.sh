#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, broker+controller) as a plain JVM process on loopback.
#   kafka.sh fetch|up|down|status
# Jars come from Maven Central (deploy/local/pom.xml) into $SLIDR_CACHE_DIR; data, logs and the pid
# file live in $SLIDR_HOME/kafka. `up` is idempotent; `down` stops only the process whose pid we wrote.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="$(realpath -m "${SLIDR_HOME:-.slidr}")/kafka"
CACHE="$(realpath -m "${SLIDR_CACHE_DIR:-.cache}")"
VERSION="${SLIDR_KAFKA_VERSION:-4.1.1}"
PORT="${SLIDR_KAFKA_PORT:-19092}"
CPORT="${SLIDR_KAFKA_CONTROLLER_PORT:-19093}"
HEAP="${SLIDR_KAFKA_HEAP:--Xmx1G -Xms512m}"
LIBS="$CACHE/kafka-$VERSION/libs"
PIDFILE="$HOME_DIR/kafka.pid"

log() { echo "[kafka] $*" >&2; }

alive() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

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
  cat > "$HOME_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
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

up() {
  if alive; then log "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"; return 0; fi
  if port_open; then log "port $PORT is taken by a process we did not start"; exit 1; fi
  command -v java >/dev/null || { log "Java 17+ is required"; exit 1; }
  fetch
  write_config
  if [[ ! -f "$HOME_DIR/data/meta.properties" ]]; then
    local cid; cid="$(java_cmd kafka.tools.StorageTool random-uuid | tail -1)"
    log "formatting storage (cluster id $cid)"
    java_cmd kafka.tools.StorageTool format -t "$cid" -c "$HOME_DIR/server.properties" \
        > "$HOME_DIR/logs/format.log" 2>&1 || { cat "$HOME_DIR/logs/format.log" >&2; exit 1; }
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
  if alive; then echo "kafka: running pid=$(cat "$PIDFILE") bootstrap=127.0.0.1:$PORT version=$VERSION data=$HOME_DIR/data"
  else echo "kafka: stopped"; return 3; fi
}

case "${1:-}" in
  fetch) fetch ;; up) up ;; down) down ;; status) status ;;
  *) echo "usage: $0 fetch|up|down|status" >&2; exit 2 ;;
esac
