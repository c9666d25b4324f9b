#!/usr/bin/env bash
# Certificates for the local broker's SASL_SSL listener and redis-server's TLS port (loopback only).
#   certs.sh DIR
# Makes, with openssl, in DIR (mode 700):
#   ca.crt, ca.key        a private CA (clients trust ca.crt: SLIDR_KAFKA_SSL_CAFILE, SLIDR_REDIS_TLS_CAFILE)
#   server.crt, server.key  the server certificate it signed (CN localhost, SAN IP:127.0.0.1, DNS:localhost)
#   server.pem            server.key + server.crt + ca.crt: the broker's PEM key store (ssl.keystore.type=PEM)
# Keys are unencrypted (no password to keep anywhere) and readable by their owner only. Idempotent: files that
# are still valid for a day are kept; otherwise the whole set is made again.
set -euo pipefail
DIR="${1:?usage: certs.sh DIR}"
DAYS="${SLIDR_CERTS_DAYS:-365}"
log() { echo "[certs] $*" >&2; }

command -v openssl >/dev/null || {
  log "installing openssl from Debian's packages"
  sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openssl >/dev/null
}

valid() {
  for f in ca.crt ca.key server.crt server.key server.pem; do [[ -s "$DIR/$f" ]] || return 1; done
  openssl x509 -noout -checkend 86400 -in "$DIR/server.crt" >/dev/null &&
    openssl verify -CAfile "$DIR/ca.crt" "$DIR/server.crt" >/dev/null 2>&1
}

mkdir -p "$DIR" && chmod 700 "$DIR"
if valid; then log "certificates in $DIR are valid"; exit 0; fi

umask 077
tmp="$(mktemp -d "$DIR/.new.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
openssl req -x509 -new -nodes -newkey rsa:2048 -sha256 -days "$DAYS" -keyout "$tmp/ca.key" -out "$tmp/ca.crt" \
  -subj "/CN=slidr local CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" -addext "subjectKeyIdentifier=hash" 2>/dev/null
openssl req -new -nodes -newkey rsa:2048 -sha256 -keyout "$tmp/server.key" -out "$tmp/server.csr" \
  -subj "/CN=localhost" 2>/dev/null
cat > "$tmp/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EXT
openssl x509 -req -sha256 -days "$DAYS" -in "$tmp/server.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" \
  -CAcreateserial -extfile "$tmp/server.ext" -out "$tmp/server.crt" 2>/dev/null
cat "$tmp/server.key" "$tmp/server.crt" "$tmp/ca.crt" > "$tmp/server.pem"
chmod 644 "$tmp/ca.crt" "$tmp/server.crt"
for f in ca.key ca.crt server.key server.crt server.pem; do mv -f "$tmp/$f" "$DIR/$f"; done
log "made a CA and a server certificate for 127.0.0.1/localhost in $DIR (valid $DAYS days)"
