"""`onboardflow demo` settles on the pipeline's own progress, so two runs of one seed agree (issue 13, item 5).

The demo runs in-process with a reduced size, in a deployment of its own
(``--deployment``: its own topics, Redis prefix, warehouse schema and consumer
group), so it never touches a real ``make demo``'s resources.
"""
import os
import re
import shlex
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
import redis
from kafka.admin import KafkaAdminClient

from onboardflow.runners.cli import demo
from onboardflow.runners.settings import deployment_names
from onboardflow.schemas.contract import MODEL_FIELDS
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.profile_store.encoding import decode_profile

pytestmark = [pytest.mark.integration]

#: What the online models decide: their fields, and the experiments, whose eligibility follows the track.
MODEL_DECIDED = (*MODEL_FIELDS, "experiments")
USERS = 40
DORMANCY_DAYS = 30  # the pipeline's default --dormancy_days


@pytest.fixture
def demo_name(kafka_bootstrap, redis_url, pg_dsn):
    """A ``--deployment`` of this test only; its topics, Redis keys and schema are removed after."""
    name = f"t-demo-{uuid.uuid4().hex[:8]}"
    yield name
    names = deployment_names(name)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="onboardflow-tests")
    try:
        mine = [t for t in admin.list_topics() if t.startswith(f"{name}.")]
        if mine:
            admin.delete_topics(mine)
    except Exception:  # noqa: BLE001 - cleanup must not mask the test result
        pass
    finally:
        admin.close()
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{names['redis_key_prefix']}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    finally:
        client.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{names["warehouse_schema"]}" CASCADE')


def redis_state(redis_url: str, prefix: str) -> tuple[dict, dict]:
    """(profiles by user_key without the write time and the model fields, members by segment) in Redis now."""
    client = redis.Redis.from_url(redis_url)
    try:
        profiles, segments = {}, {}
        for key in client.scan_iter(match=f"{prefix}:profile:*", count=1000):
            profile = decode_profile(client.hgetall(key))
            profile.pop("updated_at")
            for field in MODEL_DECIDED:
                profile.pop(field, None)
            profiles[key.decode().rsplit(":", 1)[1]] = profile
        for key in client.scan_iter(match=f"{prefix}:segment:*", count=1000, _type="set"):
            segments[key.decode().rsplit(":", 1)[1]] = {m.decode() for m in client.smembers(key)}
        return profiles, segments
    finally:
        client.close()


def printed_segment_table(text: str) -> list[str]:
    """The summary's "segment members in Redis" lines, as printed."""
    lines = text.splitlines()
    start = lines.index("   segment members in Redis:") + 1
    table = []
    for line in lines[start:]:
        if not re.match(r"^     \S", line):
            break
        table.append(line)
    return table


def test_a_cold_and_a_warm_demo_run_of_one_seed_print_the_same_segment_table_and_leave_the_same_profiles(
        demo_name, kafka_bootstrap, redis_url, pg_dsn, tmp_path, capsys, assert_same_profiles):
    """Cold run (nothing under the name yet), then a warm one right after, same seed and anchor.

    What "the same profiles" means: the demo's timeline is relative to an
    anchor (by default the wall clock), and a streaming pipeline fires
    event-time timers (refreshes, time marks, dormancy) as its watermark
    follows the wall clock. Two runs anchored at their own "now" would differ
    in every time field, and a timer falling between the two runs' settle
    times would differ too. So both runs get one fixed anchor, 40 days
    back: more than the 30-day dormancy after every user's last event, less
    than the 90-day state expiry, so by either run's settle time every timer
    a profile can get has fired, and nothing more comes due in between. Then
    every profile field must agree (decayed scores to 1e-9, the fold-order
    noise ``assert_same_profiles`` allows), except ``updated_at`` (the write's
    wall clock) and the online models' fields: a streaming run refits on the
    profiles written when its watermark passes a mark, which depends on how
    far it had read ahead. The live phase and the probes
    (events at the wall clock) are off. A run that declared itself settled
    early (the old pause-in-writes check) would leave users not yet dormant
    and a table that differs from the other run's.
    """
    anchor_ms = (int(time.time() * 1000) // DAY_MS - 40) * DAY_MS
    argv = ["--deployment", demo_name, "--secret-file", str(tmp_path / "pseudonym.key"),
            "--bootstrap-servers", kafka_bootstrap, "--redis-url", redis_url,
            "--warehouse-dsn", pg_dsn, "--users", str(USERS), "--events", "20000", "--seed", "13",
            "--anchor", str(anchor_ms), "--no-live", "--probes", "0", "--timeout", "300",
            "--run-dir", str(tmp_path)]
    runs = []
    for label in ("cold", "warm"):
        started = time.monotonic()
        result = demo.run_demo(demo._parse(argv))
        took = time.monotonic() - started
        out = capsys.readouterr().out
        with capsys.disabled():
            print(f"\n{label} run: {took:.0f} s; settled after {result.settled.settled_s} s, "
                  f"{result.profiles} profiles, segments {result.segments}")
        runs.append((result, out, redis_state(redis_url, result.settings.redis_key_prefix)))

    (cold, cold_out, (cold_profiles, cold_segments)), (warm, warm_out, (warm_profiles, warm_segments)) = runs
    assert "cold run: nothing of an earlier run in this deployment" in cold_out
    assert "warm run: removed an earlier run's" in warm_out
    for result, out in ((cold, cold_out), (warm, warm_out)):
        assert result.exit_code == 0, out
        settled = result.settled
        assert settled.ok and settled.missing == []
        # What it waited for: every partition at its end offset, the newest event, and a
        # watermark past every user's dormancy (the timeline ended 40 days before now).
        assert settled.partitions and all(p.committed == p.log_end for p in settled.partitions)
        assert settled.newest_event_ms is not None and anchor_ms - DAY_MS < settled.newest_event_ms <= anchor_ms
        assert settled.sink_watermark_ms >= settled.due_by_ms > anchor_ms + DORMANCY_DAYS * DAY_MS
        assert "every timer due by then has fired" in out
        # The summary counts what Redis holds.
        assert result.profiles == len(cold_profiles) > USERS / 2
        # Issue 20: visitors stitched into their accounts, the links scored against the generator's truth.
        identity = result.identity
        assert identity["retired"] > 0 and identity["links"] >= identity["retired"], identity
        assert identity["precision"] >= 0.99 and identity["recall"] >= 0.95, identity
        assert "stitched visitors" in out

    assert printed_segment_table(warm_out) == printed_segment_table(cold_out)
    assert warm.segments == cold.segments
    assert warm.identity == cold.identity
    assert {seg: len(m) for seg, m in cold_segments.items()} == {s: n for s, n in cold.segments.items() if n}
    assert warm_segments == cold_segments
    assert_same_profiles(warm_profiles, cold_profiles)
    sample = {k: v for k, v in (cold.sample_profile or {}).items() if k not in MODEL_DECIDED}
    assert sample and sample == {k: v for k, v in warm.sample_profile.items() if k not in MODEL_DECIDED}
    # Every timer had fired: 40 days after the timeline, every profile is dormant.
    assert cold.segments["dormant"] == len(cold_profiles)


def next_steps(out: str) -> list[tuple[dict, list[str]]]:
    """The `onboardflow ...` commands the demo's closing lines suggest: (environment, argv)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("== next:"))
    commands = []
    for line in lines[start + 1:]:
        words = shlex.split(line)
        env = {}
        while words and "=" in words[0] and not words[0].startswith("-"):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words and words[0] == "onboardflow":
            commands.append((env, words[1:]))
    return commands


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_decision(out: str, env: dict, serve: list[str], port: int) -> dict:
    """Start `onboardflow serve` as the demo printed it, fetch the printed curl line's URL with the
    printed key file, stop the service: the decision it served (JSON)."""
    import json
    import urllib.request

    [(key_file, url)] = re.findall(r'curl -H "Authorization: Bearer \$\(cat (\S+)\)" (http://\S+)', out)
    assert url.startswith(f"http://127.0.0.1:{port}/v1/decisions/usr-")
    assert serve[-2:] == ["--port", str(port)]
    server = subprocess.Popen([sys.executable, "-m", "onboardflow.runners.cli", *serve], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(url, headers={"Authorization": f"Bearer {open(key_file).read()}"})
                with urllib.request.urlopen(request, timeout=5) as reply:
                    return json.loads(reply.read())
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_commands_the_demo_suggests_work_as_printed(demo_name, kafka_bootstrap, redis_url, pg_dsn,
                                                         tmp_path, capsys):
    """Issue 15, item 7: after the demo, `profile <the hinted user id>`, `models list` and `lag` find its
    data, each as printed (a new process, the deployment's settings, no extra flags), with no Beam
    or runner noise on stderr. Issue 19: the demo ends with a decision served by the API, and the
    `serve` command and curl line it prints serve the same decision."""
    api_port = free_port()
    argv = ["--deployment", demo_name, "--secret-file", str(tmp_path / "pseudonym.key"),
            "--bootstrap-servers", kafka_bootstrap, "--redis-url", redis_url, "--warehouse-dsn", pg_dsn,
            "--users", "80", "--events", "40000", "--seed", "21", "--no-live", "--probes", "0",
            "--timeout", "300", "--run-dir", str(tmp_path), "--api-port", str(api_port)]
    result = demo.run_demo(demo._parse(argv))
    out = capsys.readouterr().out
    assert result.exit_code == 0, out

    commands = {words[0]: (env, words) for env, words in next_steps(out)}
    assert set(commands) == {"profile", "models", "lag", "serve"}
    served = served_decision(out, *commands.pop("serve"), api_port)
    decision = result.decision
    assert decision is not None and decision["fallback"] is False and decision["fallback_reason"] is None
    assert re.fullmatch(r"[0-9a-f]{64}", decision["user_key"]) and decision["track"] and decision["next_steps"]
    assert served["user_key"] == decision["user_key"] and served["track"] == decision["track"]
    assert served["segments"] == decision["segments"]
    # Issue 20: the summary's experiment arms are the API's decisions over the profiles in Redis.
    from onboardflow.transforms.experiments import ExperimentSet

    now_ms = int(time.time() * 1000)
    running = {e.name: {v.name for v in e.variants} for e in ExperimentSet.load() if e.is_active(now_ms)}
    arms = result.experiment_arms
    assert set(arms) == set(running) and running, arms
    for name, counts in arms.items():
        assert set(counts) <= running[name] and 0 < sum(counts.values()) <= result.profiles, (name, counts)
        assert f"experiment {name}: " in out
    for name, variant in served["experiments"].items():
        assert arms[name].get(variant, 0) >= 1
    env, profile = commands["profile"]
    assert env == {"OBF_DEPLOYMENT": demo_name}
    assert re.fullmatch(r"usr-\d{6}", profile[1])  # a real user id of the run
    ran = {}
    for name, (env, words) in commands.items():
        done = subprocess.run([sys.executable, "-m", "onboardflow.runners.cli", *words],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        ran[name] = done
        assert done.returncode == 0, (words, done.stdout, done.stderr)
        assert done.stderr == "", (words, done.stderr)
    assert "segments" in ran["profile"].stdout and "user_key" in ran["profile"].stdout
    assert "seg-000001" in ran["models"].stdout
    lag_rows = [line.split() for line in ran["lag"].stdout.splitlines() if line.startswith(f"{demo_name}.events ")]
    assert len(lag_rows) == 4 and all(row[-1] == "0" for row in lag_rows), ran["lag"].stdout
