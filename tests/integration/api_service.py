"""The personalization API as a test or a benchmark runs it (not a test itself).

    from onboardflow.tests.integration.api_service import ApiDeployment, ApiServer, seed_profiles

* ``ApiDeployment``: a deployment of its own for the API (``OBF_DEPLOYMENT``),
  with its pseudonymization key and API keys file in a directory of the
  caller's, as the environment of the processes that serve it.
* ``seed_profiles``: profiles shaped by the core (the generator's journeys
  replayed through the profile machine, then rules and tracks), one per
  given user id, keyed by the deployment's pseudonymizer and written with
  the pipeline's own writer (``RedisProfileWriter``: the Redis layout of
  docs/redis-contract.md), their times moved to now so none is stale.
* ``ApiServer``: ``onboardflow serve`` in a process of its own (its own
  session, so it is stopped with all it started), ready once ``/readyz``
  answers 200; ``create_key`` runs ``onboardflow apikeys create`` and returns
  the key it prints once.

Used by tests/integration/test_operator_page.py and tests/benchmarks/bench_api*.py.
"""
from __future__ import annotations

import dataclasses
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from onboardflow.runners.settings import deployment_names

CLI = "import sys; from onboardflow.runners.cli import main; sys.exit(main())"
#: Profile fields holding epoch milliseconds: moved together so a template's profile is as of now.
_TIME_FIELDS = ("as_of", "first_event_at", "last_event_at", "signup_at")


@dataclasses.dataclass
class ApiDeployment:
    """A deployment of the API's own: its name, key files under ``directory``, the services' endpoints."""

    name: str
    directory: Path
    redis_url: str = "redis://127.0.0.1:6379/0"

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.secret_file.exists():
            self.secret_file.write_text(secrets.token_hex(32) + "\n")
            self.secret_file.chmod(0o600)

    @property
    def prefix(self) -> str:
        return deployment_names(self.name)["redis_key_prefix"]

    @property
    def secret_file(self) -> Path:
        return self.directory / f"{self.name}.key"

    @property
    def api_keys_file(self) -> Path:
        return self.directory / f"{self.name}.apikeys.json"

    def secret(self) -> bytes:
        from onboardflow.transforms.anonymize import load_secret

        return load_secret(self.secret_file)

    def pseudonymizer(self):
        """The deployment's ``Pseudonymizer``: raw user id -> user_key, as the pipeline and the API derive it."""
        from onboardflow.transforms.anonymize import Pseudonymizer

        return Pseudonymizer(self.secret())

    def environ(self, package_root: Optional[str] = None) -> dict[str, str]:
        """This process's environment for the deployment; ``package_root``: a checkout whose ``onboardflow``
        the child imports instead of this one (e.g. another worktree)."""
        env = dict(os.environ, OBF_DEPLOYMENT=self.name, OBF_SECRET_FILE=str(self.secret_file),
                   OBF_API_KEYS_FILE=str(self.api_keys_file), OBF_REDIS_URL=self.redis_url)
        if package_root:
            env["PYTHONPATH"] = _package_dir(package_root)
        return env

    def clear_redis(self) -> int:
        """Delete every key under the deployment's prefix; returns how many there were."""
        from onboardflow.transforms.connections import redis_client

        client = redis_client(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=5000))
            for i in range(0, len(keys), 1000):
                client.unlink(*keys[i:i + 1000])
            return len(keys)
        finally:
            client.close()


def _package_dir(root: str) -> str:
    """A directory holding ``onboardflow`` -> ``root`` (a checkout is the package itself)."""
    base = Path(tempfile.gettempdir()) / f"obf-pkg-{abs(hash(str(Path(root).resolve()))):x}"
    base.mkdir(exist_ok=True)
    link = base / "onboardflow"
    if not link.exists():
        link.symlink_to(Path(root).resolve())
    return str(base)


def template_profiles(users: int = 40, seed: int = 11) -> list[dict]:
    """The last profile of each of ``users`` generated journeys, as the pipeline would store it:
    replayed through the profile machine (runners/cli/evaluate.py), then rule segments and the track."""
    from onboardflow.models.tracks import DEFAULT_TRACKS_PATH, TrackPolicy
    from onboardflow.runners.cli.evaluate import replay_profiles
    from onboardflow.runners.sim.generator import GeneratorConfig
    from onboardflow.transforms.segment import DEFAULT_RULES_PATH, RuleSet, segment_profile

    last: dict[str, dict] = {}
    for tick in replay_profiles(GeneratorConfig(users=users, seed=seed)):
        last[tick.user_key] = tick.profile
    rules = RuleSet.load(DEFAULT_RULES_PATH)
    tracks = TrackPolicy.from_yaml(DEFAULT_TRACKS_PATH, rules)
    return [tracks.with_track(segment_profile(rules, p, p["as_of"])) for _, p in sorted(last.items())]


def seed_profiles(deployment: ApiDeployment, user_ids: Sequence[str], batch: int = 500,
                  templates: Optional[list[dict]] = None) -> int:
    """Write one profile per raw user id (``template_profiles`` in turn, times moved to now) with the
    pipeline's writer under the deployment's prefix; returns how many were applied."""
    from onboardflow.transforms.profile_store.encoding import encode_profile, now_ms
    from onboardflow.transforms.profile_store.writer import RedisProfileWriter

    templates = templates or template_profiles()
    pseudonymizer = deployment.pseudonymizer()
    now = now_ms()
    encoded = []
    for i, user_id in enumerate(user_ids):
        profile = dict(templates[i % len(templates)])
        shift = now - 60_000 - profile["as_of"]
        for name in _TIME_FIELDS:
            if profile.get(name) is not None:
                profile[name] += shift
        profile["version"] = profile["as_of"] * 1000 + profile["version"] % 1000
        profile["user_key"] = pseudonymizer.user_key(user_id)
        encoded.append(encode_profile(profile, default_updated_at=now))
    writer = RedisProfileWriter(deployment.redis_url, deployment.prefix)
    try:
        return sum(o.applied for i in range(0, len(encoded), batch) for o in writer.write(encoded[i:i + batch]))
    finally:
        writer.close()


class ApiServer:
    """``onboardflow serve --host HOST --port PORT`` for ``deployment``, in a session of its own.

    ``package_root``: a checkout whose ``onboardflow`` serves (default: the one
    this process imports); ``args``: more flags of ``serve``. Output goes to ``log``. Use as a context manager,
    or ``start()`` / ``stop()``.
    """

    def __init__(self, deployment: ApiDeployment, port: int, host: str = "127.0.0.1",
                 package_root: Optional[str] = None, log: Optional[Path] = None, args: Sequence[str] = ()) -> None:
        self.deployment, self.host, self.port, self.args = deployment, host, port, list(args)
        self.env = deployment.environ(package_root)
        self.log = Path(log) if log else deployment.directory / f"serve-{port}.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "ApiServer":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CLI, "serve", "--host", self.host, "--port", str(self.port),
                 *self.args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"onboardflow serve exited ({self.proc.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"onboardflow serve not ready on {self.url} within {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def create_key(self, name: str, scopes: Sequence[str], *extra: str) -> str:
        """``onboardflow apikeys create NAME --scopes A,B``: the plaintext key it prints once."""
        out = subprocess.run([sys.executable, "-c", CLI, "apikeys", "create", name, "--scopes", ",".join(scopes),
                              *extra], env=self.env, check=True, capture_output=True, text=True).stdout
        found = [line.strip() for line in out.splitlines() if re.fullmatch(r"obf_[0-9a-f]{12}_[\w-]{43}", line.strip())]
        if not found:
            raise RuntimeError("onboardflow apikeys create printed no key")
        return found[0]
