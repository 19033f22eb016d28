#!/usr/bin/env bash
# Makes the local stack exist: PostgreSQL on 127.0.0.1:5432 and a Kafka-compatible broker (Tansu)
# on 127.0.0.1:9092 with the `shipment-events` topic. Idempotent: run it as often as you like.
#   WD_CACHE_DIR   where Tansu is installed and logs go (default ~/.cache/webhook-delivery)
#   KAFKA_TOPIC    topic to create (default shipment-events), KAFKA_PARTITIONS (default 6)
set -euo pipefail

CACHE_DIR="${WD_CACHE_DIR:-$HOME/.cache/webhook-delivery}"
TANSU_VERSION="0.6.0"
TANSU="$CACHE_DIR/tansu/bin/tansu"
TOPIC="${KAFKA_TOPIC:-shipment-events}"
PARTITIONS="${KAFKA_PARTITIONS:-6}"
mkdir -p "$CACHE_DIR"

log() { echo "services: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local port=$1 what=$2
  for _ in $(seq 1 100); do
    port_open "$port" && return 0
    sleep 0.2
  done
  log "$what did not come up on 127.0.0.1:$port"
  return 1
}

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || port_open 5432; then
    log "postgres is up on 127.0.0.1:5432"
    return
  fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting postgres $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for_port 5432 postgres
  # Tests and the demo connect as `postgres` without a password to the database `test`.
  su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname = 'test'\"" | grep -q 1 \
    || su postgres -c "createdb test"
}

# Postgres must speak TLS: tests connect with sslmode=require, verify-ca and verify-full. Debian's
# package turns ssl on with its self-signed "snakeoil" certificate (ssl-cert package); this checks
# that, and on a server where it is off, makes the certificate if needed and turns ssl on.
SNAKEOIL_CERT=/etc/ssl/certs/ssl-cert-snakeoil.pem
SNAKEOIL_KEY=/etc/ssl/private/ssl-cert-snakeoil.key

ensure_postgres_ssl() {
  if [ "$(su postgres -c "psql -qtAc 'SHOW ssl'")" = "on" ]; then
    log "postgres ssl is on ($(su postgres -c "psql -qtAc 'SHOW ssl_cert_file'"))"
    return
  fi
  log "turning postgres ssl on with the snakeoil certificate"
  if [ ! -f "$SNAKEOIL_KEY" ]; then
    command -v make-ssl-cert >/dev/null 2>&1 \
      || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq ssl-cert >/dev/null; }
    make-ssl-cert generate-default-snakeoil
  fi
  # The key is readable by the ssl-cert group only.
  usermod -a -G ssl-cert postgres
  su postgres -c "psql -qc \"ALTER SYSTEM SET ssl_cert_file = '$SNAKEOIL_CERT'\" \
    -c \"ALTER SYSTEM SET ssl_key_file = '$SNAKEOIL_KEY'\" -c 'ALTER SYSTEM SET ssl = on'"
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  # A restart, not a reload: the server must pick up its new group to read the key.
  pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  wait_for_port 5432 postgres
  [ "$(su postgres -c "psql -qtAc 'SHOW ssl'")" = "on" ] || { log "postgres ssl could not be turned on"; exit 1; }
}

ensure_tansu() {
  if [ ! -x "$TANSU" ] || ! "$TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    log "installing tansu $TANSU_VERSION into $CACHE_DIR/tansu (a few minutes, once)"
    cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked \
      --root "$CACHE_DIR/tansu" >"$CACHE_DIR/tansu-install.log" 2>&1 \
      || { tail -n 30 "$CACHE_DIR/tansu-install.log" >&2; exit 1; }
  fi
  if port_open 9092; then
    log "kafka (tansu) is up on 127.0.0.1:9092"
  else
    log "starting tansu on 127.0.0.1:9092 (memory storage; log: $CACHE_DIR/tansu.log)"
    nohup "$TANSU" broker --listener-url tcp://127.0.0.1:9092 \
      --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
      >"$CACHE_DIR/tansu.log" 2>&1 &
    wait_for_port 9092 tansu
  fi
  if "$TANSU" topic list --broker tcp://127.0.0.1:9092 2>/dev/null | grep -qw "$TOPIC"; then
    log "topic $TOPIC exists"
  else
    "$TANSU" topic create "$TOPIC" --partitions "$PARTITIONS" --broker tcp://127.0.0.1:9092 >/dev/null 2>&1 \
      || log "topic $TOPIC not created (it may exist already)"
  fi
}

ensure_postgres
ensure_postgres_ssl
ensure_tansu
