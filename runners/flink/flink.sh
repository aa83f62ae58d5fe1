#!/usr/bin/env bash
# A Flink $FLINK_VERSION standalone session cluster on this machine: one
# JobManager and one TaskManager ($FLINK_TASK_SLOTS slots), run by Flink's own
# bin/ scripts from PyPI's apache-flink wheel in its own virtualenv. No
# tarball, no Docker. Also the Beam Python SDK worker pool that Flink's Beam
# job server hands work to (--environment_type=EXTERNAL).
#
#   flink.sh install          the Flink virtualenv ($FLINK_VENV) with onboardflow
#                             in it, and the Kafka connector jar; once
#   flink.sh up               idempotent: start what is not running, wait until healthy
#   flink.sh down             stop the JobManager/TaskManager this script started
#   flink.sh status           one line: up (taskmanagers, slots) or down
#   flink.sh health           exit 0 when /overview shows >= 1 TaskManager and
#                             >= max(2, FLINK_PARALLELISM) slots
#   flink.sh home             print FLINK_HOME (site-packages/pyflink)
#   flink.sh cli ARGS...      Flink's `flink` CLI against this cluster, e.g.
#                             flink.sh cli list;  flink.sh cli run -py job.py
#   flink.sh worker-pool-up | worker-pool-down | worker-pool-status
#                             the Beam SDK worker pool on $BEAM_WORKER_POOL_PORT
#
# Logs, pid files, the rendered config.yaml, checkpoints and savepoints go to
# $OBF_RUN_DIR/flink (default .run/flink).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"

export FLINK_RUN_DIR="$OBF_RUN_DIR/flink"
stamp="$FLINK_VENV/.installed-apache-flink-$FLINK_VERSION"
rest="http://$FLINK_HOST:$FLINK_REST_PORT"
pool_pid="$FLINK_RUN_DIR/worker-pool.pid"

install() {
  install_runtime
  install_onboardflow
  install_connectors
}

# The Flink runtime (apache-flink and its pins) in its own virtualenv, once.
install_runtime() {
  [ -f "$stamp" ] && return 0
  command -v "$FLINK_PYTHON" >/dev/null || die "$FLINK_PYTHON not found (the Flink wheel is built for CPython 3.11)"
  log "Flink: installing apache-flink $FLINK_VERSION into $FLINK_VENV (its own virtualenv)"
  [ -x "$FLINK_VENV/bin/python" ] || "$FLINK_PYTHON" -m venv "$FLINK_VENV"
  "$FLINK_VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$FLINK_VENV/bin/python" -m pip install -q -r "$here/requirements.txt" >&2
  [ -x "$(flink_home)/bin/jobmanager.sh" ] || die "apache-flink installed but bin/jobmanager.sh is missing under $(flink_home)"
  touch "$stamp"
}

# onboardflow's engine-free core and its Flink job (pipelines/flink/), editable
# from this checkout, under the Flink virtualenv's pins (numpy < 2.2, so
# river <= 0.23: runners/flink/constraints.txt); redone only when needed
# (install_onboardflow_into, runners/services/env.sh): the TaskManagers must
# import this checkout's code.
install_onboardflow() {
  install_onboardflow_into "$FLINK_VENV" "$here/constraints.txt" onboardflow.pipelines.flink.job
}

# Flink's Kafka connector (runners/flink/connectors/pom.xml) from Maven, once,
# and its enumerator patched for FLINK-31006 (connectors/FLINK-31006.patch;
# docs/flink.md "Savepoints"): without it a bounded read restored from a
# savepoint never finishes. The patched classes go in a jar of their own that
# sorts before the connector in lib/, so they are the ones loaded.
install_connectors() {
  local jar="$FLINK_CONNECTORS_DIR/flink-sql-connector-kafka-$FLINK_KAFKA_CONNECTOR.jar"
  local fix="$FLINK_CONNECTORS_DIR/flink-connector-kafka-$FLINK_KAFKA_CONNECTOR-flink-31006.jar"
  [ -s "$jar" ] && [ -s "$fix" ] && return 0
  command -v mvn >/dev/null || apt_install maven
  command -v javac >/dev/null || apt_install openjdk-17-jdk-headless
  command -v patch >/dev/null || apt_install patch
  log "Flink: resolving flink-sql-connector-kafka $FLINK_KAFKA_CONNECTOR with Maven into $FLINK_CONNECTORS_DIR"
  mkdir -p "$FLINK_CONNECTORS_DIR"
  mvn -q -B -f "$here/connectors/pom.xml" dependency:copy-dependencies \
      -Dflink.kafka.connector.version="$FLINK_KAFKA_CONNECTOR" \
      -DoutputDirectory="$FLINK_CONNECTORS_DIR" -DincludeScope=runtime >&2 \
    || die "Maven could not resolve org.apache.flink:flink-sql-connector-kafka:$FLINK_KAFKA_CONNECTOR"
  local work; work="$(mktemp -d)"
  mvn -q -B dependency:copy -Dartifact="org.apache.flink:flink-connector-kafka:$FLINK_KAFKA_CONNECTOR:jar:sources" \
      -DoutputDirectory="$work" >&2 || die "Maven could not resolve the Kafka connector's sources"
  local src=org/apache/flink/connector/kafka/source/enumerator/KafkaSourceEnumerator.java
  (cd "$work" && unzip -q -o ./*-sources.jar "$src" \
     && patch -s "$src" <"$here/connectors/FLINK-31006.patch" \
     && sed -i 's/import org.apache.kafka\./import org.apache.flink.kafka.shaded.org.apache.kafka./' "$src" \
     && mkdir classes \
     && javac -nowarn -d classes -cp "$jar:$(ls "$(flink_home)"/lib/*.jar | tr '\n' ':')" "$src" \
     && jar cf "$fix" -C classes .) >&2 || die "could not build the patched Kafka source enumerator"
  rm -rf "$work"
}

flink_home() {
  local d
  for d in "$FLINK_VENV"/lib/python3*/site-packages/pyflink; do
    [ -d "$d" ] && { echo "$d"; return 0; }
  done
  return 1
}

# Flink's scripts find config, logs and pid files through these variables.
flink_env() {
  # Empty when not installed (then there is nothing of ours to stop either).
  export FLINK_HOME; FLINK_HOME="$(flink_home || true)"
  export FLINK_CONF_DIR="$FLINK_RUN_DIR/conf"
  export FLINK_LOG_DIR="$FLINK_RUN_DIR/log"
  export FLINK_PID_DIR="$FLINK_RUN_DIR"
  # Names the pid and log files (Flink's default, $USER, may be unset here).
  export FLINK_IDENT_STRING="onboardflow"
  export FLINK_LIB_DIR="$FLINK_RUN_DIR/lib"
}

# The cluster's lib/: the distribution's jars, plus flink-python (opt/) and the
# Kafka connector. flink-python must sit in the parent classloader: in thread
# mode it loads libpython through pemja once per JVM, and pemja cannot load it
# again from a second job's (or a restarted job's) user-code classloader on
# Java 17 (FLINK-37727, pemja#100). The connector there too keeps every job
# from loading its own copy of the Kafka client.
link_lib() {
  rm -rf "$FLINK_LIB_DIR"
  mkdir -p "$FLINK_LIB_DIR"
  ln -s "$FLINK_HOME"/lib/*.jar "$FLINK_LIB_DIR/"
  ln -s "$FLINK_HOME"/opt/flink-python-*.jar "$FLINK_LIB_DIR/"
  ln -s "$FLINK_CONNECTORS_DIR"/*.jar "$FLINK_LIB_DIR/"
}

render_config() {
  flink_env
  mkdir -p "$FLINK_CONF_DIR" "$FLINK_LOG_DIR" "$FLINK_RUN_DIR/tmp" "$FLINK_CHECKPOINT_DIR" "$FLINK_SAVEPOINT_DIR"
  envsubst '${FLINK_HOST} ${FLINK_RPC_PORT} ${FLINK_JM_MEMORY} ${FLINK_TASK_SLOTS} ${FLINK_TM_MEMORY}
            ${FLINK_PARALLELISM} ${FLINK_REST_PORT} ${FLINK_STATE_BACKEND} ${FLINK_CHECKPOINT_DIR}
            ${FLINK_SAVEPOINT_DIR} ${FLINK_RUN_DIR} ${FLINK_VENV} ${FLINK_PROMETHEUS_PORTS}' \
    <"$here/config.yaml.template" >"$FLINK_CONF_DIR/config.yaml"
  # Flink's own log4j settings (rolling files in FLINK_LOG_DIR); masters and
  # workers name this host only (start-cluster.sh and its ssh are not used).
  cp "$FLINK_HOME"/conf/log4j*.properties "$FLINK_CONF_DIR/"
  link_lib
  echo "$FLINK_HOST:$FLINK_REST_PORT" >"$FLINK_CONF_DIR/masters"
  echo "$FLINK_HOST" >"$FLINK_CONF_DIR/workers"
}

# overview: the JSON of GET /overview, or nothing when no Flink answers.
overview() { curl -fsS --max-time 3 "$rest/overview" 2>/dev/null; }

# overview_field NAME: one integer field of /overview.
overview_field() {
  overview | "$FLINK_VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

min_slots() { echo $(( FLINK_PARALLELISM > 2 ? FLINK_PARALLELISM : 2 )); }

healthy() {
  local tms slots
  tms="$(overview_field taskmanagers 2>/dev/null)" || return 1
  slots="$(overview_field slots-total 2>/dev/null)" || return 1
  [ "${tms:-0}" -ge 1 ] && [ "${slots:-0}" -ge "$(min_slots)" ]
}

# ours DAEMON: true when the pid file of DAEMON (standalonesession or
# taskexecutor) names a live process, i.e. this script started it.
ours() {
  local f="$FLINK_RUN_DIR/flink-onboardflow-$1.pid"
  [ -s "$f" ] && kill -0 "$(tail -n 1 "$f")" 2>/dev/null
}

up() {
  install
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v curl >/dev/null || apt_install curl
  command -v envsubst >/dev/null || apt_install gettext-base
  flink_env
  if overview >/dev/null && ! ours standalonesession; then
    healthy || die "a Flink cluster not started by this script answers on $rest but is not healthy (needs >= 1 TaskManager, >= $(min_slots) slots)"
    log "Flink: reusing the cluster already answering on $rest"
    return 0
  fi
  if ! ours standalonesession; then
    port_open "$FLINK_HOST" "$FLINK_REST_PORT" && die "port $FLINK_REST_PORT is taken by something that is not Flink; set FLINK_REST_PORT"
    render_config
    log "Flink: starting JobManager, REST on $rest (logs: $FLINK_LOG_DIR)"
    "$FLINK_HOME/bin/jobmanager.sh" start >"$FLINK_RUN_DIR/jobmanager.out" 2>&1 \
      || { cat "$FLINK_RUN_DIR/jobmanager.out" >&2; die "JobManager did not start"; }
  fi
  wait_for "Flink REST API" 90 overview_ok || { tail -30 "$FLINK_LOG_DIR"/*standalonesession*.log >&2 || true; die "JobManager REST API not answering"; }
  local n
  for (( n = $(live_taskmanagers); n < FLINK_TASKMANAGERS; n++ )); do
    log "Flink: starting TaskManager $((n + 1))/$FLINK_TASKMANAGERS ($FLINK_TASK_SLOTS slots)"
    # Thread mode (python.execution-mode: thread) runs Python inside the
    # TaskManager's JVM and finds libpython through the `python` on PATH.
    PATH="$FLINK_VENV/bin:$PATH" "$FLINK_HOME/bin/taskmanager.sh" start >"$FLINK_RUN_DIR/taskmanager.out" 2>&1 \
      || { cat "$FLINK_RUN_DIR/taskmanager.out" >&2; die "TaskManager did not start"; }
  done
  wait_for "Flink TaskManager registration" 120 healthy \
    || { tail -30 "$FLINK_LOG_DIR"/*taskexecutor*.log >&2 || true; die "TaskManager did not register with the JobManager"; }
  log "Flink: ready ($(status_line))"
}

overview_ok() { overview >/dev/null; }

# How many TaskManagers this script started are alive (pid file lines).
live_taskmanagers() {
  local f="$FLINK_RUN_DIR/flink-onboardflow-taskexecutor.pid" n=0 p
  [ -s "$f" ] || { echo 0; return; }
  while read -r p; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done <"$f"
  echo "$n"
}

down() {
  flink_env
  # Flink's scripts stop exactly the pids in their pid files under
  # FLINK_PID_DIR, i.e. what `up` started; a reused cluster is left alone.
  if [ "$(live_taskmanagers)" -gt 0 ]; then log "Flink: stopping TaskManager(s)"; "$FLINK_HOME/bin/taskmanager.sh" stop-all >&2; fi
  if ours standalonesession; then log "Flink: stopping JobManager"; "$FLINK_HOME/bin/jobmanager.sh" stop >&2; fi
  rm -f "$FLINK_RUN_DIR"/flink-onboardflow-standalonesession.pid "$FLINK_RUN_DIR"/flink-onboardflow-taskexecutor.pid
}

status_line() {
  local json
  json="$(overview)" || { echo "flink: down ($rest)"; return 1; }
  echo "$json" | "$FLINK_VENV/bin/python" -c '
import json, sys
o = json.load(sys.stdin)
print("flink: up ({}, Flink {}, {} taskmanager(s), {} slots, {} free, {} job(s) running)".format(
    sys.argv[1], o["flink-version"], o["taskmanagers"], o["slots-total"], o["slots-available"], o["jobs-running"]))' "$rest"
}

status() {
  [ -f "$stamp" ] || { echo "flink: not installed (run: $0 install)"; return 1; }
  status_line
}

health() {
  [ -f "$stamp" ] || { echo "flink: not installed" >&2; return 1; }
  healthy || { echo "flink: unhealthy or down at $rest (needs >= 1 TaskManager, >= $(min_slots) slots)" >&2; return 1; }
  overview
  echo
}

cli() {
  install
  flink_env
  [ -f "$FLINK_CONF_DIR/config.yaml" ] || render_config
  # PyFlink jobs (`run -py`) are compiled by the Flink virtualenv's Python.
  PATH="$FLINK_VENV/bin:$PATH" "$FLINK_HOME/bin/flink" "$@"
}

# ---- Beam SDK worker pool -----------------------------------------------------
# The Python SDK harness of the project's Beam (from .venv), serving the
# BeamFnExternalWorkerPool API: the job server's EXTERNAL environment asks it
# for one SDK worker per Flink task. In production this is the sidecar
# container beside each TaskManager (docker/k8s/flinkdeployment.yaml).

worker_pool_up() {
  local py="$OBF_ROOT/.venv/bin/python"
  [ -x "$py" ] || die "$py not found: run make venv"
  if port_open 127.0.0.1 "$BEAM_WORKER_POOL_PORT"; then
    log "Beam worker pool: reusing what listens on 127.0.0.1:$BEAM_WORKER_POOL_PORT"; return 0
  fi
  mkdir -p "$FLINK_RUN_DIR"
  log "Beam worker pool: starting on 127.0.0.1:$BEAM_WORKER_POOL_PORT (Beam $BEAM_VERSION, logs: $FLINK_RUN_DIR/worker-pool.log)"
  # The pool starts each SDK worker as `python -c ...` from PATH: put the
  # project's .venv first, or workers start without Beam and onboardflow.
  (cd "$OBF_ROOT"
   PATH="$OBF_ROOT/.venv/bin:$PATH" nohup "$py" -m apache_beam.runners.worker.worker_pool_main \
       --service_port="$BEAM_WORKER_POOL_PORT" >"$FLINK_RUN_DIR/worker-pool.log" 2>&1 &
   echo $! >"$pool_pid")
  wait_for "Beam worker pool" 60 port_open 127.0.0.1 "$BEAM_WORKER_POOL_PORT" \
    || { tail -20 "$FLINK_RUN_DIR/worker-pool.log" >&2; die "Beam worker pool did not start"; }
  log "Beam worker pool: ready"
}

worker_pool_down() {
  if [ -f "$pool_pid" ] && kill -0 "$(cat "$pool_pid")" 2>/dev/null; then
    local pid; pid="$(cat "$pool_pid")"
    log "Beam worker pool: stopping (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pool_pid"
}

worker_pool_status() {
  if port_open 127.0.0.1 "$BEAM_WORKER_POOL_PORT"; then echo "beam worker pool: up (127.0.0.1:$BEAM_WORKER_POOL_PORT)"
  else echo "beam worker pool: down"; return 1; fi
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  health) health ;;
  home) install; flink_home ;;
  cli) shift; cli "$@" ;;
  worker-pool-up) worker_pool_up ;;
  worker-pool-down) worker_pool_down ;;
  worker-pool-status) worker_pool_status ;;
  *) echo "usage: $0 install|up|down|status|health|home|cli ARGS...|worker-pool-up|worker-pool-down|worker-pool-status" >&2; exit 2 ;;
esac
