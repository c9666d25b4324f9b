#!/usr/bin/env bash
# Set up slidr on a fresh machine (idempotent; a second run takes seconds):
#   - a Python >= 3.11 virtualenv in .venv with slidr installed editable, with the extras in $SLIDR_EXTRAS
#     (default "dev,train": tests, training; torch from PyPI is a CUDA build of several GB)
#   - the Apache Kafka jars from Maven Central (deploy/local/kafka.sh fetch), run on the machine's Java 17
#   - redis-server from Debian's packages
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
EXTRAS="${SLIDR_EXTRAS:-dev,train}"
PY="${PYTHON:-python3}"
say() { echo "[setup] $*" >&2; }

"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || { say "Python 3.11+ is required (set PYTHON=...)"; exit 1; }
command -v java >/dev/null || { say "Java 17 is required for the local Kafka broker"; exit 1; }
java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])' || { say "Java 17+ is required"; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.slidr-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS//,/-}"
if [[ ! -f "$stamp" ]]; then
  say "installing slidr[$EXTRAS] into .venv (first time: several minutes, torch is large)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2> >(grep -vE "BuildBackendWarning|^\s*(!!|\*+|$)" >&2 || true)
  rm -f .venv/.slidr-installed-* && touch "$stamp"
fi
# onnxruntime-gpu and the CPU-only onnxruntime must never sit side by side (they shadow each other).
if .venv/bin/python -m pip show -q onnxruntime >/dev/null 2>&1; then
  say "a CPU 'onnxruntime' was pulled in next to onnxruntime-gpu: removing it"
  .venv/bin/python -m pip uninstall -q -y onnxruntime
  .venv/bin/python -m pip install -q --force-reinstall --no-deps onnxruntime-gpu
fi

bash deploy/local/kafka.sh fetch
bash deploy/local/redis.sh install
say "ready: .venv/bin/slidr --help"
