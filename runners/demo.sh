#!/usr/bin/env bash
# `make demo`: start the local services (if not running), then run the demo on
# them. The services stay up afterwards, so the commands the demo suggests
# (`onboardflow profile`, `models list`, `lag`, `make train`) find its data;
# `make services-down` stops them.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/services/env.sh"

"$here/services/services.sh" up
"${PY:-$OBF_ROOT/.venv/bin/python}" -m onboardflow.runners.cli demo "$@"
