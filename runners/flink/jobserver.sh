#!/usr/bin/env bash
# Beam's Flink job server jar (org.apache.beam:beam-runners-flink-$BEAM_FLINK_MINOR-job-server
# at $BEAM_VERSION), resolved with Maven into the jar cache and handed to the
# pipeline as --flink_job_server_jar. Beam's own downloader is never used.
#
#   jobserver.sh fetch   resolve the jar into $OBF_CACHE_DIR/beam-flink-jobserver (idempotent);
#                        with FLINK_JOB_SERVER_JAR=/path set, check that jar instead
#   jobserver.sh path    print the jar's path (fails, saying why, when there is none)
#
# When the Maven registry does not serve the artifact (the case on the
# project's own machines today, see docs/flink.md) fetch fails with a message
# naming the artifact and how to provide the jar.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"

artifact="org.apache.beam:beam-runners-flink-$BEAM_FLINK_MINOR-job-server:$BEAM_VERSION"
jar_dir="$OBF_CACHE_DIR/beam-flink-jobserver"
cached="$jar_dir/beam-runners-flink-$BEAM_FLINK_MINOR-job-server-$BEAM_VERSION.jar"
# The job server's entry point: proves a file is the job server, not any jar.
driver="org/apache/beam/runners/flink/FlinkJobServerDriver.class"

is_job_server_jar() {
  # unzip exits non-zero when the named member is not in the archive.
  [ -s "$1" ] && unzip -qq -l "$1" "$driver" >/dev/null 2>&1
}

check_override() {
  [ -f "$FLINK_JOB_SERVER_JAR" ] || die "FLINK_JOB_SERVER_JAR=$FLINK_JOB_SERVER_JAR: no such file"
  is_job_server_jar "$FLINK_JOB_SERVER_JAR" \
    || die "FLINK_JOB_SERVER_JAR=$FLINK_JOB_SERVER_JAR is not a Beam Flink job server jar (no $driver inside)"
}

fetch() {
  if [ -n "$FLINK_JOB_SERVER_JAR" ]; then check_override; log "Beam Flink job server: using $FLINK_JOB_SERVER_JAR"; return 0; fi
  if is_job_server_jar "$cached"; then return 0; fi
  command -v mvn >/dev/null || apt_install maven
  mkdir -p "$jar_dir" "$OBF_RUN_DIR/flink"
  local mvn_log="$OBF_RUN_DIR/flink/jobserver-mvn.log"
  log "Beam Flink job server: resolving $artifact with Maven"
  # -U: re-ask the registry even if an earlier miss is cached in ~/.m2.
  if ! mvn -B -U -f "$here/jobserver/pom.xml" dependency:copy \
        -Dbeam.version="$BEAM_VERSION" -Dbeam.flink.minor="$BEAM_FLINK_MINOR" \
        -Djobserver.dir="$jar_dir" >"$mvn_log" 2>&1; then
    local reason verdict
    reason="$(grep -o 'Could not \(find\|resolve\|transfer\) artifact.*' "$mvn_log" | head -1 | sed 's/ *-> \[Help.*//' || true)"
    if grep -q "Could not find artifact" "$mvn_log"; then
      verdict="This machine's Maven registry does not serve that artifact, so the onboarding
pipeline cannot be submitted to Flink from here."
    else
      verdict="Maven could not resolve it (registry unreachable or another error: see the log)."
    fi
    cat >&2 <<MSG
ERROR: the Beam Flink job server jar is not available.
  artifact: $artifact
  Maven:    ${reason:-see $mvn_log}
$verdict
Provide the jar yourself: copy beam-runners-flink-$BEAM_FLINK_MINOR-job-server-$BEAM_VERSION.jar
from a machine that can reach Maven Central, then either
  put it at  $cached
  or run     make flink-jobserver-jar FLINK_JOB_SERVER_JAR=/path/to/that.jar
             (same for make flink-demo; onboardflow run takes --flink_job_server_jar=/path).
Full Maven output: $mvn_log
MSG
    exit 1
  fi
  is_job_server_jar "$cached" || die "Maven succeeded but $cached is not a Beam Flink job server jar"
  log "Beam Flink job server: $cached"
}

path() {
  if [ -n "$FLINK_JOB_SERVER_JAR" ]; then check_override; echo "$FLINK_JOB_SERVER_JAR"; return 0; fi
  is_job_server_jar "$cached" || die "no Beam Flink job server jar at $cached: run make flink-jobserver-jar"
  echo "$cached"
}

command -v unzip >/dev/null || apt_install unzip
case "${1:-}" in
  fetch) fetch ;;
  path) path ;;
  *) echo "usage: $0 fetch|path" >&2; exit 2 ;;
esac
