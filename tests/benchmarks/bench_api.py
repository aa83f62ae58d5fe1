"""Latency of the personalization API under constant load, beside Redis itself (prints, never asserts).

    python tests/benchmarks/bench_api.py [--profiles 10000] [--rates 500,1000,2000] [--seconds 15]
        [--repeat 3] [--workers 1,2] [--unknown 0.1] [--port 8800] [--server-root ROOT]

1. ``--profiles`` profiles (tests/integration/api_service.py ``seed_profiles``:
   shaped by the core, written with the pipeline's writer) in a deployment of
   the benchmark's own (``i19bench``: Redis prefix, key files in .run/bench-api).
2. ``onboardflow serve`` in a process of its own on ``--port``, and an API key
   with ``profiles:read``; once per ``--workers`` count (`serve --workers N`),
   so one process and one per core show side by side.
3. At each rate, vegeta (built by ``make vegeta`` from the Go module proxy) sends
   ``GET /v1/profiles/{id}`` and ``GET /v1/decisions/{id}``, half each, shuffled,
   for ``--seconds``, open loop: requests go out at the rate whatever the
   replies do (vegeta adds workers as needed), so a slow reply does not hold
   the next one back and the percentiles are not flattered (no coordinated
   omission). Ids are drawn at random over the seeded users, ``--unknown`` of them
   ids with no profile (the fallback path: 404 for a profile, ``fallback: true``
   for a decision).
4. The ceiling: the same lookups straight against Redis, the profile's HGETALL
   through the same asyncio client as the service (redis-py), from a process
   of its own, open loop at the same rates: each request is sent at its
   scheduled time and timed from that time, so a client that falls behind
   shows as latency.

Per route and rate: p50 / p99 / p99.9 in ms and the error rate (replies other
than 200, or 404 for an unknown profile: timeouts, 5xx, 429), and the share
of decisions for known users answered with the fallback (Redis slower than
the service's deadline: a 200 all the same), medians of
``--repeat`` runs. The figures of every run go to .run/bench-api/report.json,
vegeta's raw results to .run/bench-api/*.bin. The target, p99 < 10 ms at
1,000 req/s, is reported, not asserted. Findings: docs/performance.md "The API".

``--server-root ROOT``: serve from the checkout at ROOT (another worktree).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from onboardflow.runners.cli.demo import _percentile
from onboardflow.runners.paths import cache_dir, run_dir
from onboardflow.tests.integration.api_service import ApiDeployment, ApiServer, seed_profiles

ROUTES = {"profiles": "GET /v1/profiles/{id}", "decisions": "GET /v1/decisions/{id}"}
CEILING = "Redis HGETALL (ceiling)"


def machine() -> str:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores{' (' + model + ')' if model else ''}, {platform.system()} {platform.release()}"


def vegeta_binary() -> str:
    found = shutil.which("vegeta") or str(cache_dir() / "bin" / "vegeta")
    if not Path(found).exists():
        raise SystemExit("vegeta not found: `make vegeta` builds it into $OBF_CACHE_DIR/bin")
    return found


def summarize(latencies_s: list[float], errors: int, total: int, seconds: float) -> dict:
    ms = sorted(v * 1000 for v in latencies_s)
    return {"requests": total, "errors": errors, "error_rate": errors / total if total else float("nan"),
            "achieved_rps": total / seconds if seconds else float("nan"),
            "p50_ms": _percentile(ms, 0.50), "p99_ms": _percentile(ms, 0.99), "p999_ms": _percentile(ms, 0.999)}


# ---------------------------------------------------------------------------------------------- the API


def drained(base_url: str, timeout_s: float = 120.0) -> float:
    """Wait until the server answers ``/healthz`` promptly three times in a row (an overloaded step's
    queue drained, so it does not spill into the next step's figures); returns the seconds waited."""
    import urllib.request

    started, prompt = time.monotonic(), 0
    while prompt < 3 and time.monotonic() - started < timeout_s:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=10) as reply:
                reply.read()
            prompt = prompt + 1 if time.monotonic() - t0 < 0.005 else 0
        except OSError:
            prompt = 0
        time.sleep(0.2)
    return time.monotonic() - started


def attack(vegeta: str, base_url: str, key: str, ids: list[tuple[str, bool]], rate: int, seconds: float,
           out: Path) -> dict[str, dict]:
    """One vegeta run at ``rate`` req/s over the shuffled ``ids`` ((user id, known)); figures per route."""
    rng = random.Random(rate)
    n = int(rate * seconds)
    targets, expected, known_urls = [], {}, set()
    for i in range(n):
        user, known = ids[rng.randrange(len(ids))]
        route = "profiles" if i % 2 == 0 else "decisions"
        url = f"{base_url}/v1/{route}/{user}"
        expected[url] = 200 if known or route == "decisions" else 404
        if known:
            known_urls.add(url)
        targets.append(json.dumps({"method": "GET", "url": url, "header": {"Authorization": [f"Bearer {key}"]}}))
    rng.shuffle(targets)
    target_file = out.with_suffix(".targets")
    target_file.write_text("\n".join(targets) + "\n")
    subprocess.run([vegeta, "attack", f"-rate={rate}/s", f"-duration={seconds}s", "-timeout=5s", "-format=json",
                    f"-targets={target_file}", f"-output={out}"], check=True)
    encoded = subprocess.run([vegeta, "encode", "--to=json", str(out)], check=True, capture_output=True,
                             text=True).stdout
    target_file.unlink()
    latencies: dict[str, list[float]] = {r: [] for r in ROUTES}
    errors, fallbacks = dict.fromkeys(ROUTES, 0), dict.fromkeys(ROUTES, 0)
    codes: dict[str, dict[int, int]] = {r: {} for r in ROUTES}
    for line in encoded.splitlines():
        result = json.loads(line)
        route = result["url"].split("/v1/", 1)[1].split("/", 1)[0]
        latencies[route].append(result["latency"] / 1e9)
        codes[route][result["code"]] = codes[route].get(result["code"], 0) + 1
        if result["code"] != expected.get(result["url"]):
            errors[route] += 1
        elif route == "decisions" and result["url"] in known_urls and \
                json.loads(base64.b64decode(result["body"]))["fallback"]:
            fallbacks[route] += 1  # a known user answered with the default: Redis was too slow
    figures = {}
    for route in ROUTES:
        figures[route] = summarize(latencies[route], errors[route], len(latencies[route]), seconds)
        figures[route]["codes"] = codes[route]
        figures[route]["known_user_fallbacks"] = fallbacks[route]
        figures[route]["fallback_rate"] = fallbacks[route] / max(1, len(latencies[route]))
    return figures


# ---------------------------------------------------------------------------------------------- Redis


def redis_open_loop(redis_url: str, keys: list[str], rate: int, seconds: float, queue) -> None:
    """HGETALL of random ``keys`` at ``rate`` per second for ``seconds``, each timed from its scheduled start,
    on uvloop when it is installed (as uvicorn runs the service)."""
    import redis.asyncio as aioredis

    async def run() -> tuple[list[float], dict[str, int], float]:
        client = aioredis.Redis.from_url(redis_url)
        await client.ping()
        rng = random.Random(rate)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        late = 0.0

        async def one(key: str, scheduled: float) -> None:
            try:
                await client.hgetall(key)
                latencies.append(time.perf_counter() - scheduled)
            except Exception as exc:  # noqa: BLE001 - counted as an error, like a failed request
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        tasks = set()
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)
            task = asyncio.create_task(one(keys[rng.randrange(len(keys))], scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        await client.aclose()
        return latencies, errors, late

    try:
        import uvloop
    except ImportError:
        queue.put(asyncio.run(run()))
    else:
        queue.put(uvloop.run(run()))


def redis_ceiling(redis_url: str, keys: list[str], rate: int, seconds: float) -> dict:
    """``redis_open_loop`` in a process of its own: its figures, as ``attack``'s per route."""
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    proc = spawn.Process(target=redis_open_loop, args=(redis_url, keys, rate, seconds, queue))
    proc.start()
    latencies, errors, late = queue.get(timeout=seconds + 120)
    proc.join()
    figures = summarize(latencies, sum(errors.values()), len(latencies) + sum(errors.values()), seconds)
    figures["errors_by_kind"] = errors
    figures["sender_late_max_ms"] = late * 1000
    return figures


# ---------------------------------------------------------------------------------------------- report


def cell(runs: list[dict]) -> str:
    med = {k: statistics.median(r.get(k, 0.0) for r in runs)
           for k in ("p50_ms", "p99_ms", "p999_ms", "error_rate", "fallback_rate")}
    text = f"{med['p50_ms']:.2f} / {med['p99_ms']:.2f} / {med['p999_ms']:.2f} ms, {med['error_rate']:.2%}"
    return text + (f" (+{med['fallback_rate']:.2%} fallback)" if med["fallback_rate"] else "")


def print_table(results: dict, rates: list[int], workers: list[int]) -> None:
    """``results[rate][label]``: runs; labels ``"<route>@<workers>"`` and ``"redis"``."""
    head = " | ".join(f"{rate:,} req/s: p50 / p99 / p99.9, errors" for rate in rates)
    print(f"\n| route | {head} |\n|---|" + "---:|" * len(rates))
    labels = [(f"{route}@{n}", f"{ROUTES[route]}, {n} worker{'s' if n > 1 else ''}")
              for n in workers for route in ROUTES] + [("redis", CEILING)]
    for label, name in labels:
        print(f"| {name} | " + " | ".join(cell(results[str(rate)][label]) for rate in rates) + " |")
    at = results.get("1000")
    if at:
        for n in workers:
            worst = max(statistics.median(r["p99_ms"] for r in at[f"{route}@{n}"]) for route in ROUTES)
            print(f"target p99 < 10 ms at 1,000 req/s, {n} worker(s): worst route p99 {worst:.2f} ms "
                  f"({'met' if worst < 10 else 'missed'}; reported, not asserted)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--profiles", type=int, default=10_000)
    ap.add_argument("--rates", default="500,1000,2000", help="requests/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each step")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", default=f"1,{os.cpu_count() or 1}",
                    help="serve --workers counts, comma-separated (default: 1 and one per core)")
    ap.add_argument("--unknown", type=float, default=0.1, help="share of ids without a profile")
    ap.add_argument("--port", type=int, default=8800)
    ap.add_argument("--deployment", default="i19bench")
    ap.add_argument("--server-root", default=None, help="serve the checkout at ROOT instead of this one")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    workers = sorted({int(n) for n in args.workers.split(",")})
    out = run_dir() / "bench-api"
    out.mkdir(parents=True, exist_ok=True)
    vegeta = vegeta_binary()
    deployment = ApiDeployment(args.deployment, out)
    deployment.clear_redis()
    deployment.api_keys_file.unlink(missing_ok=True)  # an earlier run's keys

    print(f"== bench_api: {args.profiles:,} profiles (prefix {deployment.prefix}), {args.unknown:.0%} unknown ids, "
          f"{args.seconds:.0f} s per step, medians of {args.repeat}; {machine()}", flush=True)
    users = [f"bench-user-{i:05d}" for i in range(args.profiles)]
    t0 = time.time()
    applied = seed_profiles(deployment, users)
    print(f"   seeded {applied:,} profiles in {time.time() - t0:.1f} s", flush=True)
    # Ids drawn uniformly from this list: ``--unknown`` of them have no profile.
    n_unknown = round(len(users) * args.unknown / (1 - args.unknown))
    ids = [(u, True) for u in users] + [(f"bench-unknown-{i:05d}", False) for i in range(n_unknown)]
    pseudonymizer = deployment.pseudonymizer()
    keys = [f"{deployment.prefix}:profile:{pseudonymizer.user_key(u)}" for u, _ in ids]

    results: dict[str, dict[str, list[dict]]] = {
        str(r): {**{f"{k}@{n}": [] for k in ROUTES for n in workers}, "redis": []} for r in rates}
    key = None
    try:
        for n in workers:
            server = ApiServer(deployment, args.port, package_root=args.server_root, log=out / f"serve-{n}.log",
                               args=["--rate-limit", "1000000", "--rate-burst", "1000000", "--workers", str(n)])
            try:
                server.start()
                key = key or server.create_key("bench", ["profiles:read"])
                attack(vegeta, server.url, key, ids, 100, 3, out / "warmup.bin")  # connections, caches
                for run in range(args.repeat):
                    for rate in rates:
                        drained(server.url)
                        figures = attack(vegeta, server.url, key, ids, rate, args.seconds,
                                         out / f"api-{n}w-{rate}-{run}.bin")
                        for route in ROUTES:
                            results[str(rate)][f"{route}@{n}"].append(figures[route])
                        print(f"   {n} worker(s), run {run + 1}, {rate:,} req/s: " + "; ".join(
                            f"{route} p99 {figures[route]['p99_ms']:.2f} ms" for route in ROUTES), flush=True)
            finally:
                server.stop()
        for run in range(args.repeat):
            for rate in rates:
                results[str(rate)]["redis"].append(redis_ceiling(deployment.redis_url, keys, rate, args.seconds))
                print(f"   Redis directly, run {run + 1}, {rate:,} req/s: "
                      f"p99 {results[str(rate)]['redis'][-1]['p99_ms']:.2f} ms", flush=True)
    finally:
        deployment.clear_redis()
    (out / "report.json").write_text(json.dumps(
        {"machine": machine(), "profiles": args.profiles, "unknown": args.unknown, "seconds": args.seconds,
         "rates": rates, "workers": workers, "runs": results}, indent=1))
    print_table(results, rates, workers)
    print(f"   raw figures: {out / 'report.json'}, vegeta results {out}/api-*.bin", flush=True)


if __name__ == "__main__":
    main()
