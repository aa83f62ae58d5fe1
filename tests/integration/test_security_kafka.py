"""Kafka over SASL_SSL with SCRAM users and ACLs (docs/security.md "Transport and credentials").

A private secure broker is started by the project's own script
(``runners/services/services.sh secure-up`` with ``OBF_SECURE_SERVICES=kafka``)
on free ports, its run directory under /tmp: the script generates the CA, the
server certificate and every password there, creates the SCRAM users and ACLs
and writes the endpoints to ``services.secure.env``; the plaintext broker on
9092 is not touched. The project's producer, Kafka source and sink then run
over SASL_SSL as the pipeline user, the app user is shown what it may not do,
a wrong password, a missing CA and a plaintext client are refused with a clear
error, and no generated password shows in logs, exception text, ``ps`` output,
``/proc/<pid>/cmdline`` or the files the clients are configured from.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from onboardflow.pipelines.beam.kafka_sink import WriteToKafka
from onboardflow.pipelines.beam.kafka_source import ReadFromKafka
from onboardflow.pipelines.flink.settings import JobSettings, flink_kafka_properties, source_ddl
from onboardflow.runners.cli.produce import produce
from onboardflow.runners.local import local_pipeline_options
from onboardflow.runners.settings import Settings, read_services_env
from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
from onboardflow.tests.conftest import KAFKA_BOOTSTRAP, PG_DSN, REDIS_URL, local_flink_cluster
from onboardflow.tests.integration.outputs import redis_dump
from onboardflow.tests.integration.reliability_harness import Deployment, create_topics, run_to_end, write_secret
from onboardflow.transforms.connections import (
    CredentialsError,
    KafkaRefusedError,
    kafka_config,
    kafka_refusal,
    kafka_settings,
)
from onboardflow.transforms.kafka.consumer import resolve_partitions
from onboardflow.transforms.kafka.offsets import StartPosition
from onboardflow.transforms.profile_store.encoding import decode_profile

pytestmark = pytest.mark.integration

SERVICES = Path(__file__).resolve().parents[2] / "runners" / "services" / "services.sh"
EVENTS, DLQ, SEGMENTS = "onboarding.events", "onboarding.events.dlq", "onboarding.segment-changes"
# A refused client gives up within these; a refusal arrives in well under a second, the margin
# is for a loaded machine (the refusal must be logged before the client gives up).
FAST = {"max_block_ms": 30_000, "request_timeout_ms": 20_000}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SecureKafka:
    """The endpoints ``services.sh secure-up`` wrote, and the passwords it generated (for the leak checks)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.env_file = run_dir / "services.secure.env"
        self.endpoints = read_services_env(self.env_file)
        self.ca = run_dir / "tls" / "ca.crt"
        self.secrets_dir = run_dir / "secrets"
        self.passwords = {p.name: p.read_text().strip() for p in self.secrets_dir.glob("kafka-*.password")}
        self.pipeline = self.endpoints["OBF_KAFKA_BOOTSTRAP"]
        self.app = self.endpoints["OBF_KAFKA_APP_BOOTSTRAP"]
        self.producer = self.endpoints["OBF_KAFKA_PRODUCER_BOOTSTRAP"]

    def with_password_file(self, path: Path, url: str | None = None) -> str:
        return (url or self.pipeline).split("password_file=")[0] + f"password_file={path}"

    def assert_no_secret_in(self, text: str) -> None:
        assert len(self.passwords) == 4 and all(len(p) >= 32 for p in self.passwords.values())
        leaked = [name for name, password in self.passwords.items() if password in text]
        assert not leaked, f"secrets {leaked} appear in the output"


@pytest.fixture(autouse=True)
def kafka_logging_of_a_fresh_process():
    """The Kafka client's loggers as a process of its own has them (levels unset).

    A CLI command an earlier test ran in this process (runners/cli/__init__.py
    ``configure_logging``) quiets them for a one-shot command; these tests look
    at what the client logs, and at the refusals recovered from it.
    """
    names = [n for n in logging.root.manager.loggerDict if n == "kafka" or n.startswith("kafka.")]
    saved = {n: logging.getLogger(n).level for n in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def secure():
    run_dir = Path(tempfile.mkdtemp(prefix="obf-secure-kafka-", dir="/tmp"))
    env = {**os.environ, "OBF_RUN_DIR": str(run_dir), "OBF_SECURITY": "tls", "OBF_SECURE_SERVICES": "kafka",
           "KAFKA_TLS_PORT": str(free_port()), "KAFKA_TLS_CONTROLLER_PORT": str(free_port()),
           "KAFKA_HEAP_OPTS": "-Xms128m -Xmx512m"}
    for name in ("OBF_TLS_DIR", "OBF_SECRETS_DIR", "OBF_DEPLOYMENT", "KAFKA_ACL_PREFIX"):
        env.pop(name, None)
    try:
        done = subprocess.run(["bash", str(SERVICES), "secure-up"], env=env, capture_output=True, text=True,
                              timeout=420)
        assert done.returncode == 0, done.stderr[-3000:]
        services = SecureKafka(run_dir)
        services.assert_no_secret_in(done.stdout + done.stderr)
        yield services
    finally:
        subprocess.run(["bash", str(SERVICES), "secure-down"], env=env, capture_output=True, timeout=120)
        logs = "".join(p.read_text(errors="replace") for p in run_dir.rglob("*.log")) if run_dir.exists() else ""
        passwords = [p.read_text().strip() for p in (run_dir / "secrets").glob("*.password")] \
            if (run_dir / "secrets").exists() else []
        shutil.rmtree(run_dir, ignore_errors=True)
        assert logs and not [p for p in passwords if p in logs], "a password appears in the broker's logs"


def messages(n: int, seed: int = 5):
    return list(JourneyGenerator(GeneratorConfig(seed=seed, users=20)).messages(max_messages=n))


# --------------------------------------------------------------------------- what the files hold


def test_the_env_file_names_the_sasl_ssl_endpoint_and_password_file_but_holds_no_secret(secure):
    text = secure.env_file.read_text()
    secure.assert_no_secret_in(text)
    assert secure.pipeline.startswith("sasl_ssl://onboardflow-pipeline@127.0.0.1:")
    assert f"ssl_cafile={secure.ca}" in secure.pipeline
    assert "password_file=" in secure.pipeline and "password_file=" in secure.app
    servers, kwargs = kafka_settings(secure.pipeline)
    assert servers.startswith("127.0.0.1:") and "?" not in servers
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "onboardflow-pipeline"
    assert kwargs["sasl_plain_password"] == secure.passwords["kafka-pipeline.password"]
    # The pipeline's flags (its argv) and its description carry the endpoint, not the password.
    settings = Settings.load(dict(secure.endpoints) | {"OBF_RUN_DIR": str(secure.run_dir)})
    assert f"--kafka_bootstrap_servers={secure.pipeline}" in settings.pipeline_flags()
    secure.assert_no_secret_in(" ".join(settings.pipeline_flags()) + settings.describe())
    files = [*secure.secrets_dir.iterdir(), secure.run_dir / "tls" / "ca.key",
             *(secure.run_dir / "kafka-tls" / name for name in ("server.properties", "admin.properties", "server.pem"))]
    for path in files:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    assert not (secure.run_dir / "kafka-tls" / "format.args").exists()


def test_plaintext_host_port_settings_are_unchanged():
    assert kafka_settings("127.0.0.1:9092,127.0.0.1:9093") == ("127.0.0.1:9092,127.0.0.1:9093", {})
    assert kafka_config("127.0.0.1:9092", acks="all") == {"bootstrap_servers": "127.0.0.1:9092", "acks": "all"}
    assert flink_kafka_properties("127.0.0.1:9092") == {"properties.bootstrap.servers": "127.0.0.1:9092"}


# --------------------------------------------------------------------------- the pipeline user


@pytest.fixture(scope="module")
def produced(secure):
    """Events written to the events topic by the project's producer, as the producer user."""
    sent = messages(300)
    stats = produce(sent, secure.producer, EVENTS, progress=False)
    assert stats.ok and stats.total_sent == 300
    return sent


def test_the_source_reads_what_the_producer_wrote_and_commits_as_the_pipeline_user(secure, produced, tmp_path):
    group = f"onboardflow-sec-{uuid.uuid4().hex[:6]}"
    partitions = resolve_partitions(secure.pipeline, [EVENTS], group, StartPosition.parse("earliest"), bounded=True)
    assert sum(p.stop_offset - p.start_offset for p in partitions) == len(produced)
    out = tmp_path / "read.jsonl"

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        records = pipeline | ReadFromKafka(secure.pipeline, EVENTS, consumer_group=group, bounded=True)
        _ = (records | beam.Map(lambda r: json.dumps([(r.key or b"").hex(), r.value.hex()]))
             | beam.io.WriteToText(str(out), shard_name_template=""))

    read = sorted(tuple(json.loads(line)) for line in out.read_text().splitlines())
    assert read == sorted(((m.key or b"").hex(), m.value.hex()) for m in produced)
    consumer = KafkaConsumer(**kafka_config(secure.pipeline, group_id=group))
    try:
        tps = [TopicPartition(EVENTS, p.partition) for p in partitions]
        committed = {tp.partition: consumer.committed(tp) for tp in tps}
        assert committed == {tp.partition: end for tp, end in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def test_the_sink_writes_segment_changes_that_the_app_user_reads(secure):
    pairs = [(f"user-{i}".encode(), f"change-{i}-{uuid.uuid4().hex}".encode()) for i in range(40)]
    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        dead = pipeline | beam.Create(pairs) | WriteToKafka(secure.pipeline, SEGMENTS)
        assert_that(dead, equal_to([]))

    consumer = KafkaConsumer(SEGMENTS, **kafka_config(secure.app, group_id=f"onboardflow-app-{uuid.uuid4().hex[:6]}",
                                                      auto_offset_reset="earliest", consumer_timeout_ms=5000))
    try:
        got = set()
        deadline = time.monotonic() + 90
        while not set(pairs) <= got and time.monotonic() < deadline:
            got.update((r.key, r.value) for r in consumer)
    finally:
        consumer.close()
    assert set(pairs) <= got


def test_an_admin_client_of_the_pipeline_lists_its_topics_and_logs_no_password(secure, caplog):
    from kafka.admin import KafkaAdminClient

    with caplog.at_level(logging.DEBUG):
        admin = KafkaAdminClient(**kafka_config(secure.pipeline, request_timeout_ms=20_000))
        try:
            assert {EVENTS, DLQ, SEGMENTS} <= set(admin.list_topics())
        finally:
            admin.close()
    assert "Starting KafkaAdminClient with configuration" in caplog.text
    secure.assert_no_secret_in(caplog.text)


def test_the_pipeline_user_cannot_touch_another_deployments_topics_nor_write_events(secure):
    producer = KafkaProducer(**kafka_config(secure.pipeline, **FAST))
    try:
        assert producer.send(DLQ, b"dead letter").get(timeout=30).topic == DLQ
        for topic in ("other-deployment.events", EVENTS):
            with pytest.raises(KafkaError, match="TopicAuthorizationFailed"):
                producer.send(topic, b"forged event").get(timeout=30)
    finally:
        producer.close(timeout=5)


def test_the_producer_user_writes_events_and_erasure_requests_and_reads_nothing(secure, produced):
    producer = KafkaProducer(**kafka_config(secure.producer, **FAST))
    try:
        assert producer.send("onboarding.erasures", b"request").get(timeout=30).topic == "onboarding.erasures"
        with pytest.raises(KafkaError, match="TopicAuthorizationFailed"):
            producer.send(SEGMENTS, b"forged segment change").get(timeout=30)
    finally:
        producer.close(timeout=5)
    consumer = KafkaConsumer(**kafka_config(secure.producer, request_timeout_ms=20_000))
    try:
        consumer.assign([TopicPartition(EVENTS, p) for p in consumer.partitions_for_topic(EVENTS)])
        consumer.seek_to_beginning()
        with pytest.raises(KafkaError, match="TopicAuthorizationFailed"):
            for _ in range(30):  # the events are there (fixture `produced`): a fetch is refused, not empty
                assert not consumer.poll(timeout_ms=1000), "the producer user read events"
    finally:
        consumer.close()


# --------------------------------------------------------------------------- the app user


def test_the_app_user_is_refused_the_events_topic_and_every_write(secure, produced):
    consumer = KafkaConsumer(**kafka_config(secure.app, **{"request_timeout_ms": 10_000}))
    try:
        with pytest.raises(KafkaError, match="TopicAuthorizationFailed"):
            consumer.beginning_offsets([TopicPartition(EVENTS, 0)])
        assert consumer.partitions_for_topic(SEGMENTS)  # its own topic: described
    finally:
        consumer.close()
    for settings in ({}, {"enable_idempotence": False}):
        producer = KafkaProducer(**kafka_config(secure.app, **FAST, **settings))
        try:
            with pytest.raises(KafkaError, match="AuthorizationFailed"):
                producer.send(SEGMENTS, b"forged segment change").get(timeout=30)
        finally:
            producer.close(timeout=5)


# --------------------------------------------------------------------------- refusals


def test_a_wrong_password_is_refused_with_a_clear_error_that_does_not_show_it(secure, tmp_path, caplog):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password-" + "x" * 32 + "\n")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(KafkaRefusedError, match="refused the credentials.*invalid credentials") as err:
            produce(messages(5), secure.with_password_file(wrong), EVENTS, progress=False, producer_config=FAST)
    text = str(err.value) + repr(err.value) + caplog.text
    assert wrong.read_text().strip() not in text
    secure.assert_no_secret_in(text)
    with pytest.raises(CredentialsError, match="Kafka password file .*missing.password"):
        kafka_config(secure.with_password_file(tmp_path / "missing.password"))


def test_without_the_ca_or_in_plaintext_the_tls_port_is_refused_with_a_clear_error(secure, caplog):
    without_ca = secure.pipeline.replace(f"ssl_cafile={secure.ca}&", "")
    assert "ssl_cafile" not in without_ca
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(KafkaRefusedError, match="certificate was not verified.*CERTIFICATE_VERIFY_FAILED"):
            produce(messages(5), without_ca, EVENTS, progress=False, producer_config=FAST)
        plaintext = without_ca.split("://", 1)[1].split("@", 1)[1].split("?")[0]  # host:port of the TLS listener
        with pytest.raises(KafkaRefusedError, match="answered in TLS to a plaintext client"):
            produce(messages(5), plaintext, EVENTS, progress=False, producer_config=FAST)
    secure.assert_no_secret_in(caplog.text)


def test_the_login_probe_reads_the_brokers_own_refusal_and_accepts_the_right_login(secure, tmp_path):
    """What ``kafka_refusal`` falls back on when kafka-python logged no reason (transforms/kafka_login.py)."""
    from onboardflow.transforms.kafka_login import login_refusal

    wrong = tmp_path / "wrong.password"
    wrong.write_text("wrong-" + "z" * 40)
    refused = login_refusal(secure.with_password_file(wrong))
    assert refused and refused.startswith("SaslAuthenticationFailedError: Authentication failed") \
        and "invalid credentials with SASL mechanism SCRAM-SHA-512" in refused, refused
    for bootstrap in (secure.pipeline, secure.app, secure.producer):  # each user's own login is accepted
        assert login_refusal(bootstrap) is None
    unverified = login_refusal(secure.pipeline.replace(f"ssl_cafile={secure.ca}&", ""))
    assert unverified and "CERTIFICATE_VERIFY_FAILED" in unverified, unverified
    for text in (refused, unverified):
        assert wrong.read_text() not in text
        secure.assert_no_secret_in(text)
    # The diagnosis a failed client gets from it, with no refusal logged meanwhile:
    from kafka.errors import KafkaTimeoutError
    diagnosis = kafka_refusal(KafkaTimeoutError("Unable to bootstrap"), since=time.monotonic(),
                              bootstrap=secure.with_password_file(wrong))
    assert "Kafka refused the credentials: Authentication failed" in str(diagnosis)


def test_a_password_in_the_url_or_an_unknown_parameter_is_refused_before_connecting(secure):
    host = secure.pipeline.split("@", 1)[1].split("?")[0]
    with pytest.raises(ValueError, match="password_file= or password_env=") as err:
        kafka_settings(f"sasl_ssl://onboardflow-pipeline:hunter2-secret@{host}?ssl_cafile={secure.ca}")
    assert "hunter2-secret" not in str(err.value)
    with pytest.raises(ValueError, match="unknown parameters"):
        kafka_settings(f"sasl_ssl://u@{host}?password_file=/x&sasl_password=y")


def test_onboardflow_lag_says_in_one_line_that_kafka_refused_the_credentials(secure, tmp_path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("wrong-" + "y" * 40)
    done = subprocess.run([sys.executable, "-m", "onboardflow.runners.cli", "lag", "--bootstrap-servers",
                           secure.with_password_file(wrong), "--redis-url", "", "--timeout-ms", "20000"],
                          env={**os.environ, "OBF_RUN_DIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 1
    [line] = (done.stdout + done.stderr).strip().splitlines()
    assert "Kafka refused the credentials" in line and "invalid credentials" in line, line
    assert wrong.read_text() not in done.stdout + done.stderr
    secure.assert_no_secret_in(done.stdout + done.stderr)


def test_a_process_started_with_the_secured_settings_shows_no_secret_in_ps(secure, produced):
    port = free_port()
    env = {**os.environ, **secure.endpoints, "OBF_RUN_DIR": str(secure.run_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "onboardflow.runners.cli", "lag-exporter", "--port", str(port),
                             "--address", "127.0.0.1", "--bootstrap-servers", secure.pipeline,
                             "--redis-url", "", "--topic", EVENTS, "--timeout-ms", "5000"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as reply:
                    metrics = reply.read().decode()
                if EVENTS in metrics:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the exporter did not serve Kafka lag"
            time.sleep(0.5)
        ps = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True, check=True).stdout
        [line] = [row for row in ps.splitlines() if row.split(None, 1)[0] == str(proc.pid)]
        assert "sasl_ssl://onboardflow-pipeline@" in line  # found it, with the secured bootstrap on its command line
        secure.assert_no_secret_in(ps)
        secure.assert_no_secret_in(Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().replace("\0", " "))
        secure.assert_no_secret_in(metrics)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    secure.assert_no_secret_in(output)


def test_kafka_refusal_leaves_other_errors_alone():
    assert kafka_refusal(ValueError("not a Kafka error")) is None


# --------------------------------------------------------------------------- the Flink job


@pytest.fixture(scope="module")
def flink_cluster():
    with local_flink_cluster():
        yield


def test_the_flink_sources_table_names_the_password_file_never_the_password(secure):
    ddl = source_ddl(JobSettings({"kafka_bootstrap_servers": secure.pipeline, "kafka_topics": EVENTS,
                                  "kafka_consumer_group": "onboardflow-x", "kafka_start_position": "earliest"}))
    password_file = Path(secure.pipeline.split("password_file=")[1]).resolve()
    assert "'properties.security.protocol' = 'SASL_SSL'" in ddl
    assert f"'properties.ssl.truststore.location' = '{secure.ca.resolve()}'" in ddl
    assert f'password="${{dir:{password_file.parent}:{password_file.name}}}"' in ddl
    secure.assert_no_secret_in(ddl)


def _redis_state(prefix: str) -> tuple[dict, dict]:
    """(user key -> profile without its wall-clock field, segment -> members) under ``prefix``."""
    profiles, segments = {}, {}
    for key, content in redis_dump(REDIS_URL, prefix).items():
        kind, _, name = key.decode()[len(prefix) + 1:].partition(":")
        if kind == "profile" and isinstance(content, dict):
            profiles[name] = {k: v for k, v in decode_profile(content).items() if k != "updated_at"}
        elif kind == "segment" and isinstance(content, set):
            segments[name] = content
    return profiles, segments


@pytest.mark.flink
def test_the_flink_job_reads_over_sasl_ssl_exactly_what_it_reads_in_plaintext(secure, produced, flink_cluster,
                                                                              tmp_path, assert_same_profiles):
    """The same 300 events, once from the plaintext broker and once from the secure one as the
    pipeline user: the Flink job leaves the same profiles (up to float ulps: a visitor's events released
    to the account on identification are summed in the order they arrive) and segments, and no password
    in its logs."""
    tag = uuid.uuid4().hex[:6]
    secret_file = write_secret(tmp_path)
    plain = Deployment(f"fsec-plain-{tag}", KAFKA_BOOTSTRAP, f"fsec-plain-{tag}.events", REDIS_URL, PG_DSN,
                       secret_file)
    secured = Deployment(f"fsec-tls-{tag}", secure.pipeline, EVENTS, REDIS_URL, PG_DSN, secret_file)
    flink_flags = ("--engine=flink", "--disable_online_models")
    create_topics(KAFKA_BOOTSTRAP, {plain.events_topic: 4, **plain.topics})
    try:
        assert produce(produced, KAFKA_BOOTSTRAP, plain.events_topic, progress=False).ok
        run_to_end(plain, f"onboardflow-{plain.name}", tmp_path / "plain.log", *flink_flags,
                   f"--flink_job_name={plain.name}")
        # The secure broker's ACLs let the pipeline user write only the deployment's own topics.
        run_to_end(secured, f"onboardflow-{secured.name}", tmp_path / "secured.log", *flink_flags,
                   f"--flink_job_name={secured.name}", f"--dead_letter_topic={DLQ}",
                   f"--segment_changes_topic={SEGMENTS}", "--model_events_topic=onboarding.model-events")
        expected, got = _redis_state(plain.prefix), _redis_state(secured.prefix)
        assert len(expected[0]) >= 10
        assert_same_profiles(got[0], expected[0])
        assert got[1] == expected[1]
        secure.assert_no_secret_in((tmp_path / "secured.log").read_text(errors="replace"))
        flink_logs = Path(os.environ.get("OBF_RUN_DIR", Path(__file__).resolve().parents[2] / ".run")) / "flink"
        flink_text = "".join(p.read_text(errors="replace") for p in flink_logs.rglob("*.log"))
        # The TaskManager's Kafka clients logged their configuration: SASL_SSL, the JAAS line hidden.
        assert "security.protocol = SASL_SSL" in flink_text and "sasl.jaas.config = [hidden]" in flink_text
        secure.assert_no_secret_in(flink_text)
    finally:
        plain.cleanup()
        Deployment(secured.name, KAFKA_BOOTSTRAP, EVENTS, REDIS_URL, PG_DSN, secret_file).cleanup()
