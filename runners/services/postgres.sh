#!/usr/bin/env bash
# PostgreSQL for the warehouse: Debian's postgresql, installed when missing,
# run as a private cluster in $OBF_RUN_DIR/postgres (owned by the `postgres`
# OS user, since initdb refuses root). A server already listening on
# $PG_HOST:$PG_PORT is reused; the onboardflow role and database are created
# in it when we can reach it as a superuser.
#   postgres.sh up | down | status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

run="$OBF_RUN_DIR/postgres"
data="$run/data"

pg_bin() {
  local d; d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  [ -n "$d" ] || return 1; echo "$d"
}

as_pg() {  # run a command as the postgres OS user when we are root
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

dsn_ok() {
  PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DATABASE" \
    -tAc 'select 1' >/dev/null 2>&1
}

ensure_role_and_db() {  # SUPERUSER_PSQL...: how to reach the server as a superuser
  "$@" -v ON_ERROR_STOP=1 -qtAc "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
        CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD';
      END IF; END \$\$;" >/dev/null
  if ! "$@" -qtAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'" | grep -q 1; then
    "$@" -qtAc "CREATE DATABASE $PG_DATABASE OWNER $PG_USER" >/dev/null
  fi
}

up() {
  local bin; bin="$(pg_bin)" || { apt_install postgresql; bin="$(pg_bin)"; }
  command -v psql >/dev/null || apt_install postgresql-client
  if port_open "$PG_HOST" "$PG_PORT"; then
    if ! dsn_ok; then
      log "PostgreSQL: a server listens on $PG_HOST:$PG_PORT; creating role/database $PG_USER/$PG_DATABASE in it"
      ensure_role_and_db as_pg psql -h "$PG_HOST" -p "$PG_PORT" -d postgres \
        || die "cannot reach $PG_HOST:$PG_PORT as superuser 'postgres'; create role $PG_USER and database $PG_DATABASE yourself"
    fi
    log "PostgreSQL: reusing the server already listening on $PG_HOST:$PG_PORT"
    return 0
  fi
  mkdir -p "$run"
  chown postgres:postgres "$run" 2>/dev/null || true
  # The postgres user must be able to reach the run dir through its parents.
  chmod o+x "$OBF_RUN_DIR" 2>/dev/null || true
  if [ ! -f "$data/PG_VERSION" ]; then
    log "PostgreSQL: initializing cluster in $data"
    as_pg "$bin/initdb" -D "$data" -U postgres -A trust --encoding=UTF8 --locale=C.UTF-8 >"$run/initdb.log" 2>&1 \
      || { cat "$run/initdb.log" >&2; die "initdb failed"; }
    cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '$PG_HOST'
port = $PG_PORT
unix_socket_directories = '$run'
max_connections = 100
shared_buffers = 256MB
# Dev/test cluster: durability of the last few ms is traded for commit latency;
# the pipeline's writes are idempotent and replayed from Kafka after a crash.
synchronous_commit = off
logging_collector = off
CONF
    # Local socket: trust (admin from this script); TCP: password (like production).
    cat >"$data/pg_hba.conf" <<HBA
local all all trust
host  all all 127.0.0.1/32 scram-sha-256
host  all all ::1/128 scram-sha-256
HBA
  fi
  log "PostgreSQL: starting on $PG_HOST:$PG_PORT (logs: $run/postgres.log)"
  as_pg "$bin/pg_ctl" -D "$data" -l "$run/postgres.log" -w -t 60 start >/dev/null \
    || { tail -20 "$run/postgres.log" >&2; die "PostgreSQL did not start"; }
  ensure_role_and_db as_pg psql -h "$run" -p "$PG_PORT" -U postgres -d postgres
  wait_for "PostgreSQL" 30 dsn_ok || die "PostgreSQL is up but $PG_USER cannot log in"
  log "PostgreSQL: ready (postgresql://$PG_USER:***@$PG_HOST:$PG_PORT/$PG_DATABASE)"
}

down() {
  local bin; bin="$(pg_bin)" || return 0
  if [ -f "$data/postmaster.pid" ]; then
    log "PostgreSQL: stopping"
    as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null || true
  fi
}

status() { if dsn_ok; then echo "postgres: up ($PG_HOST:$PG_PORT/$PG_DATABASE)"; else echo "postgres: down"; return 1; fi; }

case "${1:-}" in
  up) up ;; down) down ;; status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
