"""The same topic through every engine, side by side (prints, never asserts): ``make bench-compare``.

One topic of ``--events`` generated events (2,000 users, ~14 days of event
time ending half a day before now, so nothing is "in the future"; 4
partitions) is produced once. Then each contender reads all of it, in a
process of its own, one after the other, each into its own Redis prefix,
warehouse schema, output topics and consumer group:

* ``loop``: a plain single-process loop over the same core functions
  (tests/benchmarks/plain_loop.py): the ceiling for this logic in Python;
* ``quix``: the peer, a Quix Streams application doing the same work through
  the same functions (tests/benchmarks/quix_app.py: state in Quix's RocksDB
  store with its changelog topic, writes at its checkpoints), run by the
  interpreter of its own virtualenv (``--quix-python``; tests/benchmarks/quix_venv.sh);
* ``flink-p1`` / ``flink-p2``: the native Flink job (pipelines/flink/),
  ``onboardflow run --engine flink --kafka_bounded``, at parallelism 1 on one
  TaskManager and at parallelism 2 on ``--flink-p2-layout`` (default two
  TaskManagers of one slot: Python runs in the TaskManager's JVM, one GIL
  per TaskManager). The benchmark runs its own Flink cluster
  (runners/flink/flink.sh, on ``--flink-rest-port``, state under
  .run/bench-engines) and restarts it for each layout;
* ``beam``: the Beam pipeline on Prism, ``onboardflow run --kafka_bounded``.

Throughput, per run: events/s from the contender's process start until it
exits. All are bounded runs that end only after every write (the
Flink and Beam jobs flush their sinks before they finish; the loop flushes
and fires every timer at the end of input, and so does the Quix
application at its last checkpoint), so the end of the process is
"Redis settled"; the number of profiles in Redis and of rows in the
warehouse's ``events`` table are printed beside it, to show that every
contender did the same work. Also: the time from process start to the
profile sink's first write (its progress marker in Redis), and the rate
after it (without start-up); CPU seconds (utime + stime from /proc, sampled every
0.5 s) of every process that works for the run: the launcher and its
children (Prism and the in-process SDK workers; Flink's client; the Quix
application's child that resolves its flags, ``settings``), and the
TaskManager and JobManager JVMs (their delta over the run); peak memory
(VmHWM) of each of those processes, the largest of a role (a TaskManager's
covers every run on that cluster). Medians of ``--repeat`` runs; ratios against the plain loop.
Online models are off (``--disable_online_models``) unless ``--models``;
identity stitching is on (the Quix peer does not stitch) unless ``--no-stitching``.

For the Flink runs, also each vertex's busy and back-pressured seconds
(Flink's task metrics, summed over its subtasks): which operator bounds the
job, JVM work included.

Latency, at each of ``--rates``: produce -> Redis p50/p99 of probe events
under live load (live_latency.py), for the Flink job (streaming, parallelism
1, stopped with a savepoint), the Beam pipeline (streaming, on Prism) and
the Quix application (streaming, stopped by SIGINT).

    python tests/benchmarks/bench_engines.py [--events 200000] [--repeat 3] [--rates 1000,2000,5000]
        [--contenders loop,quix,flink-p1,flink-p2,beam] [--skip-latency] [--models]
        [--latency-engines flink-p1,flink-p2,beam,quix] [--flink-flags=--state_backend=hashmap ...]

``--flink-flags`` passes job options to the Flink contenders only (one
string, given as ``--flink-flags=...``), to compare a setting against the
other contenders in the same run.

Needs the local services, the Flink install (runners/flink/flink.sh install)
and the Quix virtualenv (tests/benchmarks/quix_venv.sh install); ``make
bench-compare`` installs both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from bench_topics import fresh_topics, interrupt, vm_hwm_kb
from live_latency import probe_latency

from onboardflow.transforms.progress import EventTimeProgress

HERE = Path(__file__).resolve().parent
CLI = "import sys; from onboardflow.runners.cli import main; sys.exit(main())"
TICK = os.sysconf("SC_CLK_TCK")
#: What the contender's own process is (its children are named by program: prism, java, python).
ROOT_ROLE = {"loop": "loop", "quix": "quix", "beam": "launcher+sdk-workers"}


# ---- processes ----------------------------------------------------------------

def _stat(pid: int) -> Optional[tuple[int, float]]:
    """(parent pid, CPU seconds) of ``pid``, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return "?"
    program = Path(words[0]).name if words else "?"
    if "prism" in program:
        return "prism"
    if program == "java" or "python" in program or program in ("bash", "sh"):
        # Flink's client: flink.sh, which execs the CliFrontend JVM, which runs the PyFlink driver.
        text = " ".join(words)
        if "import job_settings" in text:
            return "settings"  # quix_app.py's child that resolves the flags with Beam's option classes
        if "CliFrontend" in text or (program != "java" and "flink" in text):
            return "flink-client"
        return "java" if program == "java" else "python"
    return program


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents[int(entry)] = st[0]
    found, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        found.append(p)
        frontier += [c for c, pp in parents.items() if pp == p]
    return found


class Usage:
    """CPU seconds and peak memory per process of one run, by role."""

    def __init__(self, fixed: dict[int, str]):
        # Long-lived processes (TaskManagers, JobManager): their delta over the run.
        self.fixed = fixed
        self.base = {pid: (_stat(pid) or (0, 0.0))[1] for pid in fixed}
        self.cpu: dict[int, float] = {}
        self.role: dict[int, str] = {}
        self.hwm: dict[int, int] = {}

    def sample(self, root: Optional[int], root_role: str = "launcher") -> None:
        pids = dict(self.fixed)
        if root is not None:
            for pid in _descendants(root):
                # Named at every sample: a script that execs a program keeps its pid.
                pids.setdefault(pid, root_role if pid == root else _name(pid))
        for pid, role in pids.items():
            st = _stat(pid)
            if st is None:
                continue
            self.cpu[pid] = st[1] - self.base.get(pid, 0.0)
            if role != "?" or pid not in self.role:  # an exiting process has no command line left
                self.role[pid] = role
            self.hwm[pid] = max(self.hwm.get(pid, 0), vm_hwm_kb(pid))

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self.cpu.items():
            out[self.role[pid]] = out.get(self.role[pid], 0.0) + cpu
        return out

    def peaks(self) -> dict[str, int]:
        """Peak memory (VmHWM KiB) per role: the largest process of each."""
        out: dict[str, int] = {}
        for pid, kb in self.hwm.items():
            out[self.role[pid]] = max(out.get(self.role[pid], 0), kb)
        return out



# ---- the Flink cluster ----------------------------------------------------------

class Cluster:
    """The benchmark's own Flink cluster (flink.sh with its own ports and run directory)."""

    def __init__(self, args):
        from onboardflow.runners.flink_job import FLINK_SH
        from onboardflow.runners.paths import run_dir

        self.sh = args.flink_sh or str(FLINK_SH)
        self.env = dict(os.environ, OBF_RUN_DIR=str(run_dir() / "bench-engines"),
                        FLINK_REST_PORT=str(args.flink_rest_port), FLINK_RPC_PORT=str(args.flink_rpc_port),
                        FLINK_PROMETHEUS_PORTS=args.flink_prometheus_ports)
        self.url = f"http://127.0.0.1:{args.flink_rest_port}"
        self.layout: Optional[tuple[int, int]] = None

    def up(self, taskmanagers: int, slots: int) -> None:
        if self.layout == (taskmanagers, slots):
            return
        self.down()
        env = dict(self.env, FLINK_TASKMANAGERS=str(taskmanagers), FLINK_TASK_SLOTS=str(slots),
                   FLINK_PARALLELISM=str(min(2, taskmanagers * slots)))
        subprocess.run([self.sh, "up"], env=env, check=True, stdout=subprocess.DEVNULL)
        self.layout = (taskmanagers, slots)

    def down(self) -> None:
        subprocess.run([self.sh, "down"], env=self.env, check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self.layout = None

    def busy(self) -> dict[str, tuple[float, float]]:
        """Per vertex of the running job: (busy s, back-pressured s) summed over its subtasks so far.

        Flink's ``accumulateBusyTimeMs`` / ``accumulateBackPressuredTimeMs``
        task metrics: where the job's time goes, JVM side included (which a
        Python profile of the TaskManager does not see).
        """
        import json
        import urllib.request

        def get(path: str):
            with urllib.request.urlopen(self.url + path, timeout=5) as reply:
                return json.load(reply)

        found: dict[str, tuple[float, float]] = {}
        try:
            for job in get("/jobs")["jobs"]:
                if job["status"] != "RUNNING":
                    continue
                for vertex in get(f"/jobs/{job['id']}")["vertices"]:
                    metrics = get(f"/jobs/{job['id']}/vertices/{vertex['id']}/subtasks/metrics"
                                  "?get=accumulateBusyTimeMs,accumulateBackPressuredTimeMs&agg=sum")
                    sums = {m["id"]: float(m.get("sum", 0.0)) for m in metrics}
                    found[vertex["name"]] = (sums.get("accumulateBusyTimeMs", 0.0) / 1000,
                                             sums.get("accumulateBackPressuredTimeMs", 0.0) / 1000)
        except (OSError, ValueError, KeyError):
            pass  # between jobs, or the cluster is going down: the last figures stand
        return found

    def processes(self) -> dict[int, str]:
        folder = Path(self.env["OBF_RUN_DIR"]) / "flink"
        found = {}
        for name, role in (("taskexecutor", "taskmanager"), ("standalonesession", "jobmanager")):
            f = folder / f"flink-onboardflow-{name}.pid"
            if f.is_file():
                for line in f.read_text().split():
                    if _stat(int(line)) is not None:
                        found[int(line)] = role
        return found


# ---- one run --------------------------------------------------------------------

def _flags(kind: str, args, run: str, topic: str, secret_file: str) -> list[str]:
    flags = [f"--kafka_bootstrap_servers={args.bootstrap}", f"--kafka_topics={topic}",
             f"--kafka_consumer_group=bench-{run}", f"--dead_letter_topic=bench-{run}.dlq",
             f"--segment_changes_topic=bench-{run}.changes", f"--model_events_topic=bench-{run}.models",
             f"--redis_key_prefix=bench{run}", f"--warehouse_schema=bench_{run}", f"--secret_file={secret_file}",
             "--kafka_idle_timeout=5"]
    if args.no_stitching:
        flags.append("--disable_identity_stitching")
    flags += args.flink_flags.split() if kind.startswith("flink") and args.flink_flags else []
    return flags if args.models else flags + ["--disable_online_models"]


def _command(kind: str, args, flags: list[str], run: str, streaming: bool, cluster: Cluster) -> list[str]:
    read = ["--streaming", "--kafka_start_position=earliest"] if streaming else \
        ["--kafka_bounded", "--kafka_start_position=earliest"]
    if kind == "loop":
        return [sys.executable, str(HERE / "plain_loop.py"), *read, *flags]
    if kind == "quix":
        if not Path(args.quix_python).is_file():
            raise RuntimeError(f"{args.quix_python} not found: run tests/benchmarks/quix_venv.sh install "
                               "(make bench-quix-install)")
        return [args.quix_python, str(HERE / "quix_app.py"), *read, *flags, f"--settings_python={sys.executable}",
                f"--quix_state_dir={_quix_state(cluster, run)}"]
    if kind == "beam":
        return [sys.executable, "-c", CLI, "run", *read, *flags]
    parallelism = 2 if kind == "flink-p2" else 1
    return [sys.executable, "-c", CLI, "run", "--engine", "flink", *read, *flags,
            f"--flink_rest_url={cluster.url}", f"--flink_job_name=bench-{run}",
            f"--flink_parallelism={parallelism}"]


def _quix_state(cluster: Cluster, run: str) -> Path:
    """The Quix application's state directory in ``run`` (removed by ``_cleanup``)."""
    return Path(cluster.env["OBF_RUN_DIR"]) / "quix-state" / run


def _first_write(client, prefix: str) -> bool:
    """True once the profile sink has written (it records its progress with every write)."""
    return bool(client.exists(EventTimeProgress(prefix).key))


def _count_profiles(client, prefix: str) -> int:
    return sum(1 for _ in client.scan_iter(match=f"{prefix}:profile:*", count=10_000))


def _events_rows(schema: str) -> int:
    import psycopg

    from onboardflow.pipelines.options import DEFAULT_WAREHOUSE_DSN

    try:
        with psycopg.connect(DEFAULT_WAREHOUSE_DSN, autocommit=True) as conn:
            return conn.execute(f'SELECT count(*) FROM "{schema}".events').fetchone()[0]
    except Exception:  # noqa: BLE001 - a run that created no table has no rows
        return -1


def _cleanup(client, run: str, bootstrap: str, cluster: Cluster) -> None:
    import shutil

    import psycopg

    from onboardflow.pipelines.options import DEFAULT_WAREHOUSE_DSN

    keys = list(client.scan_iter(match=f"bench{run}:*", count=10_000))
    for i in range(0, len(keys), 1000):
        client.unlink(*keys[i:i + 1000])
    with psycopg.connect(DEFAULT_WAREHOUSE_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "bench_{run}" CASCADE')
    shutil.rmtree(_quix_state(cluster, run), ignore_errors=True)


def _outputs(bootstrap: str, run: str, more: tuple = ()) -> None:
    fresh_topics(bootstrap, [*more, (f"bench-{run}.dlq", 1), (f"bench-{run}.changes", 1),
                             (f"bench-{run}.models", 1)], drop_prefix=f"bench-{run}.")


def throughput_run(kind: str, args, run: str, topic: str, secret_file: str, cluster: Cluster, client) -> dict:
    """One bounded run of ``kind``; its figures (module docstring)."""
    _outputs(args.bootstrap, run)
    flags = _flags(kind, args, run, topic, secret_file)
    usage = Usage(cluster.processes() if kind.startswith("flink") else {})
    log = open(Path(cluster.env["OBF_RUN_DIR"]) / f"{run}.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(_command(kind, args, flags, run, False, cluster), stdout=log,
                            stderr=subprocess.STDOUT)
    first = None
    code = None
    busy: dict[str, tuple[float, float]] = {}
    polled = 0.0
    while code is None:
        usage.sample(proc.pid, ROOT_ROLE.get(kind, "launcher"))
        if kind.startswith("flink") and time.monotonic() - polled >= 2.0:
            busy = cluster.busy() or busy
            polled = time.monotonic()
        if first is None and _first_write(client, f"bench{run}"):
            first = time.monotonic() - t0
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code
            break
        if time.monotonic() - t0 > args.timeout:
            proc.kill()
        time.sleep(0.5)
    seconds = time.monotonic() - t0
    usage.sample(None)
    log.close()
    if code != 0:
        raise RuntimeError(f"{kind} exited with {code}; see {log.name}")
    steady = args.events / (seconds - first) if first is not None and seconds > first else float("nan")
    result = {"kind": kind, "seconds": seconds, "rate": args.events / seconds, "first": first, "steady": steady,
              "cpu": usage.by_role(), "peaks": usage.peaks(),
              "profiles": _count_profiles(client, f"bench{run}"), "rows": _events_rows(f"bench_{run}")}
    _cleanup(client, run, args.bootstrap, cluster)
    cpu = " + ".join(f"{r} {c:.0f}s" for r, c in sorted(result["cpu"].items()) if c >= 0.5)
    peaks = ", ".join(f"{r} {kb / 1024:.0f}" for r, kb in sorted(result["peaks"].items()) if kb >= 10 * 1024)
    print(f"   {kind}: {seconds:.1f}s = {result['rate']:,.0f} events/s; first write after "
          f"{first if first is not None else float('nan'):.1f}s ({steady:,.0f} events/s after it); "
          f"CPU {cpu}; peak memory MiB by process {peaks}; "
          f"{result['profiles']:,} profiles, {result['rows']:,} event rows", flush=True)
    for vertex, (busy_s, pressured_s) in busy.items():
        print(f"     {vertex[:110]}: busy {busy_s:.1f} s, back-pressured {pressured_s:.1f} s "
              "(summed over subtasks, until 2 s before the end)", flush=True)
    return result


# ---- the table -------------------------------------------------------------------

def _table(results: dict[str, list[dict]]) -> None:
    def med(kind: str, f: Callable[[dict], float]) -> float:
        return statistics.median(f(r) for r in results[kind])

    ceiling = med("loop", lambda r: r["rate"]) if results.get("loop") else None
    print("\n| contender | events/s | × plain loop | after first write | wall s | first write s | "
          "CPU s (by process) | peak memory MiB (by process) | profiles / event rows |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    for kind, runs in results.items():
        if not runs:
            print(f"| {kind} | failed | | | | | | | |")
            continue
        rate = med(kind, lambda r: r["rate"])
        roles = sorted({role for r in runs for role in r["cpu"]})
        cpu = {role: statistics.median(r["cpu"].get(role, 0.0) for r in runs) for role in roles}
        total = sum(cpu.values())
        parts = ", ".join(f"{role} {c:.0f}" for role, c in cpu.items() if c >= 0.5)
        peaks: dict[str, int] = {}
        for r in runs:
            for role, kb in r["peaks"].items():
                peaks[role] = max(peaks.get(role, 0), kb)
        peak = ", ".join(f"{role} {kb / 1024:.0f}" for role, kb in sorted(peaks.items()) if kb >= 10 * 1024)
        first = [r["first"] for r in runs if r["first"] is not None]
        ratio = f"{rate / ceiling:.2f}" if ceiling else "-"
        print(f"| {kind} | {rate:,.0f} | {ratio} | {med(kind, lambda r: r['steady']):,.0f} | "
              f"{med(kind, lambda r: r['seconds']):.1f} | "
              f"{statistics.median(first) if first else float('nan'):.1f} | {total:.0f} ({parts}) | "
              f"{peak} | "
              f"{runs[-1]['profiles']:,} / {runs[-1]['rows']:,} |")
    print(f"(medians of {max(len(r) for r in results.values())} runs; {os.cpu_count()} cores)", flush=True)


# ---- latency --------------------------------------------------------------------

def latency_run(kind: str, rate: float, args, run: str, secret_file: str, cluster: Cluster,
                secret) -> Optional[tuple[float, float]]:
    topic = f"bench-{run}.events"
    _outputs(args.bootstrap, run, ((topic, 4),))
    flags = _flags(kind, args, run, topic, secret_file)
    log = open(Path(cluster.env["OBF_RUN_DIR"]) / f"{run}.log", "w")

    def start():
        proc = subprocess.Popen(_command(kind, args, flags, run, True, cluster), stdout=log, stderr=log,
                                start_new_session=True)

        def stop():
            interrupt(proc, group=False)  # Flink: stop with a savepoint; Beam: cancel; Quix: a last commit
            log.close()
        return stop

    startup = 40.0 if kind.startswith("flink") else 20.0
    try:
        return probe_latency(args.bootstrap, topic, f"bench{run}", secret, rate, args.seconds, start,
                             warmup=args.warmup, probe_interval=args.probe_interval, startup_s=startup, label=kind)
    finally:
        import redis

        _cleanup(redis.Redis.from_url("redis://127.0.0.1:6379/0"), run, args.bootstrap, cluster)


# ---- main -----------------------------------------------------------------------

def _produce(args, topic: str) -> None:
    from onboardflow.runners.cli.produce import produce
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.schemas.units import DAY_MS

    now = int(time.time() * 1000)
    gen = JourneyGenerator(GeneratorConfig(seed=7, users=args.users, start_ms=now - int(14.5 * DAY_MS),
                                           horizon_days=14.0, signup_window_days=7.0))
    stats = produce(gen.messages(max_messages=args.events), args.bootstrap, topic, progress=False)
    print(f"   produced {args.events:,} events of {args.users:,} users to {topic} "
          f"({dict(gen.counts)})", flush=True)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--contenders", default="loop,quix,flink-p1,flink-p2,beam")
    ap.add_argument("--flink-p2-layout", default="2x2",
                    help="TaskManagers x slots of the cluster for flink-p2 (flink-p1 runs on 1x4): the source "
                         "and decoding take one slot per partition (4), the user stage its parallelism")
    ap.add_argument("--models", action="store_true", help="online models on (default: --disable_online_models)")
    ap.add_argument("--no-stitching", action="store_true",
                    help="identity stitching off (--disable_identity_stitching): what its two keyed stages cost")
    ap.add_argument("--flink-flags", default="",
                    help="extra options for the Flink contenders' job, e.g. '--state_backend=hashmap'")
    ap.add_argument("--rates", default="1000,2000,5000")
    ap.add_argument("--latency-engines", default="flink-p1,beam,quix")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--probe-interval", type=float, default=1.0)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed")
    ap.add_argument("--quix-python", default=None,
                    help="interpreter of the Quix virtualenv (default: $OBF_CACHE_DIR/bench-quix-venv/bin/python, "
                         "made by tests/benchmarks/quix_venv.sh install)")
    ap.add_argument("--flink-sh", default=None, help="flink.sh to manage the cluster with (default: this checkout's)")
    ap.add_argument("--flink-rest-port", type=int, default=18081)
    ap.add_argument("--flink-rpc-port", type=int, default=16123)
    ap.add_argument("--flink-prometheus-ports", default="19249-19253")
    args = ap.parse_args()
    if args.quix_python is None:
        from onboardflow.runners.paths import cache_dir

        args.quix_python = str(cache_dir() / "bench-quix-venv" / "bin" / "python")

    import logging

    import redis

    from onboardflow.transforms.anonymize import SecretKey

    logging.basicConfig(level=logging.ERROR)
    run_id = time.strftime("%H%M%S")
    cluster = Cluster(args)
    folder = Path(cluster.env["OBF_RUN_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    secret = b"bench-engines-secret-0123456789abcdef"
    secret_file = folder / "secret.key"
    secret_file.write_bytes(secret)
    secret_file.chmod(0o600)
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    print(f"== bench_engines: {args.events:,} events, contenders {args.contenders}, online models "
          f"{'on' if args.models else 'off'}; real Kafka/Redis/PostgreSQL; {os.cpu_count()} cores "
          f"(figures are indicative when the machine is shared)", flush=True)
    layouts = {"flink-p1": (1, 4), "flink-p2": tuple(int(x) for x in args.flink_p2_layout.split("x"))}
    kinds = [k.strip() for k in args.contenders.split(",") if k.strip()]
    try:
        if not args.skip_throughput:
            topic = f"bench-e{run_id}.events"
            fresh_topics(args.bootstrap, [(topic, 4)], drop_prefix="bench-e")
            _produce(args, topic)
            results: dict[str, list[dict]] = {k: [] for k in kinds}
            for kind in kinds:
                if kind in layouts:
                    cluster.up(*layouts[kind])
                for i in range(args.repeat):
                    run = f"e{run_id}{kind.replace('-', '')}{i}"
                    try:
                        results[kind].append(throughput_run(kind, args, run, topic, str(secret_file), cluster,
                                                            client))
                    except Exception as error:  # noqa: BLE001 - a failed contender is reported, not fatal
                        print(f"   {kind}: failed: {error}", flush=True)
            _table(results)
        if not args.skip_latency:
            print("\n== live latency, produce -> Redis (streaming runs)", flush=True)
            rates = [float(r) for r in args.rates.split(",") if r.strip()]
            summary = []
            for kind in [k.strip() for k in args.latency_engines.split(",") if k.strip()]:
                if kind in layouts:
                    cluster.up(*layouts[kind])
                for rate in rates:
                    run = f"l{run_id}{kind.replace('-', '')}{int(rate)}"
                    try:
                        found = latency_run(kind, rate, args, run, str(secret_file), cluster, SecretKey(secret))
                    except Exception as error:  # noqa: BLE001
                        print(f"   {kind} at {rate:,.0f}/s: failed: {error}", flush=True)
                        found = None
                    summary.append((kind, rate, found))
            print("\n| contender | events/s live | p50 | p99 |\n|---|---:|---:|---:|")
            for kind, rate, found in summary:
                p50, p99 = (f"{v * 1000:,.0f} ms" for v in found) if found else ("-", "-")
                print(f"| {kind} | {rate:,.0f} | {p50} | {p99} |", flush=True)
    finally:
        cluster.down()


if __name__ == "__main__":
    main()
