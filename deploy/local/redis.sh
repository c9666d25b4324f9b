#!/usr/bin/env bash
# redis-server from Debian's packages, on loopback, with its own port, data dir and pid file.
#   redis.sh install|up|down|status
set -euo pipefail
HOME_DIR="$(realpath -m "${SLIDR_HOME:-.slidr}")/redis"
PORT="${SLIDR_REDIS_PORT:-16379}"
PIDFILE="$HOME_DIR/redis.pid"

log() { echo "[redis] $*" >&2; }
alive() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

install() {
  command -v redis-server >/dev/null && return 0
  log "installing redis-server from Debian's packages"
  local sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  # Debian's package may start a system-wide instance on 6379; ours is separate and needs none.
}

up() {
  if alive; then log "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"; return 0; fi
  install
  mkdir -p "$HOME_DIR"
  redis-server --bind 127.0.0.1 --port "$PORT" --dir "$HOME_DIR" --daemonize yes \
      --pidfile "$PIDFILE" --logfile "$HOME_DIR/redis.log" --save 60 1000 --appendonly no \
      --protected-mode yes
  for _ in $(seq 1 100); do
    if [[ "$(redis-cli -p "$PORT" ping 2>/dev/null)" == PONG ]] && alive; then log "up (pid $(cat "$PIDFILE"))"; return 0; fi
    sleep 0.1
  done
  log "did not come up; see $HOME_DIR/redis.log"; exit 1
}

down() {
  if ! alive; then log "not running"; rm -f "$PIDFILE"; return 0; fi
  local pid; pid="$(cat "$PIDFILE")"
  kill -TERM "$pid"; for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$PIDFILE"; log "stopped"
}

status() {
  if alive; then echo "redis: running pid=$(cat "$PIDFILE") url=redis://127.0.0.1:$PORT/0 data=$HOME_DIR"
  else echo "redis: stopped"; return 3; fi
}

case "${1:-}" in
  install) install ;; up) up ;; down) down ;; status) status ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
