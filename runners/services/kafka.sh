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
# The secure broker (docs/security.md): a second KRaft broker on $KAFKA_TLS_PORT
# with a SASL_SSL listener (SCRAM-SHA-512, server certificate of security.sh's CA),
# the StandardAuthorizer, SCRAM users and their ACLs; data and logs in $OBF_RUN_DIR/kafka-tls.
#   kafka.sh secure-up | secure-down | secure-status
#   kafka.sh secure-tool CLASS ARGS...   a tool as the admin user (--command-config added)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/security.sh"

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
  write_log4j
}

write_log4j() {  # the broker's log (to $run/server.log) and the tools' (WARN to stderr)
  mkdir -p "$run"
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

# ---- the secure broker -------------------------------------------------------

srun="$OBF_RUN_DIR/kafka-tls"
spidfile="$srun/kafka.pid"
sbootstrap="$KAFKA_HOST:$KAFKA_TLS_PORT"

# secure_java_run MAIN ARGS...: a Kafka tool as the admin user; the credentials
# are in $srun/admin.properties (0600), never on the command line.
secure_java_run() { java_run "$@" --command-config "$srun/admin.properties"; }

pw() { head -n1 "$(secret "$1")" | tr -d '\n'; }

# Every file written here that holds a password is 0600 under $srun (0700).
write_secure_config() {
  mkdir -p "$srun/data" && chmod 700 "$srun"
  local admin; admin="$(pw kafka-admin.password)"
  [ -f "$run/log4j2-tools.properties" ] || write_log4j
  cat "$OBF_TLS_DIR/server.key" "$OBF_TLS_DIR/server.crt" >"$srun/server.pem.new"
  chmod 600 "$srun/server.pem.new" && mv "$srun/server.pem.new" "$srun/server.pem"
  (umask 077; cat >"$srun/server.properties.new" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$KAFKA_HOST:$KAFKA_TLS_CONTROLLER_PORT
listeners=SASL_SSL://$KAFKA_HOST:$KAFKA_TLS_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_TLS_CONTROLLER_PORT
advertised.listeners=SASL_SSL://$KAFKA_HOST:$KAFKA_TLS_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="$KAFKA_ADMIN_USER" password="$admin" user_$KAFKA_ADMIN_USER="$admin";
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$KAFKA_ADMIN_USER" password="$admin";
ssl.keystore.type=PEM
ssl.keystore.location=$srun/server.pem
ssl.truststore.type=PEM
ssl.truststore.location=$OBF_TLS_DIR/ca.crt
ssl.client.auth=none
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:$KAFKA_ADMIN_USER
allow.everyone.if.no.acl.found=false
log.dirs=$srun/data
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
  cat >"$srun/admin.properties.new" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$KAFKA_ADMIN_USER" password="$admin";
ssl.truststore.type=PEM
ssl.truststore.location=$OBF_TLS_DIR/ca.crt
PROPS
  )
  mv "$srun/server.properties.new" "$srun/server.properties"
  mv "$srun/admin.properties.new" "$srun/admin.properties"
  sed "s#fileName = .*#fileName = $srun/server.log#" "$run/log4j2.properties" >"$srun/log4j2.properties"
}

secure_ready() {
  secure_java_run org.apache.kafka.tools.TopicCommand --bootstrap-server "$sbootstrap" --list >/dev/null 2>&1
}

# The SCRAM users, created in the metadata log at format time. The java
# launcher reads the tool's arguments from an @-file (0600, removed after), so
# the passwords are on no command line.
secure_format() {
  local cluster_id; cluster_id="$(java_run kafka.tools.StorageTool random-uuid)"
  log "Kafka (SASL_SSL): formatting KRaft storage (cluster $cluster_id) with SCRAM users"
  (umask 077; {
    echo "kafka.tools.StorageTool format -t $cluster_id -c $srun/server.properties"
    for who in admin pipeline app producer; do
      local user; user="$(user_of "$who")"
      echo "--add-scram SCRAM-SHA-512=[name=$user,password=$(pw "kafka-$who.password")]"
    done
  } >"$srun/format.args")
  local rc=0
  java -Dlog4j2.configurationFile="$run/log4j2-tools.properties" -cp "$libs/*" "@$srun/format.args" \
    >"$srun/format.log" 2>&1 || rc=$?
  rm -f "$srun/format.args"
  [ "$rc" -eq 0 ] || { cat "$srun/format.log" >&2; die "Kafka (SASL_SSL) storage format failed"; }
}

user_of() {
  case "$1" in
    admin) echo "$KAFKA_ADMIN_USER" ;; pipeline) echo "$KAFKA_PIPELINE_USER" ;; app) echo "$KAFKA_APP_USER" ;;
    producer) echo "$KAFKA_PRODUCER_USER" ;;
  esac
}

# Existing users get their password from the secret files again (rotation:
# delete a password file, run secure-up). The value goes through a 0600 file.
secure_sync_users() {
  local who user
  for who in pipeline app producer; do
    user="$(user_of "$who")"
    (umask 077; echo "SCRAM-SHA-512=[password=$(pw "kafka-$who.password")]" >"$srun/scram.properties")
    secure_java_run org.apache.kafka.tools.ConfigCommand --bootstrap-server "$sbootstrap" --alter \
      --entity-type users --entity-name "$user" --add-config-file "$srun/scram.properties" >/dev/null \
      || { rm -f "$srun/scram.properties"; die "Kafka (SASL_SSL): could not set the SCRAM credential of $user"; }
  done
  rm -f "$srun/scram.properties"
}

# acl PRINCIPAL_USER [--operation X ...] RESOURCES...: add allow ACLs (idempotent).
acl() {
  local user="$1"; shift
  secure_java_run org.apache.kafka.tools.AclCommand --bootstrap-server "$sbootstrap" --add \
    --allow-principal "User:$user" --allow-host '*' "$@" >/dev/null \
    || die "Kafka (SASL_SSL): could not add ACLs for $user ($*)"
}

# The pipeline: DESCRIBE/CREATE under the deployment's topic prefix, READ on
# the events and erasure-request topics, READ/WRITE on the topics it writes
# (the outbox relay reads them back after a crash), its consumer groups
# (prefix onboardflow); it may not write the events. The producer (the event
# sources: `onboardflow produce`, the demo's generator, whatever requests
# erasures): WRITE and DESCRIBE on the events and erasure-request topics, no
# READ. The app: READ on the segment-change topic and its own consumer groups.
secure_acls() {
  local p="$KAFKA_ACL_PREFIX" ops t
  [[ "$p" =~ ^[A-Za-z0-9_.-]+$ ]] || die "KAFKA_ACL_PREFIX: '$p' is not a topic prefix (letters, digits, _ . -)"
  local base="${p%.}" written=()
  for t in events.dlq segment-changes model-events; do written+=(--topic "$base.$t"); done
  acl "$KAFKA_PIPELINE_USER" --operation Describe --operation Create --operation DescribeConfigs \
    --resource-pattern-type prefixed --topic "$p"
  acl "$KAFKA_PIPELINE_USER" --operation Read --operation Describe --resource-pattern-type prefixed \
    --group "$KAFKA_PIPELINE_GROUP_PREFIX"
  acl "$KAFKA_PIPELINE_USER" --operation Read --topic "$base.events" --topic "$base.erasures" "${written[@]}"
  acl "$KAFKA_PIPELINE_USER" --operation Write "${written[@]}"
  acl "$KAFKA_PRODUCER_USER" --operation Write --operation Describe --topic "$base.events" --topic "$base.erasures"
  # A broker set up before the producer user existed let the pipeline write the events: take that back.
  secure_java_run org.apache.kafka.tools.AclCommand --bootstrap-server "$sbootstrap" --remove --force \
    --allow-principal "User:$KAFKA_PIPELINE_USER" --allow-host '*' --operation Write --topic "$base.events" >/dev/null \
    || die "Kafka (SASL_SSL): could not remove the pipeline's WRITE on $base.events"
  acl "$KAFKA_APP_USER" --operation Read --operation Describe --topic "$base.segment-changes"
  acl "$KAFKA_APP_USER" --operation Read --operation Describe --resource-pattern-type prefixed \
    --group "$KAFKA_APP_GROUP_PREFIX"
}

secure_topics() {
  local spec name parts
  for spec in $KAFKA_TOPICS; do
    name="${spec%%:*}" parts="${spec##*:}"
    secure_java_run org.apache.kafka.tools.TopicCommand --bootstrap-server "$sbootstrap" \
      --create --if-not-exists --topic "$name" --partitions "$parts" --replication-factor 1 >/dev/null
  done
}

secure_up() {
  fetch
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  tls_material
  mkdir -p "$run"
  write_secure_config
  if port_open "$KAFKA_HOST" "$KAFKA_TLS_PORT"; then
    wait_for "Kafka (SASL_SSL)" 60 secure_ready \
      || die "something listens on $sbootstrap but does not answer the admin user over SASL_SSL"
    log "Kafka (SASL_SSL): reusing the broker on $sbootstrap"
    secure_sync_users
  else
    local formatted=1
    [ -f "$srun/data/meta.properties" ] || { secure_format; formatted=0; }
    log "Kafka (SASL_SSL): starting broker on $sbootstrap (logs: $srun/server.log)"
    nohup java $KAFKA_HEAP_OPTS -XX:+UseG1GC -Djava.awt.headless=true \
         -Dkafka.logs.dir="$srun" -Dlog4j2.configurationFile="$srun/log4j2.properties" \
         -cp "$libs/*" kafka.Kafka "$srun/server.properties" >"$srun/kafka.out" 2>&1 &
    echo $! >"$spidfile"
    wait_for "Kafka (SASL_SSL) port" 90 port_open "$KAFKA_HOST" "$KAFKA_TLS_PORT" \
      || { tail -30 "$srun/kafka.out" >&2; die "Kafka (SASL_SSL) did not start"; }
    wait_for "Kafka (SASL_SSL) metadata" 90 secure_ready \
      || { tail -30 "$srun/server.log" >&2; die "Kafka (SASL_SSL) does not answer the admin user"; }
    [ "$formatted" -eq 0 ] || secure_sync_users
  fi
  secure_acls
  secure_topics
  log "Kafka (SASL_SSL): ready on $sbootstrap, users $KAFKA_PIPELINE_USER, $KAFKA_APP_USER, $KAFKA_PRODUCER_USER; topics $KAFKA_TOPICS"
}

secure_down() {
  if [ -f "$spidfile" ] && kill -0 "$(cat "$spidfile")" 2>/dev/null; then
    local pid; pid="$(cat "$spidfile")"
    log "Kafka (SASL_SSL): stopping broker (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$spidfile"
}

secure_status() {
  if port_open "$KAFKA_HOST" "$KAFKA_TLS_PORT"; then echo "kafka (SASL_SSL): up ($sbootstrap)"
  else echo "kafka (SASL_SSL): down"; return 1; fi
}

case "${1:-}" in
  fetch) fetch ;;
  up) up ;;
  topics) topics ;;
  down) down ;;
  status) status ;;
  tool) shift; fetch; java_run "$@" ;;
  secure-up) secure_up ;; secure-down) secure_down ;; secure-status) secure_status ;;
  secure-tool) shift; fetch; secure_java_run "$@" ;;
  *) echo "usage: $0 fetch|up|topics|down|status|tool CLASS ARGS...|secure-up|secure-down|secure-status|secure-tool CLASS ARGS..." >&2; exit 2 ;;
esac
