#!/usr/bin/env bash
# Redis for the profile store: Debian's redis-server, installed when missing,
# run with its data and log in $OBF_RUN_DIR/redis. A server already listening
# on $REDIS_HOST:$REDIS_PORT is reused.
#   redis.sh up | down | status
# The secure instance (docs/security.md): TLS only, on $REDIS_TLS_PORT, with
# ACL users instead of the open default user; data and log in $OBF_RUN_DIR/redis-tls.
#   redis.sh secure-up | secure-down | secure-status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/security.sh"

run="$OBF_RUN_DIR/redis"
pidfile="$run/redis.pid"

redis_ping() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

up() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server redis-tools
  if port_open "$REDIS_HOST" "$REDIS_PORT"; then
    wait_for "Redis" 30 redis_ping || die "something listens on $REDIS_HOST:$REDIS_PORT but does not answer PING"
    log "Redis: reusing the server already listening on $REDIS_HOST:$REDIS_PORT"
    return 0
  fi
  mkdir -p "$run"
  # appendonly + everysec: profiles survive a restart with at most ~1 s of
  # writes to replay, and the pipeline's monotonic writes make replays harmless.
  redis-server --bind "$REDIS_HOST" --port "$REDIS_PORT" --dir "$run" \
    --daemonize yes --pidfile "$pidfile" --logfile "$run/redis.log" \
    --appendonly yes --appendfsync everysec --save "" --protected-mode no \
    --maxmemory-policy noeviction
  wait_for "Redis" 30 redis_ping || { tail -20 "$run/redis.log" >&2; die "Redis did not start"; }
  log "Redis: ready on $REDIS_HOST:$REDIS_PORT (logs: $run/redis.log)"
}

down() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    log "Redis: stopping (pid $(cat "$pidfile"))"
    redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill "$(cat "$pidfile")" || true
    for _ in $(seq 1 40); do port_open "$REDIS_HOST" "$REDIS_PORT" || break; sleep 0.25; done
  fi
  rm -f "$pidfile"
}

status() { if redis_ping; then echo "redis: up ($REDIS_HOST:$REDIS_PORT)"; else echo "redis: down"; return 1; fi; }

# ---- the secure instance -----------------------------------------------------

srun="$OBF_RUN_DIR/redis-tls"
spidfile="$srun/redis.pid"

# admin_cli ARGS...: redis-cli over TLS as the admin user; the password goes
# through the environment (REDISCLI_AUTH), never the command line.
admin_cli() {
  REDISCLI_AUTH="$(head -n1 "$(secret redis-admin.password)")" redis-cli --tls --cacert "$OBF_TLS_DIR/ca.crt" \
    --cert "$OBF_TLS_DIR/client.crt" --key "$OBF_TLS_DIR/client.key" \
    -h "$REDIS_HOST" -p "$REDIS_TLS_PORT" --user "$REDIS_ADMIN_USER" --no-auth-warning "$@"
}
secure_ping() { admin_cli ping 2>/dev/null | grep -q PONG; }

# The ACL users (passwords stored as SHA-256): the default user is off; the
# pipeline may run the data commands it uses (scripts, strings, hashes, sets,
# sorted sets, streams, SCAN/DEL/EXPIRE) on the deployment's keys only, never
# KEYS, FLUSH*, CONFIG, DEBUG, ACL, CLIENT KILL, FUNCTION or SCRIPT FLUSH; the
# app user may only read profiles and segment sets; the admin user is this script's.
write_acl_file() {
  local pipeline_keys="" app_keys="" p
  for p in $REDIS_ACL_PREFIX; do
    [[ "$p" =~ ^[A-Za-z0-9_.-]+$ ]] || die "REDIS_ACL_PREFIX: '$p' is not a key prefix (letters, digits, _ . -)"
    pipeline_keys+=" ~$p:*"; app_keys+=" ~$p:profile:* ~$p:segment:*"
  done
  (umask 077; cat >"$srun/users.acl.new" <<ACL
user default off resetkeys resetchannels -@all
user $REDIS_ADMIN_USER on #$(sha256_of "$(secret redis-admin.password)") ~* &* +@all
user $REDIS_PIPELINE_USER on #$(sha256_of "$(secret redis-pipeline.password)") resetchannels$pipeline_keys -@all +@connection +@transaction +@scripting +@keyspace +@string +@hash +@set +@sortedset +@stream -@dangerous -@admin -function -fcall -fcall_ro -script|flush -script|kill -move
user $REDIS_APP_USER on #$(sha256_of "$(secret redis-app.password)") resetchannels$app_keys -@all +@connection +@read -@dangerous
ACL
  )
  mv "$srun/users.acl.new" "$srun/users.acl"
}

secure_up() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server redis-tools
  tls_material
  mkdir -p "$srun"
  write_acl_file
  if port_open "$REDIS_HOST" "$REDIS_TLS_PORT"; then
    wait_for "Redis (TLS)" 30 secure_ping \
      || die "something listens on $REDIS_HOST:$REDIS_TLS_PORT but does not answer the admin user over TLS"
    admin_cli acl load >/dev/null || die "Redis (TLS): ACL LOAD failed (see $srun/redis.log)"
    log "Redis (TLS): reusing the server on $REDIS_HOST:$REDIS_TLS_PORT (ACL users reloaded)"
    return 0
  fi
  redis-server --bind "$REDIS_HOST" --port 0 --tls-port "$REDIS_TLS_PORT" \
    --tls-cert-file "$OBF_TLS_DIR/server.crt" --tls-key-file "$OBF_TLS_DIR/server.key" \
    --tls-ca-cert-file "$OBF_TLS_DIR/ca.crt" --tls-auth-clients "$REDIS_TLS_AUTH_CLIENTS" \
    --aclfile "$srun/users.acl" --dir "$srun" \
    --daemonize yes --pidfile "$spidfile" --logfile "$srun/redis.log" \
    --appendonly yes --appendfsync everysec --save "" --protected-mode no \
    --maxmemory-policy noeviction
  wait_for "Redis (TLS)" 30 secure_ping || { tail -20 "$srun/redis.log" >&2; die "Redis (TLS) did not start"; }
  log "Redis (TLS): ready on $REDIS_HOST:$REDIS_TLS_PORT, users $REDIS_PIPELINE_USER, $REDIS_APP_USER (logs: $srun/redis.log)"
}

secure_down() {
  if [ -f "$spidfile" ] && kill -0 "$(cat "$spidfile")" 2>/dev/null; then
    log "Redis (TLS): stopping (pid $(cat "$spidfile"))"
    admin_cli shutdown nosave >/dev/null 2>&1 || kill "$(cat "$spidfile")" || true
    for _ in $(seq 1 40); do port_open "$REDIS_HOST" "$REDIS_TLS_PORT" || break; sleep 0.25; done
  fi
  rm -f "$spidfile"
}

secure_status() {
  if secure_ping; then echo "redis (TLS): up ($REDIS_HOST:$REDIS_TLS_PORT)"; else echo "redis (TLS): down"; return 1; fi
}

case "${1:-}" in
  up) up ;; down) down ;; status) status ;;
  secure-up) secure_up ;; secure-down) secure_down ;; secure-status) secure_status ;;
  *) echo "usage: $0 up|down|status|secure-up|secure-down|secure-status" >&2; exit 2 ;;
esac
