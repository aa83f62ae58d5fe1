"""What the launcher hands the native Flink job, and what the job asks Flink for (no cluster needed)."""
from __future__ import annotations

import pickle

import pytest

from onboardflow.pipelines.configuration import profile_config
from onboardflow.pipelines.flink.settings import (
    SHADED_KAFKA,
    JobSettings,
    flink_configuration,
    flink_kafka_properties,
    source_ddl,
)
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


def test_flink_config_pairs_are_applied_last_and_a_malformed_one_is_refused():
    config = flink_configuration(JobSettings({**BASE, "flink_config": [
        "execution.buffer-timeout.interval=10ms", "state.backend.type = hashmap", "metrics.latency.interval=1000"]}))
    assert config["execution.buffer-timeout.interval"] == "10ms"
    assert config["state.backend.type"] == "hashmap"  # over the job's own default
    assert config["metrics.latency.interval"] == "1000"
    assert config["python.execution-mode"] == "thread"
    for bad in ("execution.buffer-timeout.interval", "=10ms", "key="):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            flink_configuration(JobSettings({**BASE, "flink_config": [bad]}))


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


# --------------------------------------------------------------------------- Kafka security


def test_a_plaintext_bootstrap_gives_the_connector_only_the_servers():
    assert flink_kafka_properties("h1:9092,h2:9092") == {"properties.bootstrap.servers": "h1:9092,h2:9092"}
    assert flink_kafka_properties("plaintext://h1:9092") == {"properties.bootstrap.servers": "h1:9092"}


def test_sasl_ssl_names_the_password_file_through_a_config_provider_and_never_reads_it(tmp_path):
    secret = tmp_path / "kafka-pipeline.password"
    secret.write_text("s3cret-no-newline")
    ca = tmp_path / "ca.crt"
    options = flink_kafka_properties(f"sasl_ssl://onboardflow-pipeline@h:9094?ssl_cafile={ca}&password_file={secret}")
    assert options == {
        "properties.bootstrap.servers": "h:9094",
        "properties.security.protocol": "SASL_SSL",
        "properties.ssl.truststore.type": "PEM",
        "properties.ssl.truststore.location": str(ca),
        "properties.sasl.mechanism": "SCRAM-SHA-512",
        "properties.sasl.jaas.config": f'{SHADED_KAFKA}.common.security.scram.ScramLoginModule required '
                                       f'username="onboardflow-pipeline" password="${{dir:{tmp_path}:{secret.name}}}";',
        "properties.config.providers": "dir",
        "properties.config.providers.dir.class": f"{SHADED_KAFKA}.common.config.provider.DirectoryConfigProvider",
    }
    assert "s3cret" not in repr(options)


def test_a_password_variable_is_resolved_in_the_taskmanagers_environment():
    options = flink_kafka_properties("sasl_plaintext://app@h:1?password_env=KAFKA_PW&sasl_mechanism=PLAIN")
    assert options["properties.security.protocol"] == "SASL_PLAINTEXT"
    assert options["properties.sasl.jaas.config"] == (
        f'{SHADED_KAFKA}.common.security.plain.PlainLoginModule required username="app" password="${{env:KAFKA_PW}}";')
    assert options["properties.config.providers.env.class"].endswith(".EnvVarConfigProvider")


@pytest.mark.parametrize("url, message", [
    ("ssl://h:1?ssl_cafile=/ca&ssl_certfile=/c&ssl_keyfile=/k", "does not present client certificates"),
    ("sasl_ssl://u@h:1?password_env=P&sasl_mechanism=GSSAPI", "not GSSAPI"),
    ('sasl_ssl://u"x@h:1?password_env=P', "a user name the JAAS line can quote"),
])
def test_what_the_connector_cannot_take_is_refused_before_the_job_starts(url, message):
    with pytest.raises(ValueError, match=message):
        flink_kafka_properties(url)


def test_a_password_file_ending_in_a_newline_is_refused_since_the_kafka_client_would_send_it(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    with pytest.raises(ValueError, match="ends in a newline") as refused:
        flink_kafka_properties(f"sasl_ssl://u@h:1?password_file={secret}")
    assert "s3cret" not in str(refused.value)


def test_a_quote_in_a_table_option_is_doubled_in_the_ddl(tmp_path):
    ca = tmp_path / "it's" / "ca.crt"
    ddl = source_ddl(JobSettings({"kafka_bootstrap_servers": f"ssl://h:1?ssl_cafile={ca}", "kafka_topics": "t",
                                  "kafka_consumer_group": "g", "kafka_start_position": "earliest"}))
    assert f"'properties.ssl.truststore.location' = '{str(ca).replace(chr(39), chr(39) * 2)}'" in ddl
