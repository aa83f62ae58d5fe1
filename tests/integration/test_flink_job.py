"""The native Flink job (pipelines/flink/) on the real local Flink cluster, held to the Beam pipeline.

One input for the module: a seeded journey stream with recent event times,
15 % of its records without a Kafka key (so one user's events sit on several
of the topic's 4 partitions), 1 % malformed, duplicated and late records
(reliability_harness.make_input). The reference is the Beam pipeline's
bounded run of it on Prism. Each Flink run writes its own Redis prefix,
warehouse schema and output topics, and is compared with the reference by
``reliability_harness.compare``: profiles field by field, segment sets,
the segment-change history on the topic and in the warehouse (folded, it
must equal the memberships in Redis), the newest snapshot per user, the
warehouse's events, late events and dead-letter rows by key, the DLQ topic's
source offsets. Nothing lost, nothing doubled, nothing different:

* an uninterrupted run (``onboardflow run --engine flink``), then the same input
  replayed into the same sinks;
* a run whose TaskManager is killed with SIGKILL at a random moment after its
  first completed checkpoint; a new TaskManager takes over and Flink restores
  the job from the last checkpoint;
* a run stopped with a savepoint halfway and resumed from it.

Every deployment serves the same RFM reference (``RFM_REFERENCE``, published
before its run), so the comparisons hold the RFM scores and the value segments
of the input's buyers to Beam's too. Online models are off in these comparisons (the propensity model's scores
depend on the order of its training batches, in either engine);
``test_flink_job_with_online_models_publishes_portable_models`` covers them.
The cluster comes from ``runners/flink/flink.sh up`` (started here when it is
not running, and stopped again in that case).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from onboardflow.models.features import feature_vector
from onboardflow.models.model_registry import ModelRegistry, ModelStore
from onboardflow.models.propensity import PropensityModel
from onboardflow.models.rfm_reference import RFM_KIND, RfmReference
from onboardflow.models.segmentation import Segmenter
from onboardflow.runners.cli.lag import KafkaLagReader
from onboardflow.runners.cli.produce import produce
from onboardflow.runners.flink_job import FlinkRest
from onboardflow.schemas.units import DAY_MS
from onboardflow.tests.conftest import local_flink_cluster
from onboardflow.tests.integration.reliability_harness import (
    Deployment,
    Outputs,
    PipelineProcess,
    compare,
    create_topics,
    delete_topics,
    make_input,
    run_to_end,
    write_secret,
)
from onboardflow.transforms.warehouse.migrations import apply_migrations

pytestmark = [pytest.mark.integration, pytest.mark.flink]

ROOT = Path(__file__).resolve().parents[2]
FLINK_SH = ROOT / "runners" / "flink" / "flink.sh"
RUN_DIR = Path(os.environ.get("OBF_RUN_DIR", ROOT / ".run"))
SEED = 1616
USERS = 300
NO_MODELS = "--disable_online_models"
#: Boundaries for the input's 3-day journeys (purchases within days of as_of, one or two per buyer,
#: 19 to 99 USD plus seats), so every score 1..5 occurs; published into every deployment.
RFM_REFERENCE = RfmReference((0.25, 0.5, 1.0, 2.0), (1, 1, 1, 2), (19.0, 49.0, 49.0, 99.0), 100, 0)


@pytest.fixture(scope="module")
def flink():
    with local_flink_cluster():
        yield FlinkRest(os.environ.get("OBF_FLINK_REST_URL", "http://127.0.0.1:8081"))


@pytest.fixture(scope="module")
def messages():
    return make_input(SEED, USERS)


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    return write_secret(tmp_path_factory.mktemp("secret"))


def _name(label: str) -> str:
    return f"t-flink-{label}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def input_topic(kafka_bootstrap, messages):
    topic = f"{_name('in')}.events"
    create_topics(kafka_bootstrap, {topic: 4})
    stats = produce(messages, kafka_bootstrap, topic, progress=False)
    assert stats.ok and stats.total_sent == len(messages)
    yield topic
    delete_topics(kafka_bootstrap, [topic])


@pytest.fixture(scope="module")
def deployments(kafka_bootstrap, redis_url, pg_dsn, input_topic, secret_file):
    made = []

    def make(label: str) -> Deployment:
        d = Deployment(_name(label), kafka_bootstrap, input_topic, redis_url, pg_dsn, secret_file).create()
        made.append(d)
        apply_migrations(d.dsn, d.schema)
        with ModelRegistry(d.redis_url, d.dsn, schema=d.schema, key_prefix=d.prefix) as registry:
            registry.publish(RFM_KIND, RFM_REFERENCE.to_json(), source="test", reason="the module's reference")
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture(scope="module")
def reference(deployments, tmp_path_factory):
    """The Beam pipeline's bounded run of the input on Prism: what every Flink run must equal."""
    d = deployments("beam")
    run_to_end(d, f"{d.name}-group", tmp_path_factory.mktemp("beam") / "beam.log", NO_MODELS, timeout_s=900)
    outputs = Outputs.read(d)
    assert len(outputs.profiles) > 250 and outputs.rows["events"] and outputs.dead_letter_records
    scored = [p for p in outputs.profiles.values() if p.get("rfm_reference")]
    assert len(scored) > 30 and len({p["rfm_m"] for p in scored}) >= 3, "the RFM scores are compared too"
    return outputs


def flink_argv(d: Deployment, *extra: str) -> list[str]:
    return d.argv(f"{d.name}-group", "--engine=flink", f"--flink_job_name={d.name}",
                  "--checkpointing_interval=1000", *extra)


def submit_detached(d: Deployment, log: Path, *extra: str) -> str:
    process = PipelineProcess(flink_argv(d, "--flink_detach", *extra), log)
    assert process.wait(300) == 0, process.log_text()[-4000:]
    found = [line for line in process.log_text().splitlines() if line.startswith("Flink job ")]
    assert found, process.log_text()[-4000:]
    return found[-1].split()[2]


def wait_for(what: str, probe, timeout_s: float = 300, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"{what} not within {timeout_s} s")


def finished(flink: FlinkRest, job_id: str, timeout_s: float = 600) -> None:
    state = flink.wait(job_id, timeout_s)
    assert state == "FINISHED", f"job {job_id} {state}:\n{flink.root_exception(job_id)}"


def completed_checkpoints(flink: FlinkRest, job_id: str) -> int:
    try:
        return flink.get(f"/jobs/{job_id}/checkpoints")["counts"]["completed"]
    except OSError:
        return 0


def profile_count(d: Deployment) -> int:
    client = redis.Redis.from_url(d.redis_url)
    try:
        return sum(1 for _ in client.scan_iter(match=f"{d.prefix}:profile:*", count=1000))
    finally:
        client.close()


def _check(comparison, title: str) -> None:
    print(f"\n{title}\n{comparison.summary()}")
    assert comparison.problems == {}, f"{title}:\n{comparison.summary()}"
    assert sum(comparison.lost.values()) == 0 and sum(comparison.doubled.values()) == 0


def test_the_flink_job_leaves_exactly_what_the_beam_pipeline_leaves(
        flink, deployments, reference, tmp_path, assert_same_profiles):
    d = deployments("same")
    process = PipelineProcess(flink_argv(d, NO_MODELS), tmp_path / "flink.log")
    assert process.wait(600) == 0, process.log_text()[-4000:]
    log = process.log_text()
    assert "submitted; web UI: http://" in log and "finished" in log
    _check(compare(Outputs.read(d), reference, assert_same_profiles), "Flink job vs Beam on Prism")
    # The source committed its offsets to the group with its checkpoints: `onboardflow lag` sees it caught up.
    reader = KafkaLagReader(d.bootstrap, f"{d.name}-group", [d.events_topic])
    try:
        rows = reader.read()
    finally:
        reader.close()
    assert len(rows) == 4 and all(r.committed == r.log_end for r in rows), rows
    # The same input again, into the same sinks (a replay from the earliest offset, as after an
    # operator resets the group): Redis, the warehouse and the output topics stay as they were.
    again = PipelineProcess(d.argv(f"{d.name}-replay", "--engine=flink", f"--flink_job_name={d.name}-replay",
                                   "--checkpointing_interval=1000", NO_MODELS), tmp_path / "replay.log")
    assert again.wait(600) == 0, again.log_text()[-4000:]
    _check(compare(Outputs.read(d), reference, assert_same_profiles), "Flink job replayed into the same sinks")


def _taskmanager_pid() -> int:
    return int((RUN_DIR / "flink" / "flink-onboardflow-taskexecutor.pid").read_text().split()[-1])


def test_kill_9_of_the_taskmanager_mid_run_restores_from_the_checkpoint_and_loses_and_doubles_nothing(
        flink, deployments, reference, tmp_path, assert_same_profiles):
    d = deployments("kill")
    job_id = submit_detached(d, tmp_path / "submit.log", NO_MODELS)
    wait_for("the first completed checkpoint", lambda: completed_checkpoints(flink, job_id) >= 1)
    time.sleep(random.Random(SEED).uniform(0.0, 2.0))
    assert flink.state(job_id) == "RUNNING", "the job ended before the kill: make the input larger"
    before = profile_count(d)
    pid = _taskmanager_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for("the TaskManager to die", lambda: not os.path.exists(f"/proc/{pid}"), 30)
    subprocess.run([str(FLINK_SH), "up"], check=True, capture_output=True)  # a new TaskManager
    finished(flink, job_id)
    history = flink.get(f"/jobs/{job_id}/exceptions").get("exceptionHistory", {}).get("entries", [])
    assert history, "no failure recorded: the kill did not hit the job"
    restored = flink.get(f"/jobs/{job_id}/checkpoints").get("latest", {}).get("restored")
    assert restored, "the job did not restore from a checkpoint"
    print(f"\nkilled the TaskManager with {before} profiles in Redis; restored from checkpoint "
          f"{restored.get('id')}")
    _check(compare(Outputs.read(d), reference, assert_same_profiles), "Flink job, TaskManager killed")


def test_stop_with_savepoint_and_resume_leaves_exactly_what_an_uninterrupted_run_leaves(
        flink, deployments, reference, tmp_path, assert_same_profiles):
    d = deployments("savepoint")
    job_id = submit_detached(d, tmp_path / "submit.log", NO_MODELS)
    wait_for("the first completed checkpoint", lambda: completed_checkpoints(flink, job_id) >= 1)
    assert flink.state(job_id) == "RUNNING", "the job ended before the savepoint: make the input larger"
    location = flink.stop_with_savepoint(job_id, str(tmp_path / "savepoints"))
    assert flink.wait(job_id, 60) == "FINISHED"
    halfway = profile_count(d)
    print(f"\nstopped with a savepoint at {location} with {halfway} profiles in Redis")
    resumed = submit_detached(d, tmp_path / "resume.log", NO_MODELS, f"--savepoint_path={location}")
    finished(flink, resumed)
    info = flink.get(f"/jobs/{resumed}/checkpoints").get("latest", {}).get("restored") or {}
    assert info.get("is_savepoint") and location.endswith(Path(info["external_path"]).name)
    _check(compare(Outputs.read(d), reference, assert_same_profiles), "Flink job, stopped and resumed")


def _seed_propensity_model() -> bytes:
    """A warm propensity model trained here (this virtualenv's River), as the registry would serve it."""
    model = PropensityModel(min_per_class=5)
    for i in range(40):
        x = {"events_7d": float(i % 7), "session_count": float(1 + i % 3), "onboarding_progress": 0.1 * (i % 5)}
        model.predict(f"seed-{i}", x, DAY_MS * i)
        if i % 2 == 0:
            model.label(f"seed-{i}", 1, DAY_MS * i + 1)
    model.expire(DAY_MS * 1000)
    assert model.warm
    return model.to_bytes(include_pending=False)


def test_flink_job_with_online_models_publishes_portable_models_and_serves_metrics(flink, deployments, tmp_path,
                                                                                   messages):
    """Models cross both ways: the Flink learner (River 0.23) continues a propensity model published
    here (this virtualenv's River) and publishes snapshots this virtualenv loads and scores with
    exactly as the job did. The pipeline's metrics reach the TaskManager's /metrics endpoint and
    Flink's metric groups."""
    d = deployments("models")
    apply_migrations(d.dsn, d.schema)
    with ModelRegistry(d.redis_url, d.dsn, schema=d.schema, key_prefix=d.prefix) as registry:
        seeded = registry.publish("propensity", _seed_propensity_model(), source="test", reason="seed").version
    sd_dir = tmp_path / "targets"
    process = PipelineProcess(flink_argv(d), tmp_path / "flink.log", metrics_dir=sd_dir)
    # The user stage's metric group as Flink's REST API lists it, read while the job runs: the
    # JobManager fetches operator metrics every few seconds and keeps no later ones of a finished job.
    names: set[str] = set()
    while process.running() and not any(n.endswith("onboardflow.flushes") for n in names):
        if "Flink job " in process.log_text():
            job_id = process.log_text().split("Flink job ", 1)[1].split()[0]
            try:
                vertices = {v["name"]: v["id"] for v in flink.get(f"/jobs/{job_id}")["vertices"]}
                users = next(vid for name, vid in vertices.items() if name.startswith("UserProfiles"))
                names = {m["id"] for m in flink.get(f"/jobs/{job_id}/vertices/{users}/metrics")}
            except (OSError, ValueError, KeyError, StopIteration):
                pass
        time.sleep(0.5)
    assert process.wait(600) == 0, process.log_text()[-4000:]
    assert any(n.endswith("onboardflow.flushes") for n in names), sorted(names)[:20]
    samples = process.scrape()
    read = sum(v for k, v in samples.items() if k.startswith("onboardflow_events_read_total"))
    assert read >= len(messages), f"the TaskManager's /metrics counted {read} records read of {len(messages)}"
    profiles = Outputs.read(d).profiles
    store = ModelStore(d.redis_url, d.prefix)
    try:
        segmentation, propensity = store.current("segmentation"), store.current("propensity")
        assert segmentation is not None and propensity is not None
        assert propensity.number > seeded.number, "the Flink learner published no propensity model of its own"
        segmenter = Segmenter.from_bytes(segmentation.payload)
        model = PropensityModel.from_bytes(propensity.payload)
    finally:
        store.close()
    serving = f"{segmentation.id}+{propensity.id}"
    assert profiles and all(p.get("model_version") == serving for p in profiles.values()), \
        "after the end-of-input refit every profile is re-scored by the serving models"
    # The snapshots the Flink job published (River 0.23) score here (this venv's River) exactly as
    # the job scored with them: the models crossed intact.
    for user_key, profile in profiles.items():
        x = feature_vector(profile)
        assert profile["cluster_id"] == segmenter.predict_one(x), user_key
        assert profile["propensity"] == pytest.approx(model.score(x), rel=1e-9, abs=1e-12), user_key
    key = Path(d.secret_file).read_bytes()
    written = (RUN_DIR / "flink" / "jobs" / f"{d.name}.json").read_bytes()
    assert key not in written and key.hex().encode() not in written, "the secret reached the job's settings"
