# Shared settings for the local services. Source it; every value can be
# overridden from the environment (or `make services-up KAFKA_PORT=19092`).
#
#   OBF_RUN_DIR    logs, pid files and data dirs of the running services
#   OBF_CACHE_DIR  downloads kept between runs (Kafka jars, Prism, Flink)
_obf_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export OBF_ROOT="${OBF_ROOT:-$_obf_root}"
export OBF_RUN_DIR="${OBF_RUN_DIR:-$OBF_ROOT/.run}"
export OBF_CACHE_DIR="${OBF_CACHE_DIR:-$OBF_ROOT/.cache}"

export KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
export KAFKA_HOST="${KAFKA_HOST:-127.0.0.1}"
export KAFKA_PORT="${KAFKA_PORT:-9092}"
# The controller listens next to the broker unless told otherwise, so a second
# broker (`make services-up KAFKA_PORT=19092`) does not collide with the first.
export KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"
# topic:partitions pairs created by `kafka.sh topics`.
export KAFKA_TOPICS="${KAFKA_TOPICS:-onboarding.events:4 onboarding.events.dlq:2 onboarding.segment-changes:4 onboarding.model-events:1 onboarding.erasures:1}"

export REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
export REDIS_PORT="${REDIS_PORT:-6379}"

export PG_HOST="${PG_HOST:-127.0.0.1}"
export PG_PORT="${PG_PORT:-5432}"
export PG_USER="${PG_USER:-onboardflow}"
export PG_PASSWORD="${PG_PASSWORD:-onboardflow}"
export PG_DATABASE="${PG_DATABASE:-onboardflow}"

# Secure services (docs/security.md): OBF_SECURITY=tls makes `services.sh up`
# also start Kafka, Redis and PostgreSQL with TLS and authentication, on their own
# ports, next to the plaintext ones; the endpoints go to $OBF_RUN_DIR/services.secure.env.
export OBF_SECURITY="${OBF_SECURITY:-off}"
export OBF_TLS_DIR="${OBF_TLS_DIR:-$OBF_RUN_DIR/tls}"
export OBF_SECRETS_DIR="${OBF_SECRETS_DIR:-$OBF_RUN_DIR/secrets}"
# The secure services `secure-up` starts (a subset, e.g. for a test: "kafka").
export OBF_SECURE_SERVICES="${OBF_SECURE_SERVICES:-kafka redis postgres}"
export REDIS_TLS_PORT="${REDIS_TLS_PORT:-6380}"
# Client certificates: "optional" verifies one when presented, "yes" requires one.
export REDIS_TLS_AUTH_CLIENTS="${REDIS_TLS_AUTH_CLIENTS:-optional}"
# The key prefixes (space-separated) the ACL users may touch: the deployment's,
# derived as runners/settings.py does (OBF_REDIS_KEY_PREFIX, else `obf` for the
# default deployment and the deployment's name for any other).
_obf_prefix=obf
if [ -n "${OBF_DEPLOYMENT:-}" ] && [ "$OBF_DEPLOYMENT" != onboarding ]; then _obf_prefix="$OBF_DEPLOYMENT"; fi
export REDIS_ACL_PREFIX="${REDIS_ACL_PREFIX:-${OBF_REDIS_KEY_PREFIX:-$_obf_prefix}}"
export REDIS_PIPELINE_USER="${REDIS_PIPELINE_USER:-onboardflow-pipeline}"
export REDIS_APP_USER="${REDIS_APP_USER:-onboardflow-app}"
export REDIS_ADMIN_USER="${REDIS_ADMIN_USER:-onboardflow-admin}"
# The secure Kafka broker (SASL_SSL, SCRAM-SHA-512, ACLs): its own ports and data.
export KAFKA_TLS_PORT="${KAFKA_TLS_PORT:-9094}"
export KAFKA_TLS_CONTROLLER_PORT="${KAFKA_TLS_CONTROLLER_PORT:-$((KAFKA_TLS_PORT + 1))}"
# The topic prefix the pipeline's ACLs cover: the deployment's (runners/settings.py).
export KAFKA_ACL_PREFIX="${KAFKA_ACL_PREFIX:-${OBF_DEPLOYMENT:-onboarding}.}"
export KAFKA_PIPELINE_USER="${KAFKA_PIPELINE_USER:-onboardflow-pipeline}"
export KAFKA_APP_USER="${KAFKA_APP_USER:-onboardflow-app}"
export KAFKA_PRODUCER_USER="${KAFKA_PRODUCER_USER:-onboardflow-producer}"
export KAFKA_ADMIN_USER="${KAFKA_ADMIN_USER:-onboardflow-admin}"
# Consumer-group prefixes: the pipeline's groups (onboardflow, onboardflow-<deployment>) and the apps'.
export KAFKA_PIPELINE_GROUP_PREFIX="${KAFKA_PIPELINE_GROUP_PREFIX:-onboardflow}"
export KAFKA_APP_GROUP_PREFIX="${KAFKA_APP_GROUP_PREFIX:-onboardflow-app}"
export PG_TLS_PORT="${PG_TLS_PORT:-5433}"
export PG_OWNER_ROLE="${PG_OWNER_ROLE:-onboardflow_owner}"
export PG_PIPELINE_ROLE="${PG_PIPELINE_ROLE:-onboardflow_pipeline}"
export PG_READER_ROLE="${PG_READER_ROLE:-onboardflow_reader}"

export BEAM_VERSION="${BEAM_VERSION:-2.77.0}"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local what="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || { log "$what not ready after ${secs}s"; return 1; }
    sleep 0.5
  done
}

# install_onboardflow_into VENV CONSTRAINTS MODULE: onboardflow, editable from
# this checkout ($OBF_ROOT), into the virtualenv VENV under the pins of the
# file CONSTRAINTS, then check that MODULE imports there. Redone only when
# pyproject.toml or the constraints change, or when another checkout shares
# this cache (CI clones link .cache): VENV must import this checkout's code.
# Used by runners/flink/flink.sh and tests/benchmarks/quix_venv.sh.
install_onboardflow_into() {
  local venv="$1" constraints="$2" module="$3" want have
  want="$( (cat "$OBF_ROOT/pyproject.toml" "$constraints"; echo "$OBF_ROOT") | sha256sum | cut -c1-16)"
  have="$(cat "$venv/.installed-onboardflow" 2>/dev/null || true)"
  [ "$want" = "$have" ] && return 0
  log "installing onboardflow (editable, $OBF_ROOT) into $venv"
  "$venv/bin/python" -m pip install -q -c "$constraints" -e "$OBF_ROOT" >&2
  "$venv/bin/python" -c "import $module" || die "$module does not import in $venv"
  echo "$want" >"$venv/.installed-onboardflow"
}

# apt_install PKG...: install Debian packages that are missing (root only).
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
