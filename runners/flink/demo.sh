#!/usr/bin/env bash
# `make flink-demo`: the onboarding demo with the native Flink job
# (pipelines/flink/) on the local Flink cluster instead of the Beam pipeline
# on Prism. Starts what is not running (the Flink cluster, Kafka, Redis,
# PostgreSQL), runs `onboardflow demo --engine flink` (events produced, job
# submitted, results checked, job stopped with a savepoint) and stops what it
# started. The summary is the one `make demo` prints, plus the job's id and
# the Flink web UI's address.
#
# FLINK_DEMO_ENGINE=beam runs the Beam pipeline on Beam's Flink runner
# instead: it needs Beam's Flink job server jar, which this machine's Maven
# registry does not serve (docs/flink.md); it stops there, saying why.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
services="$OBF_ROOT/runners/services"
engine="${FLINK_DEMO_ENGINE:-native}"

if [ "$engine" = beam ]; then
  # Fail before starting anything when the job server jar cannot be had.
  "$here/jobserver.sh" fetch
  jar="$("$here/jobserver.sh" path)"
fi

started=()
"$here/flink.sh" health >/dev/null 2>&1 || started+=(flink)
[ "$engine" = beam ] && { "$here/flink.sh" worker-pool-status >/dev/null 2>&1 || started+=(worker-pool); }
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
"$services/services.sh" up
if [ "$engine" = beam ]; then
  "$here/flink.sh" worker-pool-up
  "$OBF_ROOT/.venv/bin/onboardflow" demo --flink-master "$FLINK_HOST:$FLINK_REST_PORT" \
      --flink-job-server-jar "$jar" "$@"
else
  "$OBF_ROOT/.venv/bin/onboardflow" demo --engine flink --flink-rest-url "http://$FLINK_HOST:$FLINK_REST_PORT" "$@"
fi
