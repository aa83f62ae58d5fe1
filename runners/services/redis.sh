#!/usr/bin/env bash
# Redis for the profile store: Debian's redis-server, installed when missing,
# run with its data and log in $OBF_RUN_DIR/redis. A server already listening
# on $REDIS_HOST:$REDIS_PORT is reused.
#   redis.sh up | down | status
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

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

case "${1:-}" in
  up) up ;; down) down ;; status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
