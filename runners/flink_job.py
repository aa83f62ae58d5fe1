"""Launch the native Flink job (pipelines/flink/) on a running Flink cluster: ``onboardflow run --engine flink``.

What ``submit(argv)`` does, from the project's own environment (Beam's
option classes parse the flags, so both engines take the same flags over the
same deployment settings, runners/cli/run.py):

1. resolves the job's settings: the pipeline's options, the native job's
   (``--flink_*``, pipelines/options.py ``FlinkJobOptions``), and for a bounded
   run (``--kafka_bounded``) the exact offset ranges and their event-time
   horizon (transforms/backfill_horizon.py), fixed here as for the Beam job;
2. migrates the warehouse;
3. writes ``JobSettings`` (pipelines/flink/settings.py) to
   ``.run/flink/jobs/<job name>.json``: options only, never the secret itself;
4. submits the job with Flink's own client from the Flink virtualenv
   (``runners/flink/flink.sh cli run -d -pym onboardflow.pipelines.flink.job``),
   which compiles the graph and hands it to the JobManager;
5. follows it through the REST API: a bounded run until it finishes (its
   failure raised with Flink's root exception), a streaming run until Ctrl-C
   or SIGTERM, which stops it with a savepoint (printed, for
   ``--savepoint_path``). ``--flink_detach`` returns after step 4.

The cluster is ``make flink-up`` (runners/flink/flink.sh); its REST address
is ``--flink_rest_url`` (default ``$OBF_FLINK_REST_URL`` or
http://127.0.0.1:8081).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from . import paths
from .settings import Settings

_LOG = logging.getLogger(__name__)

FLINK_SH = Path(__file__).resolve().parent / "flink" / "flink.sh"
JOB_MODULE = "onboardflow.pipelines.flink.job"
DEFAULT_REST_URL = "http://127.0.0.1:8081"
TERMINAL = {"FINISHED", "FAILED", "CANCELED"}


def rest_url(given: Optional[str] = None) -> str:
    return (given or os.environ.get("OBF_FLINK_REST_URL") or DEFAULT_REST_URL).rstrip("/")


class FlinkRest:
    """The few calls of Flink's REST API the launcher and the tests make."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.base}{path}", timeout=10) as response:
            return json.load(response)

    def post(self, path: str, body: dict) -> Any:
        request = urllib.request.Request(f"{self.base}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def state(self, job_id: str) -> str:
        return self.get(f"/jobs/{job_id}")["state"]

    def root_exception(self, job_id: str) -> str:
        try:
            info = self.get(f"/jobs/{job_id}/exceptions")
        except (OSError, ValueError):
            return "(no exception history)"
        history = info.get("exceptionHistory", {}).get("entries") or []
        text = history[0].get("stacktrace") if history else info.get("root-exception")
        return (text or "(none)")[:4000]

    def stop_with_savepoint(self, job_id: str, directory: Optional[str] = None, drain: bool = False,
                            timeout_s: float = 300) -> str:
        """Stop the job with a savepoint; returns the savepoint's path."""
        body: dict = {"drain": drain}
        if directory:
            body["targetDirectory"] = directory
        trigger = self.post(f"/jobs/{job_id}/stop", body)["request-id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.get(f"/jobs/{job_id}/savepoints/{trigger}")
            if status["status"]["id"] == "COMPLETED":
                operation = status["operation"]
                if "failure-cause" in operation:
                    raise RuntimeError(f"stop-with-savepoint failed: {operation['failure-cause'].get('class')}")
                return operation["location"]
            time.sleep(0.5)
        raise TimeoutError(f"stop-with-savepoint of {job_id} did not complete in {timeout_s} s")

    def wait(self, job_id: str, timeout_s: Optional[float] = None, poll_s: float = 1.0) -> str:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            state = self.state(job_id)
            if state in TERMINAL:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Flink job {job_id} still {state} after {timeout_s} s")
            time.sleep(poll_s)


@dataclass
class Submitted:
    job_id: str
    settings_path: Path
    rest_url: str

    @property
    def ui(self) -> str:
        return f"{self.rest_url}/#/job/running/{self.job_id}/overview"


def _json_ready(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, type(None), list))}


def job_settings(argv: Sequence[str], settings: Optional[Settings] = None) -> dict:
    """The ``JobSettings`` values for ``argv`` over the deployment (steps 1–2 of the module docstring)."""
    from ..pipelines.configuration import resolve_secret
    from ..pipelines.flink.settings import extra_configuration, flink_kafka_properties
    from ..pipelines.options import (
        BOUNDED_FLUSH_INTERVAL_MS,
        STREAMING_FLUSH_INTERVAL_MS,
        FlinkCheckpointOptions,
        FlinkJobOptions,
        KafkaReadOptions,
        OnboardingOptions,
    )
    from ..transforms.backfill_horizon import backfill_horizon
    from ..transforms.decode import OnboardingEventDecoder
    from ..transforms.kafka.consumer import resolve_partitions
    from ..transforms.kafka.offsets import StartPosition
    from ..transforms.warehouse.migrations import apply_migrations
    from .cli.run import pipeline_options

    options = pipeline_options(list(argv), settings)
    opts = options.view_as(OnboardingOptions)
    kafka = options.view_as(KafkaReadOptions)
    job = options.view_as(FlinkJobOptions)
    checkpoints = options.view_as(FlinkCheckpointOptions)
    values = _json_ready(options.get_all_options())
    if not (opts.secret_file or opts.secret_env):
        resolve_secret(opts)  # the same refusal as the Beam job's
        values["secret_file"] = _demo_secret(job.flink_job_name)
    values.update(
        job_name=job.flink_job_name, parallelism=job.flink_parallelism,
        flush_size=job.flink_flush_size, relay_interval_ms=job.flink_relay_interval_ms,
        flush_interval_ms=job.flink_flush_interval_ms or (
            BOUNDED_FLUSH_INTERVAL_MS if kafka.kafka_bounded else STREAMING_FLUSH_INTERVAL_MS),
        restart_strategy=job.flink_restart_strategy, restart_attempts=job.flink_restart_attempts,
        restart_delay_ms=job.flink_restart_delay_ms,
        checkpointing_interval=checkpoints.checkpointing_interval or 10_000,
        state_backend=checkpoints.state_backend or "rocksdb",
    )
    flink_kafka_properties(kafka.kafka_bootstrap_servers)  # what the connector cannot take: refused now
    extra_configuration(job.flink_config or ())  # a malformed --flink_config: refused now, not on the cluster
    topics = [t.strip() for t in kafka.kafka_topics.split(",") if t.strip()]
    partitions = resolve_partitions(kafka.kafka_bootstrap_servers, topics, kafka.kafka_consumer_group,
                                    StartPosition.parse(kafka.kafka_start_position), bounded=kafka.kafka_bounded)
    # One source subtask per partition (each reads one): the watermark is then the
    # partition's own, as the Beam source keeps it (docs/flink.md "Watermarks").
    values["source_parallelism"] = job.flink_source_parallelism or len(partitions)
    if kafka.kafka_bounded:
        ranges: dict[str, dict] = {}
        for p in partitions:
            entry = ranges.setdefault(p.topic, {"topic": p.topic, "start": {}, "stop": {}})
            entry["start"][str(p.partition)] = p.start_offset
            entry["stop"][str(p.partition)] = p.stop_offset
        decoder = OnboardingEventDecoder(registry_url=opts.registry_url)
        values["horizon_ms"] = backfill_horizon(opts.backfill_horizon, kafka.kafka_bootstrap_servers, partitions,
                                                decoder.decode)
        values["bounded_ranges"] = list(ranges.values())
    applied = apply_migrations(opts.warehouse_dsn, opts.warehouse_schema)
    if applied:
        _LOG.info("warehouse: applied migrations %s", ", ".join(m.name for m in applied))
    return values


def _demo_secret(job_name: str) -> str:
    """Demo mode: a throw-away key in a private file (the job reads it on the TaskManagers)."""
    from ..transforms.anonymize import generate_demo_secret

    folder = paths.run_dir() / "flink" / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job_name}.demo.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(generate_demo_secret())
    _LOG.warning("demo mode: generated a throw-away pseudonymization key for the Flink job (%s)", path)
    return str(path)


def submit(argv: Sequence[str], settings: Optional[Settings] = None, rest: Optional[str] = None) -> Submitted:
    """Submit the job for ``argv``; returns once Flink has accepted it."""
    values = job_settings(argv, settings)
    base = rest_url(rest or values.get("flink_rest_url"))
    folder = paths.run_dir() / "flink" / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    settings_path = folder / f"{values['job_name']}.json"
    settings_path.write_text(json.dumps(values, sort_keys=True, indent=1))
    needed = max(int(values["source_parallelism"]), int(values["parallelism"]))
    try:
        slots = FlinkRest(base).get("/overview")["slots-total"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"onboardflow run --engine flink: no Flink cluster answers at {base} "
                         f"({type(exc).__name__}); start one with `make flink-up`") from None
    if slots < needed:
        raise SystemExit(f"onboardflow run --engine flink: the job needs {needed} task slots (one per Kafka "
                         f"partition for the source, --flink_parallelism for the user stage) and the cluster "
                         f"at {base} has {slots}; add TaskManagers or slots (FLINK_TASKMANAGERS, "
                         f"FLINK_TASK_SLOTS), or lower --flink_source_parallelism")
    if not FLINK_SH.is_file():
        raise SystemExit(f"onboardflow run --engine flink: {FLINK_SH} is missing (run from a checkout)")
    host_port = base.split("://", 1)[-1]
    command = [str(FLINK_SH), "cli", "run", "-d", "-m", host_port, "-pym", JOB_MODULE,
               "--settings", str(settings_path)]
    _LOG.info("submitting %s to Flink at %s", values["job_name"], base)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    found = re.search(r"JobID ([0-9a-f]{32})", output) or re.search(r"job submitted: ([0-9a-f]{32})", output)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"Flink did not accept the job (exit {done.returncode}):\n{output[-4000:]}")
    return Submitted(found.group(1), settings_path, base)


def commit_bounded_ranges(settings_path: Path) -> None:
    """After a bounded job FINISHED (every range read to its stop offset): commit the stop offsets.

    The Kafka source commits on completed checkpoints, and a source subtask
    that finished its splits takes part in no later checkpoint, so its last
    offsets stay uncommitted; ``onboardflow lag`` would show a finished
    backfill behind. A committed offset is never moved back.
    """
    from kafka import TopicPartition

    from ..transforms.kafka.consumer import OffsetCommitter
    from .cli.lag import KafkaLagReader

    values = json.loads(Path(settings_path).read_text())
    for entry in values.get("bounded_ranges") or ():
        reader = KafkaLagReader(values["kafka_bootstrap_servers"], values["kafka_consumer_group"], [entry["topic"]])
        try:
            committed = {row.partition: row.committed for row in reader.read()}
        finally:
            reader.close()
        behind = {TopicPartition(entry["topic"], int(p)): stop for p, stop in entry["stop"].items()
                  if committed.get(int(p)) is None or committed[int(p)] < stop}
        if behind:
            committer = OffsetCommitter(values["kafka_bootstrap_servers"], values["kafka_consumer_group"])
            try:
                committer.commit(behind)
            finally:
                committer.close()


def run(argv: Sequence[str], settings: Optional[Settings] = None) -> int:
    """``onboardflow run --engine flink ARGV``: submit, then follow the job (module docstring, step 5)."""
    detach = "--flink_detach" in argv
    submitted = submit(argv, settings)
    print(f"Flink job {submitted.job_id} submitted; web UI: {submitted.ui}", flush=True)
    if detach:
        return 0
    rest = FlinkRest(submitted.rest_url)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                state = rest.state(submitted.job_id)
            except (urllib.error.URLError, OSError) as exc:
                _LOG.warning("Flink REST API unreachable (%s); retrying", type(exc).__name__)
                time.sleep(2)
                continue
            if state == "FINISHED":
                print(f"Flink job {submitted.job_id} finished", flush=True)
                commit_bounded_ranges(submitted.settings_path)
                return 0
            if state in ("FAILED", "CANCELED"):
                raise RuntimeError(f"Flink job {submitted.job_id} {state}:\n{rest.root_exception(submitted.job_id)}")
            if stop["signal"] is not None:
                location = rest.stop_with_savepoint(submitted.job_id)
                print(f"Flink job {submitted.job_id} stopped with a savepoint: {location}\n"
                      f"resume with: --savepoint_path={location}", flush=True)
                return 0
            time.sleep(1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
