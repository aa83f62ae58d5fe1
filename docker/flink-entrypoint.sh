#!/usr/bin/env bash
# Entry point of docker/Dockerfile.flink: jobmanager | taskmanager | client ARGS...
# FLINK_PROPERTIES (YAML lines) is appended to the config, as the official image does.
set -euo pipefail
export FLINK_CONF_DIR=/opt/flink-conf
mkdir -p "$FLINK_CONF_DIR"
cp "$FLINK_HOME"/conf/log4j*.properties "$FLINK_CONF_DIR/"
{
  echo "python.executable: $(command -v python)"
  echo "python.client.executable: $(command -v python)"
  echo "python.execution-mode: thread"
  printf '%s\n' "${FLINK_PROPERTIES:-}"
} >"$FLINK_CONF_DIR/config.yaml"
case "${1:-}" in
  jobmanager) exec "$FLINK_HOME/bin/jobmanager.sh" start-foreground ;;
  taskmanager) exec "$FLINK_HOME/bin/taskmanager.sh" start-foreground ;;
  client) shift; exec "$FLINK_HOME/bin/flink" "$@" ;;
  *) exec "$@" ;;
esac
