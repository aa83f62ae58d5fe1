#!/usr/bin/env bash
# PostgreSQL for the warehouse: Debian's postgresql, installed when missing,
# run as a private cluster in $OBF_RUN_DIR/postgres (owned by the `postgres`
# OS user, since initdb refuses root). A server already listening on
# $PG_HOST:$PG_PORT is reused; the onboardflow role and database are created
# in it when we can reach it as a superuser.
#   postgres.sh up | down | status
# The secure cluster (docs/security.md): TLS only, on $PG_TLS_PORT, in
# $OBF_RUN_DIR/postgres-tls, with three password roles (owner: migrations;
# pipeline: writes, no DDL; reader: SELECT) whose grants the migrations make.
#   postgres.sh secure-up | secure-down | secure-status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/security.sh"

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

# ---- the secure cluster --------------------------------------------------------

srun="$OBF_RUN_DIR/postgres-tls"
sdata="$srun/data"

# The libpq passfile of the three roles (host:port:db:role:password, 0600).
write_passfile() {
  local f="$OBF_SECRETS_DIR/pgpass" role
  (umask 077
   for role in owner pipeline reader; do
     local name="PG_${role^^}_ROLE"
     printf '%s:%s:*:%s:%s\n' "$PG_HOST" "$PG_TLS_PORT" "${!name}" "$(head -n1 "$(secret "pg-$role.password")")"
   done >"$f.new")
  mv "$f.new" "$f"
}

# secure_dsn ROLE: a libpq connection string without any secret in it.
secure_dsn() {
  echo "host=$PG_HOST port=$PG_TLS_PORT dbname=$PG_DATABASE user=$1 sslmode=verify-full" \
       "sslrootcert=$OBF_TLS_DIR/ca.crt passfile=$OBF_SECRETS_DIR/pgpass connect_timeout=5"
}
secure_ok() { psql "$(secure_dsn "$PG_OWNER_ROLE")" -tAc 'select 1' >/dev/null 2>&1; }

# The roles and the database, as the superuser over the cluster's private
# socket. Passwords are read by psql itself from the secret files (\set with
# backquotes), so they appear neither on a command line nor in this script.
ensure_secure_roles() {
  local f
  for f in owner pipeline reader; do secret "pg-$f.password" >/dev/null; done
  psql -h "$srun" -p "$PG_TLS_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA >/dev/null <<SQL
\\set owner_pw \`head -n1 $OBF_SECRETS_DIR/pg-owner.password\`
\\set pipeline_pw \`head -n1 $OBF_SECRETS_DIR/pg-pipeline.password\`
\\set reader_pw \`head -n1 $OBF_SECRETS_DIR/pg-reader.password\`
SELECT format('CREATE ROLE %I', r) FROM unnest(ARRAY['$PG_OWNER_ROLE', '$PG_PIPELINE_ROLE', '$PG_READER_ROLE']) AS r
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \\gexec
ALTER ROLE "$PG_OWNER_ROLE" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_pw';
ALTER ROLE "$PG_PIPELINE_ROLE" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT PASSWORD :'pipeline_pw';
ALTER ROLE "$PG_READER_ROLE" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT PASSWORD :'reader_pw';
SELECT format('CREATE DATABASE %I OWNER %I', '$PG_DATABASE', '$PG_OWNER_ROLE')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DATABASE') \\gexec
\\c "$PG_DATABASE"
REVOKE ALL ON DATABASE "$PG_DATABASE" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE "$PG_DATABASE" TO "$PG_PIPELINE_ROLE";
GRANT CONNECT ON DATABASE "$PG_DATABASE" TO "$PG_READER_ROLE";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
  write_passfile
}

secure_up() {
  local bin; bin="$(pg_bin)" || { apt_install postgresql; bin="$(pg_bin)"; }
  command -v psql >/dev/null || apt_install postgresql-client
  tls_material
  if port_open "$PG_HOST" "$PG_TLS_PORT"; then
    [ -f "$sdata/PG_VERSION" ] || die "something else listens on $PG_HOST:$PG_TLS_PORT (set PG_TLS_PORT)"
    ensure_secure_roles
    wait_for "PostgreSQL (TLS)" 30 secure_ok || die "PostgreSQL (TLS) is up but $PG_OWNER_ROLE cannot log in"
    log "PostgreSQL (TLS): reusing the cluster on $PG_HOST:$PG_TLS_PORT"
    return 0
  fi
  mkdir -p "$srun"
  chown postgres:postgres "$srun" 2>/dev/null || true
  chmod o+x "$OBF_RUN_DIR" 2>/dev/null || true
  if [ ! -f "$sdata/PG_VERSION" ]; then
    log "PostgreSQL (TLS): initializing cluster in $sdata"
    as_pg "$bin/initdb" -D "$sdata" -U postgres -A trust --encoding=UTF8 --locale=C.UTF-8 >"$srun/initdb.log" 2>&1 \
      || { cat "$srun/initdb.log" >&2; die "initdb failed"; }
    cat >>"$sdata/postgresql.conf" <<CONF
listen_addresses = '$PG_HOST'
port = $PG_TLS_PORT
unix_socket_directories = '$srun'
# Only the cluster's OS user reaches the socket (the superuser's door).
unix_socket_permissions = 0700
max_connections = 100
shared_buffers = 128MB
synchronous_commit = off
logging_collector = off
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = 'ca.crt'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
CONF
    # TCP: TLS and a password only; plaintext TCP is refused outright.
    cat >"$sdata/pg_hba.conf" <<HBA
local     all all            trust
hostssl   all all 127.0.0.1/32 scram-sha-256
hostssl   all all ::1/128      scram-sha-256
hostnossl all all 0.0.0.0/0    reject
hostnossl all all ::/0         reject
HBA
  fi
  # The server's certificate and key, readable by the postgres user only.
  install -m 644 -o postgres -g postgres "$OBF_TLS_DIR/server.crt" "$sdata/server.crt" 2>/dev/null \
    || install -m 644 "$OBF_TLS_DIR/server.crt" "$sdata/server.crt"
  install -m 644 -o postgres -g postgres "$OBF_TLS_DIR/ca.crt" "$sdata/ca.crt" 2>/dev/null \
    || install -m 644 "$OBF_TLS_DIR/ca.crt" "$sdata/ca.crt"
  install -m 600 -o postgres -g postgres "$OBF_TLS_DIR/server.key" "$sdata/server.key" 2>/dev/null \
    || install -m 600 "$OBF_TLS_DIR/server.key" "$sdata/server.key"
  log "PostgreSQL (TLS): starting on $PG_HOST:$PG_TLS_PORT (logs: $srun/postgres.log)"
  as_pg "$bin/pg_ctl" -D "$sdata" -l "$srun/postgres.log" -w -t 60 start >/dev/null \
    || { tail -20 "$srun/postgres.log" >&2; die "PostgreSQL (TLS) did not start"; }
  ensure_secure_roles
  wait_for "PostgreSQL (TLS)" 30 secure_ok || die "PostgreSQL (TLS) is up but $PG_OWNER_ROLE cannot log in"
  log "PostgreSQL (TLS): ready on $PG_HOST:$PG_TLS_PORT, roles $PG_OWNER_ROLE, $PG_PIPELINE_ROLE, $PG_READER_ROLE"
}

secure_down() {
  local bin; bin="$(pg_bin)" || return 0
  if [ -f "$sdata/postmaster.pid" ]; then
    log "PostgreSQL (TLS): stopping"
    as_pg "$bin/pg_ctl" -D "$sdata" -m fast -w stop >/dev/null || true
  fi
}

secure_status() {
  if secure_ok; then echo "postgres (TLS): up ($PG_HOST:$PG_TLS_PORT/$PG_DATABASE)"; else echo "postgres (TLS): down"; return 1; fi
}

case "${1:-}" in
  up) up ;; down) down ;; status) status ;;
  secure-up) secure_up ;; secure-down) secure_down ;; secure-status) secure_status ;;
  *) echo "usage: $0 up|down|status|secure-up|secure-down|secure-status" >&2; exit 2 ;;
esac
