"""The local Flink session cluster (runners/flink/flink.sh) runs real jobs and checkpoints.

These tests run a small PyFlink job (runners/flink/cluster_check_job.py), not
the onboarding pipeline: the Beam pipeline needs Beam's Flink job server jar,
which this machine's Maven registry does not serve (docs/flink.md). What they
pin is the cluster the pipeline will run on:

- the REST API reports a TaskManager with at least two slots;
- a job at parallelism 2 with keyed state runs to completion, completes
  periodic exactly-once checkpoints, and publishes each result exactly once;
- a job stopped with a savepoint halfway and resumed from it ends with the
  same output as an uninterrupted run: nothing lost, nothing counted twice.

More tests pin the Beam side of the Flink setup without Flink: Beam's SDK
worker pool (``WorkerPool``, the EXTERNAL environment the TaskManagers use)
runs a Beam pipeline's code in worker processes it starts itself, and the
onboarding pipeline run that way gives the same Redis profiles as with
in-process workers, both shown on Prism, Beam's local portable runner; and
`jobserver.sh fetch` either resolves a verified job server jar with Maven or
names the missing artifact.

The fixture starts the cluster with `flink.sh up` when it is not running (and
stops it again afterwards only in that case).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import apache_beam as beam
import pytest
import redis
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState
from apache_beam.testing.util import assert_that, equal_to

from onboardflow.runners.cli.produce import produce
from onboardflow.runners.cli.run import run
from onboardflow.runners.flink_job import FlinkRest
from onboardflow.runners.flink_runner import WorkerPool, is_job_server_jar
from onboardflow.runners.local import PRISM_NO_DYNAMIC_SPLITS, prism_location
from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
from onboardflow.tests.conftest import local_flink_cluster
from onboardflow.transforms.anonymize import SecretKey
from onboardflow.transforms.profile_store.encoding import decode_profile

pytestmark = [pytest.mark.integration, pytest.mark.flink]

ROOT = Path(__file__).resolve().parents[2]
FLINK_SH = ROOT / "runners" / "flink" / "flink.sh"
CHECK_JOB = ROOT / "runners" / "flink" / "cluster_check_job.py"
KEYS = 4


def _flink_env_default(name: str) -> str:
    text = (ROOT / "runners/flink/env.sh").read_text()
    return re.search(rf'^export {name}="\$\{{{name}:-([^}}]*)\}}"', text, re.M).group(1)


class ClusterRest(FlinkRest):
    """The launcher's REST client (runners/flink_job.py), with the tests' polling."""

    def poll(self, what: str, timeout_s: float, probe):
        """Poll ``probe()`` until it returns something truthy; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"Flink: {what} not reached within {timeout_s:.0f}s")
            time.sleep(0.5)

    def job_state(self, job_id: str) -> str:
        return self.get(f"/jobs/{job_id}")["state"]

    def wait_for_state(self, job_id: str, states: set[str], timeout_s: float = 150) -> str:
        def probe():
            state = self.job_state(job_id)
            if state in {"FAILED", "CANCELED"} - states:
                exceptions = self.get(f"/jobs/{job_id}/exceptions").get("root-exception", "")
                pytest.fail(f"job {job_id} ended {state}: {exceptions[:2000]}")
            return state if state in states else None
        return self.poll(f"job {job_id} in {sorted(states)}", timeout_s, probe)


@pytest.fixture(scope="module")
def flink():
    with local_flink_cluster():
        yield ClusterRest(f"http://127.0.0.1:{_flink_env_default('FLINK_REST_PORT')}")


def submit_check_job(out_dir: Path, job_name: str, *, count: int, rows_per_second: int,
                     savepoint: str | None = None) -> str:
    """Submit cluster_check_job.py detached through Flink's CLI; returns the job id."""
    args = [str(FLINK_SH), "cli", "run", "-d"]
    if savepoint:
        args += ["-s", savepoint]
    args += ["-py", str(CHECK_JOB), "--output", str(out_dir), "--count", str(count),
             "--rows-per-second", str(rows_per_second), "--checkpoint-interval-ms", "1000",
             "--parallelism", "2", "--job-name", job_name]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    found = re.search(r"JobID ([0-9a-f]{32})", done.stdout + done.stderr)
    assert done.returncode == 0 and found, f"submission failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return found.group(1)


def published_lines(out_dir: Path) -> list[tuple[int, int, int]]:
    """(key, count, sum) lines of the part files the FileSink committed.

    In-progress and pending part files are hidden (their names start with a
    dot) until the checkpoint that covers them completes; they are ignored.
    """
    lines = []
    for part in out_dir.rglob("totals-*"):
        for line in part.read_text().splitlines():
            key, count, total = (int(v) for v in line.split(","))
            lines.append((key, count, total))
    return lines


def expected_totals(count: int) -> dict[int, tuple[int, int]]:
    totals: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for n in range(1, count + 1):
        totals[n % KEYS][0] += 1
        totals[n % KEYS][1] += n
    return {k: (c, s) for k, (c, s) in totals.items()}


def assert_each_number_counted_once(lines, count: int):
    """Per key, the running counts are exactly 1..n once each, ending at the key's totals."""
    expected = expected_totals(count)
    by_key: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for key, c, total in lines:
        by_key[key].append((c, total))
    assert set(by_key) == set(expected)
    for key, (n, total) in expected.items():
        counts = sorted(c for c, _ in by_key[key])
        assert counts == list(range(1, n + 1)), f"key {key}: lost or repeated numbers"
        assert max(by_key[key]) == (n, total), f"key {key}: wrong final totals"
    assert len(lines) == count


def test_cluster_reports_a_taskmanager_with_at_least_two_slots(flink):
    overview = flink.get("/overview")
    assert overview["flink-version"] == _flink_env_default("FLINK_VERSION")
    assert overview["taskmanagers"] >= 1
    assert overview["slots-total"] >= 2
    config = {e["key"]: e["value"] for e in flink.get("/jobmanager/config")}
    assert config["state.backend.type"] == _flink_env_default("FLINK_STATE_BACKEND")
    assert config["execution.checkpointing.dir"].startswith("file://")


def test_keyed_job_at_parallelism_two_checkpoints_and_publishes_every_result_once(flink, tmp_path):
    count = 2000
    job_id = submit_check_job(tmp_path, f"cluster-check-{tmp_path.name}", count=count, rows_per_second=250)

    assert flink.wait_for_state(job_id, {"FINISHED"}) == "FINISHED"

    listed = {j["jid"]: j for j in flink.get("/jobs/overview")["jobs"]}
    assert listed[job_id]["state"] == "FINISHED"
    vertices = flink.get(f"/jobs/{job_id}")["vertices"]
    assert max(v["parallelism"] for v in vertices) == 2
    checkpoints = flink.get(f"/jobs/{job_id}/checkpoints")
    # Periodic checkpoints while the throttled source ran, plus the final one
    # that commits the last part files; none may be in flight at the end.
    assert checkpoints["counts"]["completed"] >= 2
    assert checkpoints["counts"]["in_progress"] == 0
    assert checkpoints["latest"]["completed"]["status"] == "COMPLETED"
    assert_each_number_counted_once(published_lines(tmp_path), count)


def test_job_stopped_with_a_savepoint_and_resumed_loses_and_repeats_nothing(flink, tmp_path):
    # ~16 s of throttled input: the stop must come while every source subtask
    # still has numbers to emit (Flink declines savepoints of finishing tasks).
    count, rate = 4000, 250
    job_name = f"cluster-check-resume-{tmp_path.name}"
    first = submit_check_job(tmp_path, job_name, count=count, rows_per_second=rate)
    flink.wait_for_state(first, {"RUNNING"})
    # Part-way: as soon as a checkpoint has published some results.
    flink.poll("first published results", 90, lambda: published_lines(tmp_path))

    trigger = flink.post(f"/jobs/{first}/stop", {"targetDirectory": str(tmp_path / "savepoints"), "drain": False})
    operation = flink.poll("stop-with-savepoint", 90, lambda: (
        lambda s: s if s["status"]["id"] == "COMPLETED" else None)(
            flink.get(f"/jobs/{first}/savepoints/{trigger['request-id']}")))
    assert "failure-cause" not in operation["operation"], operation["operation"]
    savepoint = operation["operation"]["location"]
    assert flink.wait_for_state(first, {"FINISHED"}) == "FINISHED"
    published_before = len(published_lines(tmp_path))
    assert 0 < published_before < count

    second = submit_check_job(tmp_path, job_name, count=count, rows_per_second=rate, savepoint=savepoint)
    assert flink.wait_for_state(second, {"FINISHED"}) == "FINISHED"

    restored = flink.get(f"/jobs/{second}/checkpoints")["latest"]["restored"]
    assert restored["is_savepoint"] is True
    assert restored["external_path"] == savepoint
    assert_each_number_counted_once(published_lines(tmp_path), count)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sdk_worker_pool_runs_pipeline_code_in_worker_processes_it_starts(tmp_path):
    launcher_pid = os.getpid()
    with WorkerPool(port=free_port(), log_path=tmp_path / "worker-pool.log") as pool:
        pool_pid = pool.pid
        assert pool_pid is not None
        options = PipelineOptions(
            runner="PrismRunner", prism_location=prism_location(), prism_log_level="warn",
            environment_type="EXTERNAL", environment_config=pool.address)
        with beam.Pipeline(options=options) as p:
            where = (p
                     | beam.Create(range(6))
                     | "WhereDoesThisRun" >> beam.Map(lambda n: (n * n, os.getpid() != launcher_pid, os.getppid())))
            assert_that(where, equal_to([(n * n, True, pool_pid) for n in range(6)]))
    assert "Starting worker" in (tmp_path / "worker-pool.log").read_text()


def test_job_server_fetch_yields_the_verified_jar_or_names_the_missing_artifact(tmp_path):
    # Real Maven against the real registry: today it does not serve the jar
    # (docs/flink.md); the day it does, the same call must produce the jar.
    env = {**os.environ, "OBF_CACHE_DIR": str(tmp_path / "cache"), "OBF_RUN_DIR": str(tmp_path / "run"),
           "FLINK_JOB_SERVER_JAR": ""}
    fetch = subprocess.run([str(ROOT / "runners/flink/jobserver.sh"), "fetch"], capture_output=True, text=True,
                           env=env, timeout=300)
    version = _flink_env_default("BEAM_FLINK_MINOR")
    if fetch.returncode == 0:
        jar = (tmp_path / "cache" / "beam-flink-jobserver"
               / f"beam-runners-flink-{version}-job-server-{beam.__version__}.jar")
        assert is_job_server_jar(jar)
    else:
        assert f"org.apache.beam:beam-runners-flink-{version}-job-server:{beam.__version__}" in fetch.stderr
        assert "Could not find artifact" in fetch.stderr or "could not resolve" in fetch.stderr
        assert "FLINK_JOB_SERVER_JAR=/path" in fetch.stderr


def redis_profiles(redis_url: str, prefix: str) -> tuple[dict, dict]:
    """Decoded profiles (without the wall-clock ``updated_at``) and segment members under ``prefix``."""
    client = redis.Redis.from_url(redis_url)
    profiles, segments = {}, {}
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            name = key.decode()[len(prefix) + 1:]
            if name.startswith("profile:"):
                profile = decode_profile(client.hgetall(key))
                profile.pop("updated_at")
                profiles[name] = profile
            elif name.startswith("segment:"):
                segments[name] = client.smembers(key)
    finally:
        client.close()
    return profiles, segments


def delete_keys(redis_url: str, prefixes: list[str]) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for prefix in prefixes:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
    finally:
        client.close()


@pytest.mark.e2e
def test_onboarding_pipeline_gives_the_same_profiles_with_external_sdk_workers_as_in_process(
        tmp_path, kafka_bootstrap, kafka_topic, redis_url, redis_key_prefix, pg_dsn, warehouse_schema,
        assert_same_profiles):
    # A small, fixed-seed journey stream with every kind of trouble in it.
    config = GeneratorConfig(seed=11, users=60, horizon_days=7.0, malformed_fraction=0.01,
                             duplicate_fraction=0.01, late_fraction=0.01)
    topic = kafka_topic(partitions=4)
    stats = produce(JourneyGenerator(config).messages(), kafka_bootstrap, topic, progress=False)
    assert sum(stats.failed.values()) == 0
    secret = SecretKey(b"flink-worker-pool-test-secret-32")
    lateness_hours = str(config.max_lateness_ms / 3_600_000 + 24)

    def bounded_run(label: str, *environment: str):
        argv = [
            "--runner=PrismRunner", f"--prism_location={prism_location()}", "--prism_log_level=warn",
            f"--experiments={PRISM_NO_DYNAMIC_SPLITS}", *environment,
            f"--kafka_bootstrap_servers={kafka_bootstrap}", f"--kafka_topics={topic}",
            "--kafka_start_position=earliest", f"--kafka_consumer_group={redis_key_prefix}-{label}",
            "--kafka_bounded", f"--dead_letter_topic={kafka_topic(partitions=1, suffix=label + '.dlq')}",
            f"--segment_changes_topic={kafka_topic(partitions=1, suffix=label + '.changes')}",
            f"--redis_url={redis_url}", f"--redis_key_prefix={redis_key_prefix}-{label}",
            f"--warehouse_dsn={pg_dsn}", f"--warehouse_schema={warehouse_schema}",
            f"--allowed_lateness_hours={lateness_hours}", f"--dedup_horizon_hours={lateness_hours}",
        ]
        prefixes.append(f"{redis_key_prefix}-{label}")
        assert run(argv, secret=secret).state == PipelineState.DONE
        return redis_profiles(redis_url, prefixes[-1])

    prefixes: list[str] = []
    try:
        in_process = bounded_run("loopback", "--environment_type=LOOPBACK")
        with WorkerPool(port=free_port(), log_path=tmp_path / "worker-pool.log") as pool:
            external = bounded_run("external", "--environment_type=EXTERNAL", f"--environment_config={pool.address}")
    finally:
        delete_keys(redis_url, prefixes)
    assert "Starting worker" in (tmp_path / "worker-pool.log").read_text()

    assert len(in_process[0]) >= config.users // 2
    assert_same_profiles(external[0], in_process[0])
    assert external[1] == in_process[1]
