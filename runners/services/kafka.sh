#!/usr/bin/env bash
# A single Apache Kafka broker in KRaft mode (combined broker + controller),
# run from Kafka's own jars resolved with Maven (kafka/pom.xml). No tarball,
# no Docker.
#
#   kafka.sh fetch    resolve the jars into $OBF_CACHE_DIR/kafka-$KAFKA_VERSION
#   kafka.sh up       format storage (first time) and start; reuse a listening broker
#   kafka.sh topics   create $KAFKA_TOPICS (idempotent)
#   kafka.sh down     stop the broker this script started
#   kafka.sh status
#   kafka.sh tool CLASS ARGS...   run a Kafka tool class, e.g.
#       kafka.sh tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --describe --all-groups
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

home="$OBF_CACHE_DIR/kafka-$KAFKA_VERSION"
libs="$home/libs"
run="$OBF_RUN_DIR/kafka"
pidfile="$run/kafka.pid"
bootstrap="$KAFKA_HOST:$KAFKA_PORT"

fetch() {
  [ -f "$home/.complete" ] && return 0
  command -v mvn >/dev/null || apt_install maven
  log "resolving Kafka $KAFKA_VERSION jars with Maven"
  rm -rf "$libs"; mkdir -p "$libs"
  mvn -q -B -f "$OBF_ROOT/runners/services/kafka/pom.xml" \
      -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DoutputDirectory="$libs" -DincludeScope=runtime >&2
  touch "$home/.complete"
}

java_run() {  # java_run MAIN ARGS...: a Kafka class on the cached classpath
  java -Dlog4j2.configurationFile="$run/log4j2-tools.properties" \
       -cp "$libs/*" "$@"
}

write_config() {
  mkdir -p "$run/data"
  cat > "$run/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$run/data
num.partitions=4
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
PROPS
  cat > "$run/log4j2.properties" <<PROPS
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $run/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.org.name = org.apache.kafka
logger.org.level = WARN
PROPS
  cat > "$run/log4j2-tools.properties" <<PROPS
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = %p %m%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
PROPS
}

broker_ready() {
  java_run org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" --list >/dev/null 2>&1
}

up() {
  if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
    log "Kafka: reusing the broker already listening on $bootstrap"
    fetch; mkdir -p "$run"; [ -f "$run/log4j2-tools.properties" ] || write_config
    return 0
  fi
  fetch
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  write_config
  if [ ! -f "$run/data/meta.properties" ]; then
    local cluster_id; cluster_id="$(java_run kafka.tools.StorageTool random-uuid)"
    log "Kafka: formatting KRaft storage (cluster $cluster_id)"
    java_run kafka.tools.StorageTool format -t "$cluster_id" -c "$run/server.properties" >"$run/format.log" 2>&1 \
      || { cat "$run/format.log" >&2; die "Kafka storage format failed"; }
  fi
  log "Kafka: starting broker on $bootstrap (logs: $run/server.log)"
  nohup java $KAFKA_HEAP_OPTS -XX:+UseG1GC -Djava.awt.headless=true \
       -Dkafka.logs.dir="$run" -Dlog4j2.configurationFile="$run/log4j2.properties" \
       -cp "$libs/*" kafka.Kafka "$run/server.properties" >"$run/kafka.out" 2>&1 &
  echo $! >"$pidfile"
  wait_for "Kafka port" 90 port_open "$KAFKA_HOST" "$KAFKA_PORT" || { tail -30 "$run/kafka.out" >&2; die "Kafka did not start"; }
  wait_for "Kafka metadata" 90 broker_ready || die "Kafka does not answer metadata requests"
  log "Kafka: ready"
}

topics() {
  for spec in $KAFKA_TOPICS; do
    local name="${spec%%:*}" parts="${spec##*:}"
    java_run org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" \
      --create --if-not-exists --topic "$name" --partitions "$parts" --replication-factor 1 >/dev/null
  done
  log "Kafka: topics ready: $KAFKA_TOPICS"
}

down() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    local pid; pid="$(cat "$pidfile")"
    log "Kafka: stopping broker (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

status() {
  if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then echo "kafka: up ($bootstrap)"; else echo "kafka: down"; return 1; fi
}

case "${1:-}" in
  fetch) fetch ;;
  up) up ;;
  topics) topics ;;
  down) down ;;
  status) status ;;
  tool) shift; fetch; java_run "$@" ;;
  *) echo "usage: $0 fetch|up|topics|down|status|tool CLASS ARGS..." >&2; exit 2 ;;
esac
