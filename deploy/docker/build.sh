#!/usr/bin/env bash
# Build slidr's images with the local engine (deploy/docker/engine.sh), idempotently.
#   build.sh [all]     the base (when missing) and the worker image
#   build.sh base      only the local Debian base
#   build.sh worker    only the worker image (needs the base)
#   build.sh services  the compose stack's Kafka, Redis and Prometheus images (services.Dockerfile; needs the base
#                      and the Kafka jars that deploy/local/kafka.sh fetch puts in .cache/)
# No image registry is reachable here, so the base is made from Debian's packages: debootstrap (minbase,
# bookworm, from the mirror the machine's apt sources name) with python3 and the CA certificates, cached as a
# tarball in .cache/docker-base/ and imported as $SLIDR_BASE_IMAGE. Elsewhere, leave BASE at the Dockerfile's
# default (a public image pinned by digest). pip inside the build gets the machine's CA bundle as a build secret
# (not baked into the image). The engine is started when it is not running, and stopped again at the end
# unless it was already running or SLIDR_DOCKER_KEEP=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BASE_IMAGE="${SLIDR_BASE_IMAGE:-slidr-base:bookworm-py3}"
WORKER_IMAGE="${SLIDR_WORKER_IMAGE:-slidr-worker:dev}"
CACHE="$ROOT/.cache/docker-base"
CA_BUNDLE="${SLIDR_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
DOCKER=/usr/bin/docker
say() { echo "[build] $(date +%T) $*" >&2; }

started=0
if ! bash deploy/docker/engine.sh status; then
  bash deploy/docker/engine.sh start
  started=1
fi
eval "$(bash deploy/docker/engine.sh env)"
finish() { if [[ $started == 1 && "${SLIDR_DOCKER_KEEP:-0}" != 1 ]]; then bash deploy/docker/engine.sh stop; fi; }
trap finish EXIT

mirror() {  # the Debian mirror the machine's apt sources name (deb822 .sources or a sources.list line)
  local m
  m="$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1)"
  [[ -n "$m" ]] || m="$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '{print $2}' | grep -v security | head -1)"
  [[ -n "$m" ]] || { say "no Debian mirror in the apt sources"; exit 1; }
  echo "$m"
}

base() {
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
  local tarball="$CACHE/bookworm-minbase-py3.tar"
  if [[ ! -f "$tarball" ]]; then
    local dir; dir="$(mktemp -d "$ROOT/.cache/debootstrap.XXXXXX")"
    say "debootstrap bookworm (minbase + python3) into $dir (about 2 min)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$dir" "$(mirror)" \
      >"$CACHE.debootstrap.log" 2>&1 || { tail -20 "$CACHE.debootstrap.log" >&2; rm -rf "$dir"; exit 1; }
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* \
      "$dir"/usr/share/man/* "$dir"/usr/share/locale/*
    mkdir -p "$CACHE"
    tar -C "$dir" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$dir"
  fi
  say "importing $tarball as $BASE_IMAGE"
  "$DOCKER" import "$tarball" "$BASE_IMAGE" >/dev/null
}

worker() {
  local secret=()
  [[ -f "$CA_BUNDLE" ]] && secret=(--secret "id=pipcert,src=$CA_BUNDLE")
  say "building $WORKER_IMAGE on $BASE_IMAGE"
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host "${secret[@]}" --build-arg "BASE=$BASE_IMAGE" \
    -f deploy/docker/Dockerfile -t "$WORKER_IMAGE" . >&2
  "$DOCKER" image prune -f >/dev/null  # the dangling layers a rebuild leaves behind
  "$DOCKER" builder prune -f --keep-storage "${SLIDR_BUILD_CACHE:-2GB}" >/dev/null  # BuildKit's cache, bounded
  say "$WORKER_IMAGE: $("$DOCKER" image inspect -f '{{.Size}}' "$WORKER_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
}

services() {
  local ctx="$ROOT/.cache/docker-ctx/services" version="${SLIDR_KAFKA_VERSION:-4.1.1}"
  bash deploy/local/kafka.sh fetch
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp -al "$ROOT/.cache/kafka-$version/libs" "$ctx/libs" 2>/dev/null || cp -a "$ROOT/.cache/kafka-$version/libs" "$ctx/libs"
  cp deploy/local/kafka.sh deploy/docker/kafka-entrypoint.sh "$ctx/"
  local target
  for target in kafka redis prometheus; do
    say "building slidr-$target:dev on $BASE_IMAGE"
    DOCKER_BUILDKIT=1 "$DOCKER" build --network host --build-arg "BASE=$BASE_IMAGE" --target "$target" \
      -f deploy/docker/services.Dockerfile -t "slidr-$target:dev" "$ctx" >&2
  done
  "$DOCKER" image prune -f >/dev/null
}

mkdir -p "$CACHE"
case "${1:-all}" in
  all) base; worker ;;
  base) base ;;
  worker) worker ;;
  services) base; services ;;
  *) echo "usage: $0 [all|base|worker|services]" >&2; exit 2 ;;
esac
