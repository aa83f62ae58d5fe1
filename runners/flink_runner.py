"""Submit onboardflow pipelines to a Flink 2.2 cluster through Beam's Flink job server.

How a Beam Python pipeline runs on Flink (docs/flink.md has the picture):

1. the launcher (``onboardflow run --runner flink``) starts Beam's Flink job
   server from a local jar (``--flink_job_server_jar``; resolved by Maven into
   ``.cache/beam-flink-jobserver`` by ``make flink-jobserver-jar``, never
   downloaded by Beam), which translates the pipeline into a Flink job and
   submits it to the JobManager at ``--flink_master`` (its REST address);
2. each TaskManager runs the pipeline's Python code in SDK workers that it
   asks for from a worker pool (``--environment_type=EXTERNAL
   --environment_config=localhost:50000``): here ``WorkerPool`` or
   ``runners/flink/flink.sh worker-pool-up``; in production the SDK harness
   container beside each TaskManager (docker/k8s/flinkdeployment.yaml);
3. Flink checkpoints the pipeline's state (Kafka offsets, per-user state) at
   ``--checkpointing_interval`` into ``--state_backend_storage_path``; a job
   stopped with a savepoint resumes from it with ``--savepoint_path``.

``flink_argv(argv)`` is the hook ``runners/cli/run.py`` (``onboardflow run``) calls first: it
leaves other runners' argv untouched and, for ``--runner flink`` /
``--runner FlinkRunner``, adds every setting above that the caller did not
give, with the defaults below::

    onboardflow run --runner flink --flink_master localhost:8081 --secret_file key.bin

Beam's Python SDK does not declare the Flink runner's checkpoint options (the
job server does, at submission); ``FlinkCheckpointOptions`` declares them
with Beam's own names (FlinkPipelineOptions.java) so they are typed, have help
text, and are validated before anything starts.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import apache_beam as beam

from ..pipelines.options import DEFAULT_CHECKPOINTING_INTERVAL_MS
from . import paths

#: The Flink release the local cluster and the images run (runners/flink/env.sh).
FLINK_VERSION = "2.2.1"
#: The Flink minor Beam's job server is built for (FlinkRunnerOptions --flink_version).
BEAM_FLINK_MINOR = "2.2"
DEFAULT_FLINK_MASTER = "localhost:8081"
DEFAULT_WORKER_POOL_PORT = 50000
DEFAULT_JAR_CACHE = paths.cache_dir() / "beam-flink-jobserver"
DEFAULT_CHECKPOINT_DIR = paths.run_dir() / "flink" / "checkpoints"
#: The job server's entry point: proves a file is the job server, not just any jar.
JOB_SERVER_DRIVER = "org/apache/beam/runners/flink/FlinkJobServerDriver.class"

#: Every run on Flink checkpoints: without it, a restart replays Kafka from the
#: committed offsets and loses the per-user state built since.
DEFAULT_PARALLELISM = 2


class JobServerJarMissing(FileNotFoundError):
    """Beam's Flink job server jar is neither given nor in the jar cache."""


def job_server_coordinates(beam_version: str = beam.__version__, flink_minor: str = BEAM_FLINK_MINOR) -> str:
    """Maven coordinates of the job server jar: ``group:artifact:version``."""
    return f"org.apache.beam:beam-runners-flink-{flink_minor}-job-server:{beam_version}"


def cached_job_server_jar(cache_dir: Union[str, os.PathLike] = DEFAULT_JAR_CACHE,
                          beam_version: str = beam.__version__, flink_minor: str = BEAM_FLINK_MINOR) -> Path:
    """Where ``runners/flink/jobserver.sh fetch`` puts the jar."""
    return Path(cache_dir) / f"beam-runners-flink-{flink_minor}-job-server-{beam_version}.jar"


def is_job_server_jar(path: Union[str, os.PathLike]) -> bool:
    """True for a readable jar that holds Beam's FlinkJobServerDriver."""
    try:
        with zipfile.ZipFile(path) as jar:
            return JOB_SERVER_DRIVER in jar.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def resolve_job_server_jar(explicit: Optional[Union[str, os.PathLike]] = None, *,
                           cache_dir: Union[str, os.PathLike] = DEFAULT_JAR_CACHE,
                           beam_version: str = beam.__version__) -> str:
    """Path of the job server jar: ``explicit`` if given, else the cached one.

    Raises JobServerJarMissing naming the artifact and how to provide it,
    before Beam would try to download the jar itself.
    """
    coordinates = job_server_coordinates(beam_version)
    if explicit is not None:
        if not is_job_server_jar(explicit):
            raise JobServerJarMissing(
                f"--flink_job_server_jar={explicit} is not a Beam Flink job server jar "
                f"(expected {coordinates}, with {JOB_SERVER_DRIVER} inside)")
        return str(explicit)
    cached = cached_job_server_jar(cache_dir, beam_version)
    if is_job_server_jar(cached):
        return str(cached)
    raise JobServerJarMissing(
        f"Beam's Flink job server jar {coordinates} is not at {cached}. Run `make flink-jobserver-jar` "
        "to resolve it with Maven; where the Maven registry does not serve it, copy the jar there or "
        "pass --flink_job_server_jar=/path (make targets: FLINK_JOB_SERVER_JAR=/path). See docs/flink.md.")


def flink_pipeline_args(
    flink_master: str = DEFAULT_FLINK_MASTER,
    *,
    job_server_jar: str,
    parallelism: int = DEFAULT_PARALLELISM,
    max_parallelism: Optional[int] = None,
    streaming: bool = True,
    worker_pool: str = f"localhost:{DEFAULT_WORKER_POOL_PORT}",
    checkpointing_interval_ms: int = DEFAULT_CHECKPOINTING_INTERVAL_MS,
    checkpointing_mode: str = "EXACTLY_ONCE",
    state_backend: str = "rocksdb",
    checkpoint_dir: Union[str, os.PathLike] = DEFAULT_CHECKPOINT_DIR,
    savepoint_path: Optional[str] = None,
) -> list[str]:
    """The argv that runs a pipeline on the Flink cluster at ``flink_master``.

    ``checkpoint_dir`` is a local path or a URI; local paths become file://
    URIs (what Flink expects). Checkpoints are retained on cancellation so a
    cancelled job can be resumed from its last one like from a savepoint.
    """
    storage = str(checkpoint_dir)
    if "://" not in storage:
        storage = Path(storage).resolve().as_uri()
    args = [
        "--runner=FlinkRunner",
        f"--flink_master={flink_master}",
        f"--flink_version={BEAM_FLINK_MINOR}",
        f"--flink_job_server_jar={job_server_jar}",
        "--environment_type=EXTERNAL",
        f"--environment_config={worker_pool}",
        f"--parallelism={parallelism}",
        f"--checkpointing_interval={checkpointing_interval_ms}",
        f"--checkpointing_mode={checkpointing_mode}",
        f"--state_backend={state_backend}",
        f"--state_backend_storage_path={storage}",
        "--externalized_checkpoints_enabled",
        "--retain_externalized_checkpoints_on_cancellation",
        "--finish_bundle_before_checkpointing",
    ]
    if max_parallelism is not None:
        args.append(f"--max_parallelism={max_parallelism}")
    if streaming:
        args.append("--streaming")
    if savepoint_path:
        args.append(f"--savepoint_path={savepoint_path}")
    return args


def given_flags(argv: Sequence[str]) -> dict[str, Optional[str]]:
    """``--name=value`` and ``--name value`` flags of argv by name (None for bare switches)."""
    flags: dict[str, Optional[str]] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        if eq:
            flags[name] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[name] = argv[i + 1]
        else:
            flags[name] = None
    return flags


def is_flink_run(argv: Sequence[str]) -> bool:
    """True when argv asks for Beam's Flink runner (``flink`` or ``FlinkRunner``, any case)."""
    return (given_flags(argv).get("runner") or "").lower() in ("flink", "flinkrunner")


def flink_argv(argv: Sequence[str], *, jar_cache: Union[str, os.PathLike] = DEFAULT_JAR_CACHE) -> list[str]:
    """Complete a ``--runner flink`` argv with onboardflow's Flink settings.

    Returns other runners' argv unchanged. Flags the caller gave win over the
    defaults of ``flink_pipeline_args``; ``--flink_job_server_jar`` is checked
    (or found in ``jar_cache``) so a missing jar fails here, with the fix in
    the message, instead of Beam downloading one.
    """
    argv = list(argv)
    if not is_flink_run(argv):
        return argv
    given = given_flags(argv)
    jar = resolve_job_server_jar(given.get("flink_job_server_jar"), cache_dir=jar_cache)
    defaults = flink_pipeline_args(given.get("flink_master") or DEFAULT_FLINK_MASTER, job_server_jar=jar)
    if "kafka_bounded" in given:
        # With checkpointing on, Beam keeps finished sources alive forever (so
        # checkpoints can go on) and a bounded replay would never end.
        defaults.append("--shutdown_sources_after_idle_ms=0")
    return argv + [d for d in defaults if d[2:].partition("=")[0] not in given]


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class WorkerPool:
    """Beam's Python SDK worker pool as a child process (``--environment_type=EXTERNAL``).

    The pool starts one SDK worker process per request from the runner; on
    Flink the TaskManagers ask it for workers. Use as a context manager::

        with WorkerPool(port=50000) as pool:
            run(argv + [f"--environment_config={pool.address}"])

    If something already listens on ``port`` it is used as is and left
    running on exit. Workers run this interpreter (the pool finds ``python``
    on PATH, so the interpreter's directory goes first).
    """

    def __init__(self, port: int = DEFAULT_WORKER_POOL_PORT, *, log_path: Optional[Union[str, os.PathLike]] = None,
                 start_timeout_s: float = 60.0):
        self.port = port
        self.log_path = Path(log_path) if log_path else paths.run_dir() / "flink" / "worker-pool.log"
        self.start_timeout_s = start_timeout_s
        self._process: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        """Pid of the pool process started here (None when reusing another one, or stopped)."""
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={self.port}"]

    def start(self) -> "WorkerPool":
        if _port_open("127.0.0.1", self.port):
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                             cwd=paths.checkout_root() or Path.cwd(), env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while not _port_open("127.0.0.1", self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"Beam worker pool exited with {self._process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"Beam worker pool not listening on {self.port} after {self.start_timeout_s}s")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> "WorkerPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
