# Settings of the local Flink session cluster and the Beam pieces around it.
# Source it (flink.sh and jobserver.sh do); every value can be overridden from
# the environment or the make command line (`make flink-up FLINK_REST_PORT=18081`).
# Shared settings (OBF_RUN_DIR, OBF_CACHE_DIR, BEAM_VERSION, log/die/wait_for)
# come from runners/services/env.sh.
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../services" && pwd)/env.sh"

# Flink's runtime comes from PyPI's apache-flink wheel (bin/ scripts, and lib/
# jars through apache-flink-libraries). Its Python pins (apache-beam<=2.61,
# numpy, pyarrow) would hold the project's Beam back, so it lives in its own
# virtualenv in the cache, never in .venv.
export FLINK_VERSION="${FLINK_VERSION:-2.2.1}"
export FLINK_PYTHON="${FLINK_PYTHON:-python3.11}"
export FLINK_VENV="${FLINK_VENV:-$OBF_CACHE_DIR/flink-venv}"
# Flink's Kafka connector for Flink 2.2 (Maven: runners/flink/connectors/pom.xml).
export FLINK_KAFKA_CONNECTOR="${FLINK_KAFKA_CONNECTOR:-5.0.0-2.2}"
export FLINK_CONNECTORS_DIR="${FLINK_CONNECTORS_DIR:-$OBF_CACHE_DIR/flink-connectors}"

export FLINK_HOST="${FLINK_HOST:-127.0.0.1}"
# The REST API and web UI; also what `--flink_master` points at.
export FLINK_REST_PORT="${FLINK_REST_PORT:-8081}"
export FLINK_RPC_PORT="${FLINK_RPC_PORT:-6123}"
# Slots of the one TaskManager: the Beam pipeline at parallelism 2 takes 2
# (Beam puts all its operators in one slot-sharing group), the rest leave room
# for a second job (a savepoint-restored run, or the cluster test's job).
export FLINK_TASK_SLOTS="${FLINK_TASK_SLOTS:-4}"
# TaskManagers to start. The native job runs Python inside the TaskManager's
# JVM (thread mode): one TaskManager is one GIL, so Python parallelism takes
# TaskManagers, e.g. FLINK_TASKMANAGERS=2 FLINK_TASK_SLOTS=2 (docs/flink.md).
export FLINK_TASKMANAGERS="${FLINK_TASKMANAGERS:-1}"
export FLINK_PARALLELISM="${FLINK_PARALLELISM:-2}"
export FLINK_JM_MEMORY="${FLINK_JM_MEMORY:-1024m}"
export FLINK_TM_MEMORY="${FLINK_TM_MEMORY:-2560m}"
# rocksdb keeps keyed state off-heap and checkpoints incrementally (what
# production uses); hashmap keeps it on the JVM heap (faster, bounded by heap).
export FLINK_STATE_BACKEND="${FLINK_STATE_BACKEND:-rocksdb}"
export FLINK_CHECKPOINT_DIR="${FLINK_CHECKPOINT_DIR:-$OBF_RUN_DIR/flink/checkpoints}"
export FLINK_SAVEPOINT_DIR="${FLINK_SAVEPOINT_DIR:-$OBF_RUN_DIR/flink/savepoints}"
# Prometheus scrape ports of the JobManager and the TaskManagers (one each, the first free).
export FLINK_PROMETHEUS_PORTS="${FLINK_PROMETHEUS_PORTS:-9249-9252}"

# The Python SDK harness as a worker pool (environment_type=EXTERNAL), from
# the project's own .venv (Beam $BEAM_VERSION).
export BEAM_WORKER_POOL_PORT="${BEAM_WORKER_POOL_PORT:-50000}"
# The Beam Flink job server (beam-runners-flink-2.2-job-server): its job API port.
export BEAM_FLINK_MINOR="${BEAM_FLINK_MINOR:-2.2}"
export BEAM_JOB_SERVER_PORT="${BEAM_JOB_SERVER_PORT:-8099}"
export BEAM_ARTIFACT_PORT="${BEAM_ARTIFACT_PORT:-8098}"
export BEAM_EXPANSION_PORT="${BEAM_EXPANSION_PORT:-8097}"
export FLINK_JOB_SERVER_JAR="${FLINK_JOB_SERVER_JAR:-}"
