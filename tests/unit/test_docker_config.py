"""docker/ cannot run here (no Docker engine): pin what can be checked.

The compose file and Dockerfiles must parse, use the versions the project pins
(Beam and Python in setup.py, Kafka in runners/services/env.sh), and expose the
ports and topics the scripts use, so the two ways of running stay in step.
"""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def env_default(name):
    text = (ROOT / "runners/services/env.sh").read_text()
    return re.search(rf'^export {name}="\$\{{{name}:-([^}}]*)\}}"', text, re.M).group(1)


def pinned_beam():
    return re.search(r'"apache-beam>=([0-9.]+),', (ROOT / "setup.py").read_text()).group(1)


def compose():
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_compose_parses_and_runs_every_service_the_scripts_start():
    services = compose()["services"]
    assert {"kafka", "redis", "postgres", "sdk-worker-pool"} <= set(services)


def test_images_use_the_pinned_kafka_beam_and_python_versions():
    services = compose()["services"]
    assert services["kafka"]["image"] == f"apache/kafka:{env_default('KAFKA_VERSION')}"
    assert services["kafka-topics"]["image"] == services["kafka"]["image"]
    sdk_from = re.search(r"^FROM (\S+)", (DOCKER / "Dockerfile.sdk").read_text(), re.M).group(1)
    assert sdk_from == f"apache/beam_python3.11_sdk:{pinned_beam()}"
    assert 'python_requires=">=3.11,<3.12"' in (ROOT / "setup.py").read_text()
    assert re.search(r"^FROM python:3\.11", (DOCKER / "Dockerfile.launcher").read_text(), re.M)


def test_ports_match_the_scripts_defaults():
    services = compose()["services"]
    for service, var in (("kafka", "KAFKA_PORT"), ("redis", "REDIS_PORT"), ("postgres", "PG_PORT")):
        port = env_default(var)
        assert f"{port}:{port}" in services[service]["ports"], service


def test_compose_creates_the_same_topics_with_the_same_partitions_as_the_scripts():
    command = " ".join(compose()["services"]["kafka-topics"]["command"])
    assert re.search(r"for spec in ([^;]+);", command).group(1).split() == env_default("KAFKA_TOPICS").split()


def test_postgres_credentials_match_the_scripts():
    env = compose()["services"]["postgres"]["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == (
        env_default("PG_USER"), env_default("PG_PASSWORD"), env_default("PG_DATABASE"))
