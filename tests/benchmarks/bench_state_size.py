"""State per user in Beam state, Flink keyed state, Redis and the warehouse; 10 million users projected (prints only).

One generated population (``--users`` users and their anonymous visitors,
``--events`` events over ~14 days of event time, produced to a 4-partition
topic as ``make bench-compare`` does) goes through the core in one process:
the plain loop of tests/benchmarks/plain_loop.py (decode, normalize,
anonymize, ``ProfileMachine``, and every ``--batch`` records the Flink job's
``StoreChain``: enrich, rules, ``ProfileSink`` to Redis, ``WarehouseSink``,
the outbox relays). When the input is read (the last watermark flushed, not
the end-of-input jump), every user's state is measured the way each engine
keeps it:

* Beam: ``_UserProfileFn.PROFILE_STATE`` (pipelines/beam/profile.py), one
  ``ReadModifyWriteState`` cell per user, encoded with the coder it declares
  (``FastPrimitivesCoder``) and its key with the key coder of the keyed
  ``tuple[str, dict]`` PCollection (``StrUtf8Coder``); the two event-time
  timers per user that the runner keeps beside the cell are not counted;
* Flink: the ``ValueState`` of pipelines/flink/users.py, ``Types.PICKLED_BYTE_ARRAY``
  of ``(primitive, dirty, rows)`` at rest (after a confirm tick: ``False, ()``);
* the decoded ``UserProfileState`` on the heap (tracemalloc), what a worker's
  state cache holds per cached user (Flink's ``state_cache_size``, Beam's);
* Redis (prefix ``benchmem``): ``MEMORY USAGE ... SAMPLES 0`` of every key the
  sink wrote: the profile hashes one by one, and the shared keys (segment sets,
  outbox streams and their cursors, the progress marker) divided by profiles;
  and, when ``redis-server`` is on PATH, the same hashes copied into a private
  one with ``hash-max-listpack-value 4096`` (as listpacks, a what-if: every
  hash written today has a value over the default 64 bytes, so it is a
  hashtable);
* the warehouse (schema ``bench_mem``): ``pg_total_relation_size`` per row of
  each table written.

With ``--flink``, also the RocksDB checkpoint of the native Flink job
(streaming, parallelism 1) over the same topic, on a cluster of its own
(runners/flink/flink.sh, REST ``--flink-rest-port``, state under
``.run/bench-mem``): once the job has read the topic, the state size of its
latest incremental checkpoint per key, and of its stop-with-savepoint (~5
minutes more and a JVM; off by default so ``make bench`` stays light). The
Flink virtualenv installs onboardflow from ``OBF_ROOT`` (flink.sh): run from
another checkout than the one it holds, pass ``--flink-obf-root`` (or
``BENCH_FLINK_OBF_ROOT``) naming that one, or flink.sh reinstalls it.

Prints medians and p99 per key (identified users and anonymous visitors
apart), what grows with events rather than users, and the projection to
``--project`` users, each with the visitor profiles generated per user.
Figures and their reading: docs/performance.md. Cleans up its Redis keys,
schema, topics and consumer group (``bench-mem*``) and Flink's checkpoints.

    python tests/benchmarks/bench_state_size.py [--users 2000] [--events 200000] [--flink]

Needs the local services (make services-up); ``--flink`` the Flink install.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from bench_topics import fresh_topics, interrupt
from plain_loop import PlainLoop

PREFIX = "benchmem"
SCHEMA = "bench_mem"
TOPICS = "bench-mem"
CLI = "import sys; from onboardflow.runners.cli import main; sys.exit(main())"
MIB = 1024 * 1024


# ---- figures ---------------------------------------------------------------------

def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p99, mean) of ``values`` (nearest-rank p99); NaNs for none."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, -(-99 * len(ordered) // 100) - 1))]
    return statistics.median(ordered), p99, statistics.fmean(ordered)


def human(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB / TiB with three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


# ---- the population through the core ---------------------------------------------

def _flags(args, topic: str, secret_file: Path) -> list[str]:
    return [f"--kafka_bootstrap_servers={args.bootstrap}", f"--kafka_topics={topic}",
            f"--kafka_consumer_group={TOPICS}", f"--dead_letter_topic={TOPICS}.dlq",
            f"--segment_changes_topic={TOPICS}.changes", f"--model_events_topic={TOPICS}.models",
            f"--redis_key_prefix={PREFIX}", f"--warehouse_schema={SCHEMA}", f"--secret_file={secret_file}",
            "--kafka_idle_timeout=5", "--disable_online_models"]


def produce(args, topic: str) -> None:
    from onboardflow.runners.cli.produce import produce as send
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.schemas.units import DAY_MS

    now = int(time.time() * 1000)
    gen = JourneyGenerator(GeneratorConfig(seed=7, users=args.users, start_ms=now - int(14.5 * DAY_MS),
                                           horizon_days=14.0, signup_window_days=7.0))
    send(gen.messages(max_messages=args.events), args.bootstrap, topic, progress=False)
    print(f"   produced {args.events:,} events of {args.users:,} users to {topic} ({dict(gen.counts)})", flush=True)


def run_core(args, flags: list[str]) -> tuple[PlainLoop, dict[str, bool], int]:
    """The topic through the plain loop; (the loop, identified per user_key, records read)."""
    from kafka import KafkaConsumer, TopicPartition

    from onboardflow.pipelines.flink.settings import JobSettings
    from onboardflow.runners.flink_job import job_settings
    from onboardflow.transforms.kafka.records import KafkaRecord

    s = JobSettings(job_settings([*flags, "--kafka_bounded", "--kafka_start_position=earliest"]))
    (only,) = s.bounded_ranges
    stops = {int(p): o for p, o in only["stop"].items()}
    loop = PlainLoop(s)
    identified: dict[str, bool] = {}
    anonymize = loop.anonymizer.anonymize

    def watching(event):
        route, out, extra = anonymize(event)
        if isinstance(out, dict) and "user_key" in out:
            identified[out["user_key"]] = bool(out.get("identified"))
        return route, out, extra

    loop.anonymizer.anonymize = watching
    consumer = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap_servers, enable_auto_commit=False,
                             max_poll_records=2000, fetch_max_bytes=64 * MIB)
    parts = {p: TopicPartition(only["topic"], p) for p, stop in stops.items() if stop > int(only["start"][str(p)])}
    consumer.assign(list(parts.values()))
    for p, tp in parts.items():
        consumer.seek(tp, int(only["start"][str(p)]))
    loop.chain.open()
    records = pending = 0
    try:
        while parts:
            for tp, batch in consumer.poll(timeout_ms=1000).items():
                for r in batch:
                    if tp.partition not in parts or r.offset >= stops[tp.partition]:
                        break
                    loop.record(KafkaRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value))
                    records += 1
                    pending += 1
                    if pending >= args.batch:
                        loop.flush(loop.watermark())
                        pending = 0
                    if r.offset + 1 >= stops[tp.partition]:
                        del parts[tp.partition]
                        break
        # The input read, the last watermark's timers fired: a streaming job's state at that point
        # (the end-of-input jump of a bounded run would fire every timer up to the horizon).
        loop.flush(loop.watermark())
    finally:
        loop.chain.close()
        consumer.close()
        loop.client.close()
    return loop, identified, records


# ---- engine state ---------------------------------------------------------------

def engine_state(loop: PlainLoop) -> dict[str, dict[str, int]]:
    """Per user_key: the bytes each engine keeps for it (module docstring), and its parts."""
    from apache_beam.coders import StrUtf8Coder

    from onboardflow.pipelines.beam.profile import _UserProfileFn

    cell = _UserProfileFn.PROFILE_STATE.coder
    key_coder = StrUtf8Coder()
    out = {}
    for key, state in loop.states.items():
        primitive = state.to_primitive()
        engagement, sessions, seen, context = primitive[1:5]
        out[key] = {
            "beam_value": len(cell.encode(primitive)),
            "beam_key": len(key_coder.encode(key)),
            "flink_value": len(pickle.dumps((primitive, False, ()), protocol=pickle.HIGHEST_PROTOCOL)),
            "engagement": len(cell.encode(engagement)),
            "sessions": len(cell.encode(sessions)),
            "seen": len(cell.encode(seen)),
            "context": len(cell.encode(context)),
            "events": state.engagement.events_total,
            "session_count": len(state.sessions.starts),
            "ids": len(state.seen.seen),
        }
    return out


def heap_per_state(loop: PlainLoop) -> float:
    """Mean bytes on the Python heap of one decoded ``UserProfileState`` (what a worker's cache holds)."""
    primitives = [state.to_primitive() for state in loop.states.values()]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    decoded = [loop.machine.load(p) for p in primitives]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / max(1, len(decoded))


# ---- Redis ----------------------------------------------------------------------

def redis_usage(client) -> tuple[dict[str, int], dict[str, tuple[int, int]], dict[str, int]]:
    """(bytes per profile hash by user_key, (bytes, keys) of the other keys by kind, hash encodings)."""
    profiles: dict[str, int] = {}
    shared: dict[str, tuple[int, int]] = {}
    encodings: dict[str, int] = {}
    keys = list(client.scan_iter(match=f"{PREFIX}:*", count=10_000))
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.memory_usage(key, samples=0)
            pipe.object("encoding", key)
        answers = pipe.execute()
        for key, size, encoding in zip(chunk, answers[::2], answers[1::2]):
            name = key.decode()
            kind = name.split(":")[1]
            if kind == "profile":
                profiles[name.split(":", 2)[2]] = size or 0
                encoding = encoding.decode() if encoding else "?"
                encodings[encoding] = encodings.get(encoding, 0) + 1
            else:
                kind = KINDS.get(kind, kind)
                total, count = shared.get(kind, (0, 0))
                shared[kind] = (total + (size or 0), count + 1)
    return profiles, shared, encodings


#: Redis key kinds other than the profile hashes (docs/redis-contract.md).
KINDS = {"segment": "segment sets", "outbox": "outbox streams, relay cursors", "pipeline": "progress marker",
         "dead-letters": "dead-letter ids"}


def hash_payload(client, limit: int) -> tuple[list[int], list[int], dict[str, int]]:
    """Of up to ``limit`` profile hashes: field+value bytes, fields, and how many values > 64 bytes by field.

    A hash stays a compact listpack only while every value is at most
    ``hash-max-listpack-value`` (64) bytes; one longer value makes it a hashtable.
    """
    payload, fields, long_values = [], [], {}
    for n, key in enumerate(client.scan_iter(match=f"{PREFIX}:profile:*", count=10_000)):
        if n >= limit:
            break
        content = client.hgetall(key)
        payload.append(sum(len(f) + len(v) for f, v in content.items()))
        fields.append(len(content))
        for f, v in content.items():
            if len(v) > 64:
                long_values[f.decode()] = long_values.get(f.decode(), 0) + 1
    return payload, fields, long_values


def listpack_what_if(client, limit: int, value_limit: int = 4096) -> Optional[dict[str, int]]:
    """MEMORY USAGE of up to ``limit`` profile hashes copied into a private redis-server whose
    ``hash-max-listpack-value`` is ``value_limit``, so they are listpacks; None without redis-server."""
    import socket
    import tempfile

    import redis

    server = shutil.which("redis-server")
    if server is None:
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", folder, "--hash-max-listpack-value", str(value_limit)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            other = redis.Redis(port=port)
            for _ in range(50):
                try:
                    other.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            sizes = {}
            for n, key in enumerate(client.scan_iter(match=f"{PREFIX}:profile:*", count=10_000)):
                if n >= limit:
                    break
                other.hset(key, mapping=client.hgetall(key))
                other.pexpire(key, client.pttl(key))
                sizes[key.decode().split(":", 2)[2]] = other.memory_usage(key, samples=0)
            other.close()
            return sizes
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def segment_members(client) -> int:
    return sum(client.scard(k) for k in client.scan_iter(match=f"{PREFIX}:segment:*", count=10_000))


def cleanup_redis(client) -> None:
    keys = list(client.scan_iter(match=f"{PREFIX}:*", count=10_000))
    for i in range(0, len(keys), 1000):
        client.unlink(*keys[i:i + 1000])


def drop_topics(bootstrap: str) -> None:
    """Delete this benchmark's topics and consumer group (the Flink job commits offsets to it)."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="onboardflow-bench")
    try:
        old = [name for name in admin.list_topics() if name.startswith(TOPICS)]
        if old:
            admin.delete_topics(old)
        if any(group.get("group_id") == TOPICS for group in admin.list_groups()):
            admin.delete_groups([TOPICS])
    finally:
        admin.close()


# ---- the warehouse ------------------------------------------------------------------

def warehouse_usage(dsn: str) -> list[tuple[str, int, int]]:
    """(table, rows, pg_total_relation_size) of every table the run wrote, partitions summed into their parent."""
    import psycopg

    found: dict[str, tuple[int, int]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT c.relname, coalesce(p.relname, c.relname) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_inherits i ON i.inhrelid = c.oid LEFT JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE n.nspname = %s AND c.relkind = 'r'", (SCHEMA,)).fetchall()
        for table, parent in tables:
            if parent in REFERENCE_TABLES:
                continue
            rows = conn.execute(f'SELECT count(*) FROM "{SCHEMA}"."{table}"').fetchone()[0]
            size = conn.execute("SELECT pg_total_relation_size(%s)", (f'"{SCHEMA}"."{table}"',)).fetchone()[0]
            total_rows, total_size = found.get(parent, (0, 0))
            found[parent] = (total_rows + rows, total_size + size)
    return [(table, rows, size) for table, (rows, size) in sorted(found.items()) if rows]


#: Warehouse tables that are not written per user (reference data, bookkeeping).
REFERENCE_TABLES = {"accounts", "schema_migrations"}


def cleanup_warehouse(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')


# ---- Flink: the RocksDB checkpoint of a real run -----------------------------------------

def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _newest_savepoint_bytes(folder: Path, since: float) -> Optional[int]:
    """Bytes on disk of the newest savepoint written after ``since`` (the stop-with-savepoint's), if any."""
    found = [d for d in folder.glob("savepoint-*") if d.is_dir() and d.stat().st_mtime >= since]
    if not found:
        return None
    newest = max(found, key=lambda d: d.stat().st_mtime)
    return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())


def flink_checkpoint(args, flags: list[str], records: int, client) -> Optional[dict]:
    """The native Flink job (streaming, parallelism 1) over the topic; its last checkpoint's sizes."""
    from onboardflow.runners.flink_job import FLINK_SH
    from onboardflow.runners.paths import run_dir

    folder = run_dir() / "bench-mem"
    env = dict(os.environ, OBF_RUN_DIR=str(folder), FLINK_REST_PORT=str(args.flink_rest_port),
               FLINK_RPC_PORT=str(args.flink_rpc_port), FLINK_PROMETHEUS_PORTS=args.flink_prometheus_ports,
               FLINK_TASKMANAGERS="1", FLINK_TASK_SLOTS="4", FLINK_PARALLELISM="1")
    if args.flink_obf_root:
        # The Flink virtualenv installs onboardflow from OBF_ROOT (flink.sh install_onboardflow):
        # name the checkout it already holds, so a run from another checkout does not reinstall it.
        env["OBF_ROOT"] = args.flink_obf_root
    sh = args.flink_sh or str(FLINK_SH)
    url = f"http://127.0.0.1:{args.flink_rest_port}"
    subprocess.run([sh, "up"], env=env, check=True, stdout=subprocess.DEVNULL)
    log = open(folder / "flink-job.log", "w")
    proc, result, started = None, None, time.time()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, "run", "--engine", "flink", "--streaming", "--kafka_start_position=earliest",
             *flags, f"--flink_rest_url={url}", "--flink_job_name=bench-mem", "--flink_parallelism=1",
             f"--checkpointing_interval={args.checkpoint_ms}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + args.flink_timeout
        job = None
        while job is None and time.monotonic() < deadline:
            time.sleep(2)
            running = [j for j in _get(f"{url}/jobs/overview")["jobs"]
                       if j["name"] == "bench-mem" and j["state"] == "RUNNING"]
            job = running[0]["jid"] if running else None
            if proc.poll() is not None:
                raise RuntimeError(f"the Flink launcher exited with {proc.returncode}; see {log.name}")
        if job is None:
            raise RuntimeError(f"the job did not start within {args.flink_timeout:.0f}s; see {log.name}")
        # The input read: the source emitted every record, the decoding stage read them all,
        # and the user stage has read nothing new for a while.
        seen, steady_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(2)
            counts = {v["name"]: (v["metrics"]["read-records"], v["metrics"]["write-records"])
                      for v in _get(f"{url}/jobs/{job}")["vertices"]}
            source = max((w for name, (_, w) in counts.items() if "KafkaRecords" in name), default=0)
            decoded = max((r for name, (r, _) in counts.items() if name.startswith("DecodeAndAnonymize")), default=0)
            users = max((r for name, (r, _) in counts.items() if name.startswith("UserProfiles")), default=0)
            if users != seen:
                seen, steady_since = users, time.monotonic()
            elif source >= records and decoded >= records and time.monotonic() - steady_since > 6:
                break
        else:
            raise RuntimeError(f"the job read {seen:,} elements into the user stage by the timeout")
        first = _get(f"{url}/jobs/{job}/checkpoints")["counts"]["completed"]
        while time.monotonic() < deadline:  # two checkpoints after it: the second holds everything read
            time.sleep(2)
            history = _get(f"{url}/jobs/{job}/checkpoints")
            if history["counts"]["completed"] >= first + 2:
                break
        else:
            raise RuntimeError("no two checkpoints completed before the timeout")
        latest = history["latest"]["completed"]
        details = _get(f"{url}/jobs/{job}/checkpoints/details/{latest['id']}")
        vertices = {v["id"]: v["name"] for v in _get(f"{url}/jobs/{job}")["vertices"]}
        tasks = {vertices.get(vid, vid): t for vid, t in details["tasks"].items()}
        profiles = sum(1 for _ in client.scan_iter(match=f"{PREFIX}:profile:*", count=10_000))
        result = {"profiles_in_redis": profiles, "records_in_user_stage": seen, "state_size": latest["state_size"],
                  "checkpointed_size": latest.get("checkpointed_size"),
                  "tasks": {name: t.get("state_size", 0) for name, t in tasks.items()}}
    finally:
        if proc is not None and proc.poll() is None:
            interrupt(proc)  # stop with a savepoint
        log.close()
        if result is not None:
            result["savepoint_size"] = _newest_savepoint_bytes(folder / "flink" / "savepoints", started)
        subprocess.run([sh, "down"], env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Checkpoints are retained on cancellation and savepoints kept: not by this benchmark.
        for old in (folder / "flink" / "checkpoints", folder / "flink" / "savepoints"):
            shutil.rmtree(old, ignore_errors=True)
    return result


# ---- the report -------------------------------------------------------------------

def _row(label: str, values: list[float], project: int) -> str:
    med, p99, mean = quantiles(values)
    total = mean * project
    return f"| {label} | {med:,.0f} | {p99:,.0f} | {mean:,.0f} | {human(total)} |"


@dataclass
class Measured:
    """Everything measured in one run (see the module docstring)."""

    records: int
    identified: dict[str, bool]  # user_key -> identified user (else an anonymous visitor)
    states: dict[str, dict[str, int]]  # engine_state()
    heap: float  # heap_per_state()
    profiles: dict[str, int]  # redis_usage()
    shared: dict[str, tuple[int, int]]
    encodings: dict[str, int]
    hashes: tuple[list[int], list[int], dict[str, int]]  # hash_payload()
    listpacks: Optional[dict[str, int]]  # listpack_what_if()
    members: int  # segment memberships
    tables: list[tuple[str, int, int]]  # warehouse_usage()
    flink: Optional[dict] = None  # flink_checkpoint()

    def keys(self, group: str) -> list[str]:
        if group == "all":
            return list(self.states)
        want = group == "identified"
        return [k for k in self.states if self.identified.get(k, True) == want]

    def values(self, field: str, keys: Iterable[str]) -> list[float]:
        return [self.states[k][field] for k in keys]


def report(args, m: Measured) -> None:
    """Print the tables (module docstring)."""
    keys, users = len(m.states), len(m.keys("identified"))
    print(f"\n   {m.records:,} records; {keys:,} keyed states ({users:,} identified users, {keys - users:,} "
          f"anonymous visitors); {len(m.profiles):,} profiles in Redis", flush=True)
    project = args.project
    print(f"\n| per key (bytes) | median | p99 | mean | × {project:,} keys |\n|---|---:|---:|---:|---:|")
    for group in ("all", "identified", "anonymous"):
        ks = m.keys(group)
        if not ks:
            continue
        print(_row(f"Beam cell value, {group} ({len(ks):,})", m.values("beam_value", ks), project))
        print(_row(f"Beam cell value + key, {group}",
                   [m.states[k]["beam_value"] + m.states[k]["beam_key"] for k in ks], project))
        print(_row(f"Flink ValueState value (pickled), {group}", m.values("flink_value", ks), project))
        print(_row(f"Redis profile hash (MEMORY USAGE), {group}", [m.profiles[k] for k in ks if k in m.profiles],
                   project))
        if m.listpacks:
            print(_row(f"Redis profile hash as a listpack (what-if), {group}",
                       [m.listpacks[k] for k in ks if k in m.listpacks], project))
    for part in ("engagement", "sessions", "seen", "context"):
        print(_row(f"  Beam cell part: {part}", m.values(part, m.keys("all")), project))
    print(f"| decoded state on the heap (tracemalloc), all | | | {m.heap:,.0f} | {human(m.heap * project)} |")
    for kind, (total, count) in sorted(m.shared.items()):
        print(f"| Redis {kind} ({count} keys) / profiles | | | {total / max(1, len(m.profiles)):,.0f} | "
              f"{human(total / max(1, len(m.profiles)) * project)} |")
    _redis_notes(m)
    if m.tables:
        print("\n| warehouse table | rows | bytes | bytes per row | rows per key |\n|---|---:|---:|---:|---:|")
        for table, rows, size in m.tables:
            print(f"| {table} | {rows:,} | {human(size)} | {size / rows:,.0f} | {rows / keys:.1f} |")
    if m.flink:
        _flink_lines(m.flink, keys)
    _growth(m)
    _projection(args, m)


def _redis_notes(m: Measured) -> None:
    seg_total = m.shared.get("segment sets", (0, 0))[0]
    if m.members:
        print(f"   segment memberships: {m.members:,} ({m.members / max(1, len(m.profiles)):.2f} per profile, "
              f"{seg_total / m.members:,.0f} bytes each)")
    payload, fields, long_values = m.hashes
    med, p99, _ = quantiles(payload)
    print(f"   profile hashes: encodings {m.encodings}; {statistics.median(fields):.0f} fields, field+value bytes "
          f"median {med:,.0f}, p99 {p99:,.0f}; values longer than hash-max-listpack-value (64 bytes, which "
          f"turns a hash from a listpack into a hashtable), by field: {long_values}")
    if m.listpacks:
        med, p99, mean = quantiles(list(m.listpacks.values()))
        print(f"   the same hashes as listpacks (a private redis-server, hash-max-listpack-value 4096): MEMORY USAGE "
              f"median {med:,.0f}, p99 {p99:,.0f}, mean {mean:,.0f} bytes")


def _flink_lines(flink: dict, keys: int) -> None:
    print(f"\n   Flink RocksDB checkpoint (streaming, parallelism 1, input read, {flink['profiles_in_redis']:,} "
          f"profiles in Redis): full state {human(flink['state_size'])}, last increment "
          f"{human(flink['checkpointed_size'] or 0)}; {flink['state_size'] / keys:,.0f} bytes per key")
    for name, size in flink["tasks"].items():
        if size:
            print(f"     {name[:90]}: {human(size)} ({size / keys:,.0f} bytes per key)")
    if flink.get("savepoint_size"):
        print(f"   the stop-with-savepoint after it (canonical format, every operator): "
              f"{human(flink['savepoint_size'])}, {flink['savepoint_size'] / keys:,.0f} bytes per key")


def _growth(m: Measured) -> None:
    """What grows with events: the event ids kept for dedup, the sessions kept."""
    states, keys = m.states.values(), len(m.states)
    ids = sum(s["ids"] for s in states)
    sessions = sum(s["session_count"] for s in states)
    seen_bytes = sum(s["seen"] for s in states)
    session_bytes = sum(s["sessions"] for s in states)
    events = sum(s["events"] for s in states)
    print(f"\n   grows with events: {ids:,} event ids kept for dedup ({seen_bytes / max(1, ids):.1f} bytes each in "
          f"the cell, {ids / keys:.1f} per key), {sessions:,} sessions kept ({session_bytes / max(1, sessions):.1f}"
          f" bytes each incl. the list headers, {sessions / keys:.1f} per key); {events / keys:.1f} events per "
          f"key folded in", flush=True)


def _projection(args, m: Measured) -> None:
    """``--project`` identified users, each with as many visitor profiles as generated here."""
    ident, anon = m.keys("identified"), m.keys("anonymous")
    if not ident:
        return
    ratio = len(anon) / len(ident)
    n = args.project

    def per_user(values_of: Callable[[list[str]], list[float]]) -> float:
        mean = lambda ks: statistics.fmean(values_of(ks)) if ks else 0.0  # noqa: E731
        return mean(ident) + ratio * mean(anon)

    shared_per_key = sum(total for total, _ in m.shared.values()) / max(1, len(m.profiles))
    rows = [
        ("Beam keyed state (cell value + key; timers not counted)",
         per_user(lambda ks: [m.states[k]["beam_value"] + m.states[k]["beam_key"] for k in ks])),
        ("Flink ValueState values (pickled; before RocksDB's key, overhead, compression)",
         per_user(lambda ks: m.values("flink_value", ks))),
    ]
    if m.flink:
        rows.append(("Flink RocksDB checkpoint (incremental, every operator: SST files incl. timers)",
                     m.flink["state_size"] / len(m.states) * (1 + ratio)))
        if m.flink.get("savepoint_size"):
            rows.append(("Flink savepoint, canonical (every operator)",
                         m.flink["savepoint_size"] / len(m.states) * (1 + ratio)))
    redis = per_user(lambda ks: [m.profiles.get(k, 0) for k in ks]) + shared_per_key * (1 + ratio)
    rows.append(("Redis (profile hashes as written + segment sets and the rest)", redis))
    if m.listpacks:
        listpacks = m.listpacks
        rows.append(("Redis with the hashes as listpacks (hash-max-listpack-value 4096)",
                     per_user(lambda ks: [listpacks[k] for k in ks if k in listpacks]) + shared_per_key * (1 + ratio)))
    warehouse = sum(size for _, _, size in m.tables) / len(ident)
    rows.append(("warehouse, this population's 14 days of events, snapshots, changes", warehouse))
    print(f"\n| {n:,} users ({ratio:.2f} visitor profiles each, as generated) | bytes per user | total |"
          f"\n|---|---:|---:|")
    for label, value in rows:
        print(f"| {label} | {value:,.0f} | {human(value * n)} |")
    print(f"| a worker's cache of decoded states (per cached key, not per user) | {m.heap:,.0f} | "
          f"{human(m.heap * 50_000)} per 50,000 cached |", flush=True)


# ---- main -----------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=500, help="records between two flushes of the loop")
    ap.add_argument("--sample", type=int, default=5_000, help="profile hashes to read back and copy (listpacks)")
    ap.add_argument("--project", type=int, default=10_000_000, help="users to project the figures to")
    ap.add_argument("--flink", action="store_true", help="also the RocksDB checkpoint of a real Flink run")
    ap.add_argument("--checkpoint-ms", type=int, default=5_000)
    ap.add_argument("--flink-timeout", type=float, default=600.0)
    ap.add_argument("--flink-sh", default=None, help="flink.sh to manage the cluster with (default: this checkout's)")
    ap.add_argument("--flink-obf-root", default=os.environ.get("BENCH_FLINK_OBF_ROOT"),
                    help="OBF_ROOT for flink.sh: the checkout the Flink virtualenv has installed, if not this one")
    ap.add_argument("--flink-rest-port", type=int, default=28081)
    ap.add_argument("--flink-rpc-port", type=int, default=26123)
    ap.add_argument("--flink-prometheus-ports", default="29249-29252")
    args = ap.parse_args()

    import logging

    import redis

    from onboardflow.pipelines.options import DEFAULT_WAREHOUSE_DSN
    from onboardflow.runners.paths import run_dir

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    folder = run_dir() / "bench-mem"
    folder.mkdir(parents=True, exist_ok=True)
    secret_file = folder / "secret.key"
    secret_file.write_bytes(b"bench-state-size-secret-0123456789abcdef")
    secret_file.chmod(0o600)
    topic = f"{TOPICS}.events"
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    print(f"== bench_state_size: {args.events:,} events of {args.users:,} users through the core; Redis prefix "
          f"{PREFIX}, schema {SCHEMA}; online models off", flush=True)
    cleanup_redis(client)
    cleanup_warehouse(DEFAULT_WAREHOUSE_DSN)
    specs = [(topic, 4), (f"{TOPICS}.dlq", 1), (f"{TOPICS}.changes", 1), (f"{TOPICS}.models", 1)]
    fresh_topics(args.bootstrap, specs, drop_prefix=TOPICS)
    flags = _flags(args, topic, secret_file)
    try:
        produce(args, topic)
        t0 = time.monotonic()
        loop, identified, records = run_core(args, flags)
        print(f"   core: {time.monotonic() - t0:.1f}s", flush=True)
        profiles, shared, encodings = redis_usage(client)
        measured = Measured(records, identified, engine_state(loop), heap_per_state(loop), profiles, shared,
                            encodings, hash_payload(client, args.sample), listpack_what_if(client, args.sample),
                            segment_members(client), warehouse_usage(DEFAULT_WAREHOUSE_DSN))
        if args.flink:
            cleanup_redis(client)
            cleanup_warehouse(DEFAULT_WAREHOUSE_DSN)
            try:
                measured.flink = flink_checkpoint(args, flags, records, client)
            except Exception as error:  # noqa: BLE001 - the rest of the figures stand without it
                print(f"   flink: failed: {error}", flush=True)
        report(args, measured)
    finally:
        cleanup_redis(client)
        cleanup_warehouse(DEFAULT_WAREHOUSE_DSN)
        drop_topics(args.bootstrap)


if __name__ == "__main__":
    main()
