#!/usr/bin/env bash
# redis-server from Debian's packages, on loopback, with its own port, data dir and pid file.
#   redis.sh install|up|down|status
# Secure mode (off by default): SLIDR_REDIS_TLS_PORT=<port> serves TLS there with the certificates of certs.sh in
# $SLIDR_CERTS_DIR (default $SLIDR_HOME/certs, made if missing; clients need no certificate of their own) and
# turns the plain port off unless SLIDR_REDIS_PORT is set too. A password in SLIDR_REDIS_PASSWORD or the file
# SLIDR_REDIS_PASSWORD_FILE turns on requirepass (with or without TLS); it goes into a config file readable by
# its owner only, never onto a command line.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="$(realpath -m "${SLIDR_HOME:-.slidr}")/redis"
TLS_PORT="${SLIDR_REDIS_TLS_PORT:-}"
if [[ -n "$TLS_PORT" ]]; then PORT="${SLIDR_REDIS_PORT:-0}"; else PORT="${SLIDR_REDIS_PORT:-16379}"; fi
CERTS="$(realpath -m "${SLIDR_CERTS_DIR:-${SLIDR_HOME:-.slidr}/certs}")"
PIDFILE="$HOME_DIR/redis.pid"

log() { echo "[redis] $*" >&2; }
alive() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
holder() { ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*(("\([^"]*\)",pid=\([0-9]*\).*/pid \2, \1/p' | head -1; }

password() {
  if [[ -n "${SLIDR_REDIS_PASSWORD:-}" ]]; then printf '%s' "$SLIDR_REDIS_PASSWORD"
  elif [[ -n "${SLIDR_REDIS_PASSWORD_FILE:-}" ]]; then head -n1 "$SLIDR_REDIS_PASSWORD_FILE" | tr -d '\r'
  fi
}

# PING on the port clients use (TLS when on); the password goes to redis-cli in its environment
ping() (
  pw="$(password)"
  if [[ -n "$pw" ]]; then export REDISCLI_AUTH="$pw"; fi
  if [[ -n "$TLS_PORT" ]]; then
    redis-cli -h 127.0.0.1 -p "$TLS_PORT" --tls --cacert "$CERTS/ca.crt" ping 2>/dev/null
  else
    redis-cli -p "$PORT" ping 2>/dev/null
  fi
)

install() {
  command -v redis-server >/dev/null && return 0
  log "installing redis-server from Debian's packages"
  local sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  # Debian's package may start a system-wide instance on 6379; ours is separate and needs none.
}

up() {
  if alive; then log "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:${TLS_PORT:-$PORT}"; return 0; fi
  local p
  for p in $TLS_PORT "$PORT"; do
    if [[ "$p" != 0 ]] && port_open "$p"; then
      log "port $p is taken by a process we did not start ($(holder "$p"))"; exit 1
    fi
  done
  install
  mkdir -p "$HOME_DIR"
  # secrets and TLS go into a config file (mode 600) named first on the command line; none without them
  local conf=() pw; pw="$(password)"
  rm -f "$HOME_DIR/secure.conf"
  if [[ -n "$TLS_PORT" || -n "$pw" ]]; then
    ( umask 077; : > "$HOME_DIR/secure.conf" )
    if [[ -n "$pw" ]]; then
      [[ "$pw" =~ [[:space:]\"\'\\] ]] && { log "the Redis password may not hold spaces, quotes or backslashes"; exit 1; }
      echo "requirepass \"$pw\"" >> "$HOME_DIR/secure.conf"
    fi
    if [[ -n "$TLS_PORT" ]]; then
      bash "$HERE/certs.sh" "$CERTS"
      cat >> "$HOME_DIR/secure.conf" <<CONF
tls-port $TLS_PORT
tls-cert-file "$CERTS/server.crt"
tls-key-file "$CERTS/server.key"
tls-ca-cert-file "$CERTS/ca.crt"
tls-auth-clients no
CONF
    fi
    conf=("$HOME_DIR/secure.conf")
  fi
  redis-server "${conf[@]}" --bind 127.0.0.1 --port "$PORT" --dir "$HOME_DIR" --daemonize yes \
      --pidfile "$PIDFILE" --logfile "$HOME_DIR/redis.log" --save 60 1000 --appendonly no \
      --protected-mode yes
  for _ in $(seq 1 100); do
    if [[ "$(ping)" == PONG ]] && alive; then log "up (pid $(cat "$PIDFILE"))"; return 0; fi
    sleep 0.1
  done
  log "did not come up; see $HOME_DIR/redis.log"; tail -5 "$HOME_DIR/redis.log" >&2 || true; exit 1
}

down() {
  if ! alive; then log "not running"; rm -f "$PIDFILE"; return 0; fi
  local pid; pid="$(cat "$PIDFILE")"
  kill -TERM "$pid"; for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$PIDFILE"; log "stopped"
}

status() {
  if ! alive; then echo "redis: stopped"; return 3; fi
  if [[ -n "$TLS_PORT" ]]; then
    echo "redis: running pid=$(cat "$PIDFILE") url=rediss://127.0.0.1:$TLS_PORT/0 data=$HOME_DIR"
  else
    echo "redis: running pid=$(cat "$PIDFILE") url=redis://127.0.0.1:$PORT/0 data=$HOME_DIR"
  fi
}

case "${1:-}" in
  install) install ;; up) up ;; down) down ;; status) status ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
