"""What the launcher hands the native Flink job, and what the job asks Flink for (no cluster needed)."""
from __future__ import annotations

import pickle

import pytest

from onboardflow.pipelines.configuration import profile_config
from onboardflow.pipelines.flink.settings import JobSettings, flink_configuration, source_ddl
from onboardflow.runners.cli.run import engine_of

BASE = {
    "kafka_topics": "onboarding.events", "kafka_bootstrap_servers": "127.0.0.1:9092",
    "kafka_consumer_group": "onboardflow-pipeline", "kafka_start_position": "committed",
    "job_name": "obf", "session_gap_minutes": 30.0, "allowed_lateness_hours": 24.0, "dedup_horizon_hours": 48.0,
    "new_user_window_days": 7.0, "dormancy_days": 30.0, "state_ttl_days": 90.0, "profile_refresh_hours": 24.0,
    "profile_refresh_window_days": 7.0, "profile_slow_refresh_days": 7.0, "future_tolerance_seconds": 600.0,
    "rules_file": None,
}


def test_settings_round_trip_through_json_and_pickle_and_are_read_only(tmp_path):
    settings = JobSettings(BASE)
    path = tmp_path / "job.json"
    path.write_text(settings.to_json())
    again = JobSettings.from_file(path)
    assert again.kafka_topics == "onboarding.events" and again.parallelism == 1 and again.flush_size == 5000
    # Flink ships the functions, and the settings in them, pickled to the TaskManagers.
    assert pickle.loads(pickle.dumps(again)).job_name == "obf"
    with pytest.raises(AttributeError):
        again.job_name = "other"
    with pytest.raises(AttributeError, match="no job setting"):
        _ = again.nothing_like_this
    assert again.streaming() and not again.replace(bounded_ranges=[{}]).streaming()


def test_the_same_profile_config_comes_out_of_job_settings_as_out_of_beam_options():
    from apache_beam.options.pipeline_options import PipelineOptions

    from onboardflow.pipelines.options import OnboardingOptions

    beam = PipelineOptions(["--dormancy_days=12", "--session_gap_minutes=20"]).view_as(OnboardingOptions)
    flink = JobSettings({**BASE, **{k: v for k, v in beam.get_all_options().items() if v is not None}})
    assert profile_config(flink, 123) == profile_config(beam, 123)


def test_a_streaming_source_starts_at_the_committed_offsets_and_discovers_partitions():
    ddl = source_ddl(JobSettings(BASE))
    assert "'scan.startup.mode' = 'group-offsets'" in ddl
    assert "'properties.group.id' = 'onboardflow-pipeline'" in ddl
    assert "scan.bounded" not in ddl and "partition-discovery" not in ddl
    assert "`partition` INT METADATA VIRTUAL" in ddl and "'value.format' = 'raw'" in ddl


def test_a_bounded_source_reads_exactly_the_ranges_the_launcher_fixed():
    ranges = [{"topic": "t", "start": {"1": 5, "0": 0}, "stop": {"0": 10, "1": 7}}]
    ddl = source_ddl(JobSettings({**BASE, "kafka_topics": "t", "bounded_ranges": ranges}))
    assert "'scan.startup.specific-offsets' = 'partition:0,offset:0;partition:1,offset:5'" in ddl
    assert "'scan.bounded.specific-offsets' = 'partition:0,offset:10;partition:1,offset:7'" in ddl
    assert "'scan.topic-partition-discovery.interval' = '0'" in ddl
    with pytest.raises(ValueError, match="one topic"):
        source_ddl(JobSettings({**BASE, "bounded_ranges": ranges * 2}))


def test_the_job_runs_python_in_thread_mode_on_rocksdb_with_exactly_once_checkpoints():
    config = flink_configuration(JobSettings({**BASE, "checkpointing_interval": 5000}))
    assert config["python.execution-mode"] == "thread"
    assert config["state.backend.type"] == "rocksdb"
    assert config["execution.checkpointing.mode"] == "EXACTLY_ONCE"
    assert config["execution.checkpointing.interval"] == "5000 ms"
    assert config["restart-strategy.type"] == "fixed-delay"
    assert "execution.state-recovery.path" not in config
    resumed = flink_configuration(JobSettings({**BASE, "savepoint_path": "file:///sp/savepoint-1"}))
    assert resumed["execution.state-recovery.path"] == "file:///sp/savepoint-1"
    assert resumed["execution.state-recovery.ignore-unclaimed-state"] == "false"


def test_engine_is_taken_out_of_the_run_flags():
    assert engine_of(["--kafka_bounded"]) == ("beam", ["--kafka_bounded"])
    assert engine_of(["--engine", "flink", "--x=1"]) == ("flink", ["--x=1"])
    assert engine_of(["--engine=flink"]) == ("flink", [])
    with pytest.raises(SystemExit, match="--engine must be one of"):
        engine_of(["--engine=spark"])


class _FlinkCounter:
    def __init__(self):
        self.calls: list[int] = []

    def inc(self, n):
        self.calls.append(n)


class _Group:
    def __init__(self):
        self.counters: dict[str, _FlinkCounter] = {}

    def add_group(self, name):
        return self

    def counter(self, name):
        return self.counters.setdefault(name, _FlinkCounter())


class _Context:
    def __init__(self):
        self.group = _Group()

    def get_metrics_group(self):
        return self.group


def test_counters_reach_flink_summed_at_push_not_one_jvm_call_per_count():
    from onboardflow.pipelines.flink.metrics import Counters

    context = _Context()
    count = Counters(context, push_interval_s=3600)
    count.register("flushes")
    for _ in range(1000):
        count("events", 1)
    count("events", 5)
    count.counter("onboardflow", "events_read", 3)
    assert context.group.counters["events"].calls == [], "pushed before the interval or push()"
    count.push()
    assert context.group.counters["events"].calls == [1005]
    assert context.group.counters["onboardflow_events_read"].calls == [3]
    assert context.group.counters["flushes"].calls == [], "a registered counter with nothing to add"
    count.push()
    assert context.group.counters["events"].calls == [1005], "pushed twice"


def test_counters_push_by_themselves_once_the_interval_has_passed():
    from onboardflow.pipelines.flink.metrics import Counters

    context = _Context()
    count = Counters(context, push_interval_s=0)
    count("events", 2)
    count("events", 3)
    assert context.group.counters["events"].calls == [2, 3]
