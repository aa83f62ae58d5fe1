#!/usr/bin/env bash
# All local services onboardflow needs: Kafka (KRaft), Redis, PostgreSQL.
#   services.sh up       idempotent: start what is not running, reuse what is, wait until healthy
#   services.sh down     stop what these scripts started (reused servers are left alone)
#   services.sh status
# Ports, data dirs and the run folder come from env.sh (override by environment).
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
    log "services up; logs in $OBF_RUN_DIR"
    ;;
  down)
    "$here/kafka.sh" down
    "$here/redis.sh" down
    "$here/postgres.sh" down
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
