#!/usr/bin/env bash
# All local services onboardflow needs: Kafka (KRaft), Redis, PostgreSQL.
#   services.sh up       idempotent: start what is not running, reuse what is, wait until healthy
#   services.sh down     stop what these scripts started (reused servers are left alone)
#   services.sh status
# Ports, data dirs and the run folder come from env.sh (override by environment).
# `up` writes the endpoints to $OBF_RUN_DIR/services.env (the CLI's defaults).
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
source "$here/env.sh"

case "${1:-}" in
  up)
    mkdir -p "$OBF_RUN_DIR"
    "$here/kafka.sh" up
    "$here/kafka.sh" topics
    "$here/redis.sh" up
    "$here/postgres.sh" up
    # The endpoints just started, for every `onboardflow` command
    # (runners/settings.py reads them unless the environment says otherwise).
    cat >"$OBF_RUN_DIR/services.env" <<EOF
# written by services.sh up ($(date -u +%Y-%m-%dT%H:%M:%SZ)); read by runners/settings.py
OBF_KAFKA_BOOTSTRAP=$KAFKA_HOST:$KAFKA_PORT
OBF_REDIS_URL=redis://$REDIS_HOST:$REDIS_PORT/0
OBF_WAREHOUSE_DSN=postgresql://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DATABASE
EOF
    log "services up; logs in $OBF_RUN_DIR, endpoints in $OBF_RUN_DIR/services.env"
    ;;
  down)
    "$here/kafka.sh" down
    "$here/redis.sh" down
    "$here/postgres.sh" down
    rm -f "$OBF_RUN_DIR/services.env"
    ;;
  status)
    rc=0
    "$here/kafka.sh" status || rc=1
    "$here/redis.sh" status || rc=1
    "$here/postgres.sh" status || rc=1
    exit $rc
    ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
