#!/usr/bin/env bash
# `make flink-demo`: the onboarding demo with the pipeline on the local Flink
# cluster instead of Prism. Checks for Beam's Flink job server jar first (and
# stops there, saying why, when there is none), then starts what is not
# running (Flink, the Beam SDK worker pool, Kafka/Redis/PostgreSQL), runs
# `onboardflow demo --flink-master ...` (events produced, job submitted,
# results checked, job cancelled) and stops what it started.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
services="$OBF_ROOT/runners/services"

# Fail before starting anything when the job server jar cannot be had.
"$here/jobserver.sh" fetch
jar="$("$here/jobserver.sh" path)"

started=()
"$here/flink.sh" health >/dev/null 2>&1 || started+=(flink)
"$here/flink.sh" worker-pool-status >/dev/null 2>&1 || started+=(worker-pool)
"$services/kafka.sh" status >/dev/null 2>&1 || started+=(kafka)
"$services/redis.sh" status >/dev/null 2>&1 || started+=(redis)
"$services/postgres.sh" status >/dev/null 2>&1 || started+=(postgres)
cleanup() {
  for s in "${started[@]}"; do
    case "$s" in
      flink) "$here/flink.sh" down || true ;;
      worker-pool) "$here/flink.sh" worker-pool-down || true ;;
      *) "$services/$s.sh" down || true ;;
    esac
  done
}
trap cleanup EXIT

"$here/flink.sh" up
"$here/flink.sh" worker-pool-up
"$services/services.sh" up
"$OBF_ROOT/.venv/bin/onboardflow" demo --flink-master "$FLINK_HOST:$FLINK_REST_PORT" \
    --flink-job-server-jar "$jar" "$@"
