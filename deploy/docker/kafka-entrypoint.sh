#!/usr/bin/env bash
# The Kafka container's process 1: the project's own single-node KRaft broker (deploy/local/kafka.sh: config,
# storage format, start), kept in the foreground; SIGTERM stops the broker cleanly (kafka.sh down).
set -euo pipefail
K=/opt/slidr-kafka/kafka.sh
trap 'bash "$K" down; exit 0' TERM INT
bash "$K" up
pid="$(cat "$SLIDR_HOME/kafka/kafka.pid")"
while kill -0 "$pid" 2>/dev/null; do sleep 1 & wait $!; done
echo "[kafka] the broker exited; its last log lines:" >&2
tail -20 "$SLIDR_HOME/kafka/logs/server.log" >&2
exit 1
