#!/usr/bin/env bash
# The virtualenv of the benchmark's Quix Streams peer (tests/benchmarks/quix_app.py):
# quixstreams (tests/benchmarks/quix-requirements.txt) and onboardflow, editable
# from this checkout, in $BENCH_QUIX_VENV (default $OBF_CACHE_DIR/bench-quix-venv),
# apart from .venv. Only PyPI is needed. `make bench-quix-install` runs it.
#
#   quix_venv.sh install   create or update it; a no-op when nothing changed
#   quix_venv.sh python    print its interpreter (bench_engines.py --quix-python)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../../runners/services/env.sh"

venv="${BENCH_QUIX_VENV:-$OBF_CACHE_DIR/bench-quix-venv}"
requirements="$here/quix-requirements.txt"

install() {
  local want have
  want="$(sha256sum <"$requirements" | cut -c1-16)"
  have="$(cat "$venv/.installed-requirements" 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    local python="${BENCH_QUIX_PYTHON:-python3.11}"
    command -v "$python" >/dev/null || die "$python not found (onboardflow needs CPython 3.11)"
    log "bench: installing Quix Streams ($(grep -v '^#' "$requirements" | xargs)) into $venv"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -r "$requirements" >&2
    echo "$want" >"$venv/.installed-requirements"
    rm -f "$venv/.installed-onboardflow"  # the new pins may have moved onboardflow's dependencies
  fi
  install_onboardflow_into "$venv" "$requirements" "onboardflow.pipelines.flink.store, quixstreams"
}

case "${1:-}" in
  install) install ;;
  python) echo "$venv/bin/python" ;;
  *) echo "usage: $0 install|python" >&2; exit 2 ;;
esac
