"""docker/ cannot run here (no Docker engine): pin what can be checked.

The compose file and Dockerfiles must parse, use the versions the project pins
(Beam and Python in pyproject.toml, Kafka in runners/services/env.sh), and expose the
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
    return re.search(r'"apache-beam>=([0-9.]+),', (ROOT / "pyproject.toml").read_text()).group(1)


def compose():
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_compose_parses_and_runs_every_service_the_scripts_start():
    services = compose()["services"]
    assert {"kafka", "redis", "postgres", "sdk-worker-pool", "jobmanager", "taskmanager",
            "beam-job-server"} <= set(services)


def test_images_use_the_pinned_kafka_beam_and_python_versions():
    services = compose()["services"]
    assert services["kafka"]["image"] == f"apache/kafka:{env_default('KAFKA_VERSION')}"
    assert services["kafka-topics"]["image"] == services["kafka"]["image"]
    sdk_from = re.search(r"^FROM (\S+)", (DOCKER / "Dockerfile.sdk").read_text(), re.M).group(1)
    assert sdk_from == f"apache/beam_python3.11_sdk:{pinned_beam()}"
    assert 'requires-python = ">=3.11,<3.12"' in (ROOT / "pyproject.toml").read_text()
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


# ---- Flink (runners/flink/, docker/k8s/flinkdeployment.yaml) -----------------

def flink_default(name):
    text = (ROOT / "runners/flink/env.sh").read_text()
    return re.search(rf'^export {name}="\$\{{{name}:-([^}}]*)\}}"', text, re.M).group(1)


def flink_properties(service):
    """FLINK_PROPERTIES of a compose service, parsed the way Flink reads config.yaml."""
    return yaml.safe_load(compose()["services"][service]["environment"]["FLINK_PROPERTIES"])


def flink_deployment_docs():
    return list(yaml.safe_load_all((DOCKER / "k8s/flinkdeployment.yaml").read_text()))


def flink_deployment():
    return next(d for d in flink_deployment_docs() if d["kind"] == "FlinkDeployment")


def submit_job_args():
    job = next(d for d in flink_deployment_docs() if d["kind"] == "Job")
    return job["spec"]["template"]["spec"]["containers"][0]["args"]


def flink_image():
    return f"flink:{flink_default('FLINK_VERSION')}-scala_2.12-java17"


def test_compose_flink_cluster_runs_the_pinned_flink_version_with_the_scripts_settings():
    services = compose()["services"]
    assert services["jobmanager"]["image"] == services["taskmanager"]["image"] == flink_image()
    rest = flink_default("FLINK_REST_PORT")
    assert f"{rest}:{rest}" in services["jobmanager"]["ports"]
    for service in ("jobmanager", "taskmanager"):
        props = flink_properties(service)
        assert props["rest.port"] == int(rest)
        assert props["taskmanager.numberOfTaskSlots"] == int(flink_default("FLINK_TASK_SLOTS")) >= 2
        assert props["parallelism.default"] == int(flink_default("FLINK_PARALLELISM"))
        assert props["state.backend.type"] == flink_default("FLINK_STATE_BACKEND")
        assert props["execution.checkpointing.externalized-checkpoint-retention"] == "RETAIN_ON_CANCELLATION"
        assert props["execution.checkpointing.dir"].startswith("file:///flink-data/")


def test_compose_flink_metrics_are_where_prometheus_scrapes_them():
    scrape = (DOCKER / "prometheus/prometheus.yml").read_text()
    for service in ("jobmanager", "taskmanager"):
        port = flink_properties(service)["metrics.reporter.prom.port"]
        assert f'"{service}:{port}"' in scrape


def test_compose_beam_job_server_matches_the_pinned_beam_and_flink_versions_and_ports():
    server = compose()["services"]["beam-job-server"]
    assert server["image"] == f"apache/beam_flink{flink_default('BEAM_FLINK_MINOR')}_job_server:{pinned_beam()}"
    assert f"--flink-master=jobmanager:{flink_default('FLINK_REST_PORT')}" in server["command"]
    for flag, var in (("job-port", "BEAM_JOB_SERVER_PORT"), ("artifact-port", "BEAM_ARTIFACT_PORT"),
                      ("expansion-port", "BEAM_EXPANSION_PORT")):
        port = flink_default(var)
        assert f"--{flag}={port}" in server["command"] and f"{port}:{port}" in server["ports"]


def test_compose_sdk_worker_pool_sits_in_the_taskmanagers_network_like_a_sidecar():
    services = compose()["services"]
    pool_port = flink_default("BEAM_WORKER_POOL_PORT")
    assert services["sdk-worker-pool"]["network_mode"] == "service:taskmanager"
    assert f"{pool_port}:{pool_port}" in services["taskmanager"]["ports"]
    # The job server stages artifacts where the TaskManager serves them from.
    staging = "beam-artifacts:/tmp/beam-artifact-staging"
    for service in ("beam-job-server", "taskmanager", "sdk-worker-pool"):
        assert staging in services[service]["volumes"], service


def test_flink_deployment_runs_the_pinned_flink_with_the_sdk_harness_as_a_taskmanager_sidecar():
    spec = flink_deployment()["spec"]
    assert spec["image"] == flink_image()
    major, minor, _ = flink_default("FLINK_VERSION").split(".")
    assert spec["flinkVersion"] == f"v{major}_{minor}"
    containers = {c["name"]: c for c in spec["taskManager"]["podTemplate"]["spec"]["containers"]}
    assert set(containers) == {"flink-main-container", "beam-sdk-harness"}
    sidecar = containers["beam-sdk-harness"]
    assert sidecar["image"] == compose()["services"]["sdk-worker-pool"]["image"] == f"onboardflow-sdk:{pinned_beam()}"
    assert sidecar["args"] == ["--worker_pool"]
    assert sidecar["ports"][0]["containerPort"] == int(flink_default("BEAM_WORKER_POOL_PORT"))
    assert re.search(r'^CMD \["--worker_pool"\]', (DOCKER / "Dockerfile.sdk").read_text(), re.M)


def test_flink_deployment_checkpoints_with_flink2_keys_and_retains_them_on_cancellation():
    config = flink_deployment()["spec"]["flinkConfiguration"]
    assert int(config["taskmanager.numberOfTaskSlots"]) >= 2
    assert config["rest.port"] == flink_default("FLINK_REST_PORT")
    assert config["state.backend.type"] == "rocksdb"
    assert config["execution.checkpointing.externalized-checkpoint-retention"] == "RETAIN_ON_CANCELLATION"
    assert config["execution.checkpointing.dir"].startswith("s3://")
    assert not {"state.backend", "state.checkpoints.dir", "state.savepoints.dir"} & set(config)


def test_flink_deployment_submit_job_reaches_the_sidecar_and_the_job_server_jar_the_image_bakes_in():
    args = submit_job_args()
    assert args[0] == "run" and "--runner=flink" in args
    assert f"--environment_config=localhost:{flink_default('BEAM_WORKER_POOL_PORT')}" in args
    assert "--environment_type=EXTERNAL" in args
    assert f"--flink_master=onboardflow-rest:{flink_default('FLINK_REST_PORT')}" in args
    jar = f"beam-runners-flink-{flink_default('BEAM_FLINK_MINOR')}-job-server-{pinned_beam()}.jar"
    assert f"--flink_job_server_jar=/opt/beam/{jar}" in args
    launcher = (DOCKER / "Dockerfile.launcher").read_text()
    assert ("runners/flink/jobserver/pom.xml" in launcher
            and "COPY --from=flink-job-server /opt/beam/ /opt/beam/" in launcher)
    assert "--checkpointing_interval=10000" in args and "--state_backend=rocksdb" in args


def test_the_native_flink_image_builds_the_runtime_flink_sh_builds():
    """docker/Dockerfile.flink: the same apache-flink pin, constraints, connector (with its
    FLINK-31006 fix) and lib/ arrangement as runners/flink/flink.sh install."""
    image = (DOCKER / "Dockerfile.flink").read_text()
    env = (ROOT / "runners" / "flink" / "env.sh").read_text()
    connector = re.search(r'FLINK_KAFKA_CONNECTOR:-([^}]+)\}', env).group(1)
    assert f"ARG FLINK_KAFKA_CONNECTOR={connector}" in image
    assert "runners/flink/requirements.txt runners/flink/constraints.txt" in image
    assert "FLINK-31006.patch" in image and (ROOT / "runners/flink/connectors/FLINK-31006.patch").is_file()
    assert "flink-python-*.jar" in image and "FLINK_LIB_DIR=/opt/flink-lib" in image
    assert re.search(r"^FROM python:3\.11", image, re.M)
    entry = (DOCKER / "flink-entrypoint.sh").read_text()
    assert "python.execution-mode: thread" in entry
