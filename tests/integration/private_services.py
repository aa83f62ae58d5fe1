"""Private Redis, PostgreSQL and Kafka instances for outage tests.

The outage tests stop and restart services under a running pipeline. They
must never touch the shared services of ``make services-up`` (other tests and
engineers use them), so each ``PrivateServices`` starts its own instances on
free ports with their data under a temporary directory, using the same
scripts as ``make services-up`` (runners/services/{redis,postgres,kafka}.sh)
with ``OBF_RUN_DIR`` and the port variables overridden. Data survives a
stop/start (Redis: append-only file, flushed at SHUTDOWN; PostgreSQL: its data
directory; Kafka: its log dirs), so a restart is an outage, not a wipe.

In: a base directory (default: a fresh one in /tmp). Out: the three addresses (``redis_url``, ``dsn``,
``bootstrap``) and ``stop(name)`` / ``start(name)`` / ``restart(name)``.
Kafka is started only when asked for (``with_kafka=True``): a JVM broker costs
10-20 s to start on the 2-core machine.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

SERVICES_DIR = Path(__file__).resolve().parents[2] / "runners" / "services"
PG_USER = PG_PASSWORD = PG_DATABASE = "onboardflow"


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class PrivateServices:
    """Redis, PostgreSQL and (optionally) a KRaft Kafka broker of one's own, under ``base_dir``."""

    def __init__(self, base_dir: Optional[os.PathLike] = None, with_kafka: bool = False):
        # initdb runs as the postgres OS user, which must reach its data dir
        # through every parent: pytest's and tempfile's 0700 directories will
        # not do, so by default the base is a fresh directory right in /tmp
        # (removed by down()).
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir is not None else Path(
            tempfile.mkdtemp(prefix="obf-private-services-", dir="/tmp"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        self.with_kafka = with_kafka
        self.redis_port, self.pg_port = free_port(), free_port()
        self.kafka_port, self.kafka_controller_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "OBF_RUN_DIR": str(self.base_dir),
            "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(self.redis_port),
            "PG_HOST": "127.0.0.1", "PG_PORT": str(self.pg_port),
            "PG_USER": PG_USER, "PG_PASSWORD": PG_PASSWORD, "PG_DATABASE": PG_DATABASE,
            "KAFKA_HOST": "127.0.0.1", "KAFKA_PORT": str(self.kafka_port),
            "KAFKA_CONTROLLER_PORT": str(self.kafka_controller_port),
            "KAFKA_HEAP_OPTS": "-Xms128m -Xmx512m",
        }
        self.ports = {"redis": self.redis_port, "postgres": self.pg_port, "kafka": self.kafka_port}

    # -- addresses -----------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.pg_port}/{PG_DATABASE}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    # -- lifecycle -----------------------------------------------------------------

    def _script(self, name: str, action: str, timeout_s: float = 180) -> None:
        script = SERVICES_DIR / f"{name}.sh"
        done = subprocess.run(["bash", str(script), action], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{name}.sh {action} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self, name: str) -> None:
        """Start ``name`` ("redis", "postgres", "kafka") on its private port; returns when it answers."""
        if port_open(self.ports[name]):
            raise RuntimeError(f"private {name} port {self.ports[name]} is already taken")
        self._script(name, "up")

    def stop(self, name: str) -> None:
        """Stop ``name`` (its data kept); returns when its port is closed."""
        self._script(name, "down")
        deadline = time.monotonic() + 60
        while port_open(self.ports[name]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"private {name} still listens on {self.ports[name]}")
            time.sleep(0.2)

    def restart(self, name: str, down_s: float = 0.0) -> float:
        """Stop ``name``, keep it down ``down_s`` seconds, start it again; returns the seconds it was down."""
        started = time.monotonic()
        self.stop(name)
        time.sleep(down_s)
        self.start(name)
        return time.monotonic() - started

    def up(self) -> "PrivateServices":
        self.start("redis")
        self.start("postgres")
        if self.with_kafka:
            self.start("kafka")
        return self

    def down(self) -> None:
        """Stop every instance; errors are collected so one failing stop does not leak the others."""
        errors = []
        for name in (("kafka",) if self.with_kafka else ()) + ("postgres", "redis"):
            try:
                self._script(name, "down")
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                errors.append(f"{name}: {exc}")
        if self._owns_dir and not errors:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> "PrivateServices":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc) -> Optional[bool]:
        self.down()
        return None
