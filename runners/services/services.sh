#!/usr/bin/env bash
# All local services onboardflow needs: Kafka (KRaft), Redis, PostgreSQL.
#   services.sh up       idempotent: start what is not running, reuse what is, wait until healthy
#   services.sh down     stop what these scripts started (reused servers are left alone)
#   services.sh status
#   services.sh secure-up | secure-down | secure-status
#                        Kafka (SASL_SSL), Redis and PostgreSQL with TLS and authentication on
#                        their own ports (KAFKA_TLS_PORT, REDIS_TLS_PORT, PG_TLS_PORT), next to
#                        the plaintext ones; `up` and `status` include them when OBF_SECURITY=tls
#                        (docs/security.md); OBF_SECURE_SERVICES picks a subset ("kafka redis postgres")
# Ports, data dirs and the run folder come from env.sh (override by environment).
# `up` writes the endpoints to $OBF_RUN_DIR/services.env (the CLI's defaults);
# `secure-up` writes the secured ones to $OBF_RUN_DIR/services.secure.env.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
source "$here/env.sh"

case "$OBF_SECURITY" in
  off|tls) ;;
  *) die "OBF_SECURITY=$OBF_SECURITY: use 'off' (plaintext, the default) or 'tls'" ;;
esac

secured() { [[ " $OBF_SECURE_SERVICES " == *" $1 "* ]]; }

for _svc in $OBF_SECURE_SERVICES; do
  case "$_svc" in kafka|redis|postgres) ;; *) die "OBF_SECURE_SERVICES: unknown service '$_svc' (kafka redis postgres)" ;; esac
done

secure_up() {
  mkdir -p "$OBF_RUN_DIR"
  local svc
  for svc in kafka redis postgres; do if secured $svc; then "$here/$svc.sh" secure-up; fi; done
  local ca="$OBF_TLS_DIR/ca.crt" s="$OBF_SECRETS_DIR"
  local pg="$PG_HOST:$PG_TLS_PORT/$PG_DATABASE?sslmode=verify-full&sslrootcert=$ca&passfile=$s/pgpass"
  local kafka="$KAFKA_HOST:$KAFKA_TLS_PORT?ssl_cafile=$ca&password_file=$s"
  # URLs name the password files; no secret is written here. Quoted: the URLs hold '&'.
  {
    cat <<ENV
# written by services.sh secure-up ($(date -u +%Y-%m-%dT%H:%M:%SZ)): the TLS + authenticated
# endpoints (docs/security.md). Use them with: set -a; . $OBF_RUN_DIR/services.secure.env; set +a
ENV
    if secured kafka; then cat <<ENV
OBF_KAFKA_BOOTSTRAP='sasl_ssl://$KAFKA_PIPELINE_USER@$kafka/kafka-pipeline.password'
OBF_KAFKA_APP_BOOTSTRAP='sasl_ssl://$KAFKA_APP_USER@$kafka/kafka-app.password'
OBF_KAFKA_PRODUCER_BOOTSTRAP='sasl_ssl://$KAFKA_PRODUCER_USER@$kafka/kafka-producer.password'
ENV
    else echo "OBF_KAFKA_BOOTSTRAP='$KAFKA_HOST:$KAFKA_PORT'"; fi
    if secured redis; then cat <<ENV
OBF_REDIS_URL='rediss://$REDIS_PIPELINE_USER@$REDIS_HOST:$REDIS_TLS_PORT/0?ssl_ca_certs=$ca&password_file=$s/redis-pipeline.password'
OBF_REDIS_APP_URL='rediss://$REDIS_APP_USER@$REDIS_HOST:$REDIS_TLS_PORT/0?ssl_ca_certs=$ca&password_file=$s/redis-app.password'
ENV
    fi
    if secured postgres; then cat <<ENV
OBF_WAREHOUSE_DSN='postgresql://$PG_PIPELINE_ROLE@$pg'
OBF_WAREHOUSE_OWNER_DSN='postgresql://$PG_OWNER_ROLE@$pg'
OBF_WAREHOUSE_READER_DSN='postgresql://$PG_READER_ROLE@$pg'
OBF_WAREHOUSE_PIPELINE_ROLE='$PG_PIPELINE_ROLE'
OBF_WAREHOUSE_READER_ROLE='$PG_READER_ROLE'
ENV
    fi
  } >"$OBF_RUN_DIR/services.secure.env"
  log "secure services up; endpoints in $OBF_RUN_DIR/services.secure.env"
}

secure_down() {
  "$here/kafka.sh" secure-down
  "$here/redis.sh" secure-down
  "$here/postgres.sh" secure-down
  rm -f "$OBF_RUN_DIR/services.secure.env"
}

secure_status() {
  local rc=0 svc
  for svc in kafka redis postgres; do if secured $svc; then "$here/$svc.sh" secure-status || rc=1; fi; done
  return $rc
}

case "${1:-}" in
  up)
    mkdir -p "$OBF_RUN_DIR"
    "$here/kafka.sh" up
    "$here/kafka.sh" topics
    "$here/redis.sh" up
    "$here/postgres.sh" up
    # The endpoints just started, for every `onboardflow` command
    # (runners/settings.py reads them unless the environment says otherwise).
    cat >"$OBF_RUN_DIR/services.env" <<EOF
# written by services.sh up ($(date -u +%Y-%m-%dT%H:%M:%SZ)); read by runners/settings.py
OBF_KAFKA_BOOTSTRAP=$KAFKA_HOST:$KAFKA_PORT
OBF_REDIS_URL=redis://$REDIS_HOST:$REDIS_PORT/0
OBF_WAREHOUSE_DSN=postgresql://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DATABASE
EOF
    log "services up; logs in $OBF_RUN_DIR, endpoints in $OBF_RUN_DIR/services.env"
    if [ "$OBF_SECURITY" = tls ]; then secure_up; fi
    ;;
  down)
    "$here/kafka.sh" down
    "$here/redis.sh" down
    "$here/postgres.sh" down
    rm -f "$OBF_RUN_DIR/services.env"
    secure_down
    ;;
  status)
    rc=0
    "$here/kafka.sh" status || rc=1
    "$here/redis.sh" status || rc=1
    "$here/postgres.sh" status || rc=1
    if [ "$OBF_SECURITY" = tls ]; then secure_status || rc=1; fi
    exit $rc
    ;;
  secure-up) secure_up ;;
  secure-down) secure_down ;;
  secure-status) secure_status ;;
  *) echo "usage: $0 up|down|status|secure-up|secure-down|secure-status" >&2; exit 2 ;;
esac
