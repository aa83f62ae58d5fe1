"""How onboardflow is configured for Flink, without a cluster.

Pins the argv `onboardflow run --runner flink` submits with (Beam's option
names, EXTERNAL SDK workers, checkpoints), the job server jar check that runs
before Beam could download one, the cluster config.yaml that flink.sh renders,
and that every place naming a Flink or Beam version agrees.
"""
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import apache_beam as beam
import pytest
import yaml
from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)

from onboardflow.pipelines.options import FlinkCheckpointOptions
from onboardflow.runners import flink_runner
from onboardflow.runners.flink_runner import (
    JobServerJarMissing,
    WorkerPool,
    flink_argv,
    flink_pipeline_args,
    is_flink_run,
    resolve_job_server_jar,
)

ROOT = Path(__file__).resolve().parents[2]


def shell_default(path, name):
    text = (ROOT / path).read_text()
    return re.search(rf'^export {name}="\$\{{{name}:-([^}}]*)\}}"', text, re.M).group(1)


def make_job_server_jar(path: Path) -> Path:
    """A jar holding the job server's driver class entry (what the check looks for)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as jar:
        jar.writestr(flink_runner.JOB_SERVER_DRIVER, b"\xca\xfe\xba\xbe")
        jar.writestr("META-INF/MANIFEST.MF", "Main-Class: org.apache.beam.runners.flink.FlinkJobServerDriver\n")
    return path


@pytest.fixture
def jar_cache(tmp_path):
    cache = tmp_path / "jars"
    make_job_server_jar(flink_runner.cached_job_server_jar(cache))
    return cache


def test_flink_args_select_the_flink_runner_with_external_sdk_workers_and_exactly_once_checkpoints():
    options = PipelineOptions(flink_pipeline_args("flink-jm:8081", job_server_jar="/jars/js.jar"))
    assert options.view_as(StandardOptions).runner == "FlinkRunner"
    assert options.view_as(StandardOptions).streaming is True
    flink = options.view_as(FlinkRunnerOptions)
    assert (flink.flink_master, flink.flink_job_server_jar, flink.flink_version, flink.parallelism) == (
        "flink-jm:8081", "/jars/js.jar", "2.2", 2)
    portable = options.view_as(PortableOptions)
    assert (portable.environment_type, portable.environment_config) == ("EXTERNAL", "localhost:50000")
    checkpoints = options.view_as(FlinkCheckpointOptions)
    assert checkpoints.checkpointing_interval == 10_000
    assert checkpoints.checkpointing_mode == "EXACTLY_ONCE"
    assert checkpoints.state_backend == "rocksdb"
    assert checkpoints.state_backend_storage_path == (ROOT / ".run/flink/checkpoints").as_uri()
    assert checkpoints.externalized_checkpoints_enabled and checkpoints.retain_externalized_checkpoints_on_cancellation
    assert checkpoints.finish_bundle_before_checkpointing
    assert checkpoints.savepoint_path is None


def test_checkpoint_options_reach_the_job_server_under_beams_own_names():
    # The portable runner sends every non-None option as beam:option:<name>:v1;
    # the job server maps these names onto FlinkPipelineOptions.
    sent = PipelineOptions(flink_pipeline_args(job_server_jar="/j.jar", savepoint_path="file:///sp/1")).get_all_options()
    for name in ("checkpointing_interval", "checkpointing_mode", "state_backend", "state_backend_storage_path",
                 "externalized_checkpoints_enabled", "retain_externalized_checkpoints_on_cancellation",
                 "finish_bundle_before_checkpointing", "savepoint_path"):
        assert sent[name] not in (None, False), name
    assert sent["savepoint_path"] == "file:///sp/1"


def test_local_checkpoint_dirs_become_file_uris_and_remote_uris_pass_through(tmp_path):
    local = PipelineOptions(flink_pipeline_args(job_server_jar="/j.jar", checkpoint_dir=tmp_path / "chk"))
    remote = PipelineOptions(flink_pipeline_args(job_server_jar="/j.jar", checkpoint_dir="s3://bucket/onboardflow"))
    assert local.view_as(FlinkCheckpointOptions).state_backend_storage_path == (tmp_path / "chk").as_uri()
    assert remote.view_as(FlinkCheckpointOptions).state_backend_storage_path == "s3://bucket/onboardflow"


def test_invalid_checkpointing_mode_is_rejected_before_anything_starts():
    with pytest.raises(SystemExit):
        PipelineOptions(["--checkpointing_mode=SOMETIMES"]).view_as(FlinkCheckpointOptions)


@pytest.mark.parametrize("argv", [
    ["--runner=flink"], ["--runner", "flink"], ["--runner=FlinkRunner"], ["--runner", "FLINK"],
])
def test_flink_is_recognised_in_every_spelling_of_the_runner_flag(argv):
    assert is_flink_run(argv + ["--secret_file=k.bin"])


def test_argv_for_other_runners_is_returned_unchanged(tmp_path):
    for argv in (["--demo_mode"], ["--runner=PrismRunner", "--streaming"], ["--runner", "DirectRunner"]):
        # No jar anywhere: other runners must not even look for one.
        assert flink_argv(argv, jar_cache=tmp_path / "empty") == argv


def test_flink_run_gets_every_setting_the_caller_did_not_give(jar_cache):
    argv = flink_argv(["--runner", "flink", "--flink_master", "10.0.0.5:8081", "--secret_file=k.bin"],
                      jar_cache=jar_cache)
    options = PipelineOptions(argv)
    assert options.view_as(FlinkRunnerOptions).flink_master == "10.0.0.5:8081"
    assert (options.view_as(FlinkRunnerOptions).flink_job_server_jar
            == str(flink_runner.cached_job_server_jar(jar_cache)))
    assert options.view_as(PortableOptions).environment_type == "EXTERNAL"
    assert options.view_as(FlinkCheckpointOptions).checkpointing_interval == 10_000
    assert argv[:5] == ["--runner", "flink", "--flink_master", "10.0.0.5:8081", "--secret_file=k.bin"]
    assert sum(a.startswith("--flink_master") for a in argv) == 1


def test_flags_the_caller_gives_win_over_the_defaults(jar_cache):
    argv = flink_argv(["--runner=FlinkRunner", "--parallelism=1", "--checkpointing_interval", "2500",
                       "--environment_config=sdk-sidecar:50000", "--state_backend=hashmap"], jar_cache=jar_cache)
    options = PipelineOptions(argv)
    assert options.view_as(FlinkRunnerOptions).parallelism == 1
    assert options.view_as(FlinkCheckpointOptions).checkpointing_interval == 2500
    assert options.view_as(FlinkCheckpointOptions).state_backend == "hashmap"
    assert options.view_as(PortableOptions).environment_config == "sdk-sidecar:50000"
    assert not any(a.startswith("--parallelism=2") or a == "--checkpointing_interval=10000" for a in argv)


def test_a_bounded_replay_on_flink_shuts_its_sources_down_when_done(jar_cache):
    bounded = PipelineOptions(flink_argv(["--runner=flink", "--kafka_bounded"], jar_cache=jar_cache))
    streaming = PipelineOptions(flink_argv(["--runner=flink"], jar_cache=jar_cache))
    assert bounded.view_as(FlinkCheckpointOptions).shutdown_sources_after_idle_ms == 0
    assert streaming.view_as(FlinkCheckpointOptions).shutdown_sources_after_idle_ms is None


def test_missing_job_server_jar_fails_naming_the_artifact_and_the_way_to_provide_it(tmp_path):
    with pytest.raises(JobServerJarMissing) as missing:
        flink_argv(["--runner=flink"], jar_cache=tmp_path / "empty")
    message = str(missing.value)
    assert f"org.apache.beam:beam-runners-flink-2.2-job-server:{beam.__version__}" in message
    assert "make flink-jobserver-jar" in message and "--flink_job_server_jar" in message
    assert "FLINK_JOB_SERVER_JAR" in message


def test_a_given_jar_that_is_not_the_job_server_is_refused(tmp_path):
    other = tmp_path / "some-other.jar"
    with zipfile.ZipFile(other, "w") as jar:
        jar.writestr("org/example/Main.class", b"")
    for candidate in (other, tmp_path / "missing.jar"):
        with pytest.raises(JobServerJarMissing, match="not a Beam Flink job server jar"):
            resolve_job_server_jar(candidate, cache_dir=tmp_path)


def test_a_given_job_server_jar_is_used_instead_of_the_cache(tmp_path, jar_cache):
    given = make_job_server_jar(tmp_path / "elsewhere" / "js.jar")
    argv = flink_argv(["--runner=flink", f"--flink_job_server_jar={given}"], jar_cache=jar_cache)
    assert PipelineOptions(argv).view_as(FlinkRunnerOptions).flink_job_server_jar == str(given)


def test_worker_pool_starts_sdk_workers_with_the_launching_interpreter():
    pool = WorkerPool(port=50123)
    assert pool.command() == [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                              "--service_port=50123"]
    assert pool.address == "localhost:50123"


def rendered_cluster_config(**overrides) -> dict:
    """config.yaml as flink.sh renders it (envsubst of the template) with env.sh defaults."""
    values = {name: shell_default("runners/flink/env.sh", name) for name in (
        "FLINK_HOST", "FLINK_RPC_PORT", "FLINK_JM_MEMORY", "FLINK_TASK_SLOTS", "FLINK_TM_MEMORY",
        "FLINK_PARALLELISM", "FLINK_REST_PORT", "FLINK_STATE_BACKEND", "FLINK_PROMETHEUS_PORTS")}
    values.update(FLINK_CHECKPOINT_DIR="/r/flink/checkpoints", FLINK_SAVEPOINT_DIR="/r/flink/savepoints",
                  FLINK_RUN_DIR="/r/flink", FLINK_VENV="/c/flink-venv", **overrides)
    template = (ROOT / "runners/flink/config.yaml.template").read_text()
    return yaml.safe_load(re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], template))


def test_flink_sh_substitutes_every_placeholder_of_the_config_template():
    template = (ROOT / "runners/flink/config.yaml.template").read_text()
    script = (ROOT / "runners/flink/flink.sh").read_text()
    substituted = set(re.findall(r"\$\{(\w+)\}", re.search(r"envsubst '([^']+)'", script).group(1)))
    assert set(re.findall(r"\$\{(\w+)\}", template)) == substituted


def test_cluster_config_has_two_or_more_slots_rest_on_the_configured_port_and_checkpoint_dirs():
    config = rendered_cluster_config()
    assert config["taskmanager.numberOfTaskSlots"] >= 2
    assert config["taskmanager.numberOfTaskSlots"] >= config["parallelism.default"] >= 2
    assert config["rest.port"] == 8081 and config["rest.bind-address"] == "127.0.0.1"
    assert config["state.backend.type"] in ("rocksdb", "hashmap")
    assert config["execution.checkpointing.dir"] == "file:///r/flink/checkpoints"
    assert config["execution.checkpointing.savepoint-dir"] == "file:///r/flink/savepoints"
    assert config["execution.checkpointing.externalized-checkpoint-retention"] == "RETAIN_ON_CANCELLATION"
    assert config["python.executable"] == "/c/flink-venv/bin/python"
    assert rendered_cluster_config(FLINK_REST_PORT="18081")["rest.port"] == 18081


def test_cluster_config_uses_flink2_keys_only():
    # Flink 2 dropped these (and flink-conf.yaml); a stale key would be ignored silently.
    legacy = {"state.backend", "state.checkpoints.dir", "state.savepoints.dir", "state.checkpoint-storage"}
    assert not legacy & set(rendered_cluster_config())
    assert not (ROOT / "runners/flink/flink-conf.yaml").exists()


def test_flink_and_beam_versions_agree_everywhere():
    flink = shell_default("runners/flink/env.sh", "FLINK_VERSION")
    assert flink == flink_runner.FLINK_VERSION
    assert f"apache-flink=={flink}" in (ROOT / "runners/flink/requirements.txt").read_text().splitlines()
    assert (flink.rsplit(".", 1)[0] == flink_runner.BEAM_FLINK_MINOR
            == shell_default("runners/flink/env.sh", "BEAM_FLINK_MINOR"))
    assert flink_runner.BEAM_FLINK_MINOR in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS

    makefile_beam = re.search(r"^BEAM_VERSION\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    pom = (ROOT / "runners/flink/jobserver/pom.xml").read_text()
    assert makefile_beam == beam.__version__ == shell_default("runners/services/env.sh", "BEAM_VERSION")
    assert re.search(r"<beam.version>([^<]+)</beam.version>", pom).group(1) == makefile_beam
    assert re.search(r"<beam.flink.minor>([^<]+)</beam.flink.minor>", pom).group(1) == flink_runner.BEAM_FLINK_MINOR
    assert "beam-runners-flink-${beam.flink.minor}-job-server" in pom


def test_worker_pool_and_job_server_ports_match_the_python_defaults():
    assert int(shell_default("runners/flink/env.sh", "BEAM_WORKER_POOL_PORT")) == flink_runner.DEFAULT_WORKER_POOL_PORT
    assert flink_runner.DEFAULT_FLINK_MASTER.endswith(":" + shell_default("runners/flink/env.sh", "FLINK_REST_PORT"))


def run_jobserver_sh(command, tmp_path, **env):
    return subprocess.run([str(ROOT / "runners/flink/jobserver.sh"), command], capture_output=True, text=True,
                          env={**os.environ, "OBF_CACHE_DIR": str(tmp_path / "cache"),
                               "OBF_RUN_DIR": str(tmp_path / "run"), **env}, timeout=30)


def test_jobserver_script_accepts_a_given_job_server_jar_and_refuses_other_jars(tmp_path):
    good = make_job_server_jar(tmp_path / "given" / "js.jar")
    accepted = run_jobserver_sh("path", tmp_path, FLINK_JOB_SERVER_JAR=str(good))
    assert accepted.returncode == 0 and accepted.stdout.strip() == str(good)

    other = tmp_path / "other.jar"
    with zipfile.ZipFile(other, "w") as jar:
        jar.writestr("org/example/Main.class", b"")
    refused = run_jobserver_sh("fetch", tmp_path, FLINK_JOB_SERVER_JAR=str(other))
    assert refused.returncode != 0 and "is not a Beam Flink job server jar" in refused.stderr


def test_jobserver_script_path_says_how_to_get_the_jar_when_the_cache_is_empty(tmp_path):
    missing = run_jobserver_sh("path", tmp_path, FLINK_JOB_SERVER_JAR="")
    assert missing.returncode != 0
    assert "make flink-jobserver-jar" in missing.stderr
    assert f"beam-runners-flink-2.2-job-server-{beam.__version__}.jar" in missing.stderr
