#!/usr/bin/env bash
# The local container engine: Debian's docker.io, its daemon started and stopped by pid (no systemd here).
#   engine.sh install   install docker.io, docker-compose, debootstrap and prometheus (its promtool; the
#                       service is not started) from Debian's packages if missing
#   engine.sh start     start dockerd (host networking only) unless ours already answers; prints nothing else
#   engine.sh stop      stop the dockerd this checkout started (by its pid file)
#   engine.sh status    exit 0 when ours answers
#   engine.sh env       print DOCKER_HOST=... for `eval`
# Everything lives under SLIDR_DOCKER_ROOT (default <repo>/.cache/docker, git-ignored): data root, pid file,
# log; the socket and exec root are under /tmp (short paths: a unix socket path is at most 107 bytes).
# Containers get no bridge, no NAT and no iptables rules: run them with --network host.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DROOT="${SLIDR_DOCKER_ROOT:-$ROOT/.cache/docker}"
RUNDIR="/tmp/slidr-docker-$(printf %s "$DROOT" | sha256sum | cut -c1-12)"
SOCK="$RUNDIR/docker.sock"
PIDFILE="$DROOT/dockerd.pid"
LOG="$DROOT/dockerd.log"
DOCKER=/usr/bin/docker  # Debian's client (a newer one earlier on PATH may lack the buildx plugin BuildKit wants)
say() { echo "[engine] $*" >&2; }

answers() { [[ -S "$SOCK" ]] && DOCKER_HOST="unix://$SOCK" timeout 10 "$DOCKER" info >/dev/null 2>&1; }

install() {
  local missing=()
  [[ -x /usr/sbin/dockerd && -x "$DOCKER" ]] || missing+=(docker.io)
  [[ -x /usr/bin/docker-compose ]] || missing+=(docker-compose)
  [[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
  [[ -x /usr/bin/promtool ]] || missing+=(prometheus)
  if ((${#missing[@]})); then
    say "installing ${missing[*]} from Debian's packages"
    if [[ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]]; then
      apt-get update -q >&2
    fi
    # policy-rc.d: no package may start its service here (prometheus would, on a machine with an init)
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.slidr && chmod +x /usr/sbin/policy-rc.d.slidr
    [[ -e /usr/sbin/policy-rc.d ]] || ln -s /usr/sbin/policy-rc.d.slidr /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    [[ "$(readlink /usr/sbin/policy-rc.d 2>/dev/null)" == /usr/sbin/policy-rc.d.slidr ]] && rm -f /usr/sbin/policy-rc.d
    rm -f /usr/sbin/policy-rc.d.slidr
  fi
}

start() {
  install
  if answers; then return 0; fi
  mkdir -p "$DROOT" "$RUNDIR"
  if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    say "dockerd $(cat "$PIDFILE") runs but does not answer yet"
  else
    rm -f "$PIDFILE" "$SOCK"
    say "starting dockerd (data root $DROOT)"
    # setsid: the daemon outlives the calling shell; it is stopped with `engine.sh stop`, by pid
    setsid /usr/sbin/dockerd --data-root "$DROOT/data" --exec-root "$RUNDIR/exec" -H "unix://$SOCK" \
      --pidfile "$PIDFILE" --iptables=false --ip6tables=false --ip-masq=false --bridge=none \
      --storage-driver overlay2 </dev/null >>"$LOG" 2>&1 &
  fi
  for _ in $(seq 1 120); do
    answers && return 0
    sleep 0.5
  done
  say "dockerd did not answer within 60 s; its log:"; tail -20 "$LOG" >&2; exit 1
}

stop() {
  [[ -f "$PIDFILE" ]] || return 0
  local pid; pid="$(cat "$PIDFILE")"
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping dockerd $pid"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { say "dockerd $pid still up after 30 s: SIGKILL"; kill -KILL "$pid"; }
  fi
  rm -f "$PIDFILE"
}

case "${1:-status}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) answers ;;
  env) echo "export DOCKER_HOST=unix://$SOCK" ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
