#!/usr/bin/env bash
# `make demo`: start what is not running, run the demo, stop what it started.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/services/env.sh"

started=()
"$here/services/kafka.sh" status >/dev/null 2>&1 || started+=(kafka)
"$here/services/redis.sh" status >/dev/null 2>&1 || started+=(redis)
"$here/services/postgres.sh" status >/dev/null 2>&1 || started+=(postgres)
cleanup() {
  for s in "${started[@]}"; do "$here/services/$s.sh" down || true; done
}
trap cleanup EXIT
"$here/services/services.sh" up
"$OBF_ROOT/.venv/bin/onboardflow" demo "$@"
