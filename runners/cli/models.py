"""The model registry from the command line: list, show, roll back, promote, sync, prune.

    onboardflow models list     --kind segmentation
    onboardflow models show     --kind segmentation [--version seg-000003]
    onboardflow models rollback --kind segmentation [--to seg-000002] [--reason TEXT]
    onboardflow models promote  --kind segmentation [--to seg-000004] [--reason TEXT]
    onboardflow models sync     --kind segmentation
    onboardflow models prune    --kind segmentation --keep-last 20 [--keep-days 7] [--dry-run]

``list`` prints every version (oldest first) with its counts and headline
metrics, marks the served one with ``*`` and says whether the pointer is
pinned, then the pointer's moves. ``show`` prints one version (default: the
served one) without its payload bytes. ``rollback`` serves an earlier version
(default: the newest one older than the current) and pins it, so scheduled
publishes do not undo it; ``promote`` serves a version (default: the newest)
and unpins. ``sync`` rewrites the Redis serving copy from the warehouse, after
Redis lost data. ``prune`` drops the payloads of old versions from both stores
(never the served one, the newest ``--keep-last``, those the last
``--keep-last`` pointer moves served, nor with ``--keep-days`` those published
or served within that many days) and prints them;
``--dry-run`` only prints. How the registry works, and what retention keeps:
docs/models-registry.md.

Connection settings and names default to the deployment's (runners/settings.py);
the DSN is never printed. Exit status: 0
done, 1 nothing to show, 2 a refused request or an unreachable service.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from typing import Optional


def _parser() -> argparse.ArgumentParser:
    from ...models.model_registry import KINDS
    from ..settings import add_store_flags, settings

    deployment = settings()

    parser = argparse.ArgumentParser(prog="onboardflow models", description="Versioned model registry.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "list": "every version of a kind and the pointer's history",
        "show": "one version (default: the one served)",
        "rollback": "serve an earlier version and pin it there",
        "promote": "serve a version (default: the newest) and unpin",
        "sync": "rewrite the Redis serving copy from the warehouse",
        "prune": "drop the payloads of old versions (retention)",
    }
    for name, help_ in commands.items():
        cmd = sub.add_parser(name, help=help_, description=help_)
        cmd.add_argument("--kind", required=True, choices=sorted(KINDS), help="model kind")
        if name == "show":
            cmd.add_argument("--version", default=None, help="version id or number (default: the served one)")
            cmd.add_argument("--json", action="store_true", help="print JSON")
        if name in ("rollback", "promote"):
            cmd.add_argument("--to", default=None, help="version id (seg-000002) or number")
            cmd.add_argument("--reason", default="", help="why, recorded with the pointer move (no PII)")
        if name == "prune":
            cmd.add_argument("--keep-last", type=int, required=True,
                             help="keep the newest N versions, and those the last N pointer moves served (N >= 1)")
            cmd.add_argument("--keep-days", type=float, default=None,
                             help="also keep versions published or served in the last D days")
            cmd.add_argument("--dry-run", action="store_true", help="print what would be pruned, change nothing")
        add_store_flags(cmd, deployment)
    return parser


def _dated(reason: str) -> str:
    """A pointer move's reason with its event-time mark (epoch ms) as an ISO 8601 time."""
    def iso(match):
        at = dt.datetime.fromtimestamp(int(match.group(1)) / 1000, dt.timezone.utc)
        return f"mark {at:%Y-%m-%dT%H:%M:%S}Z"
    return re.sub(r"\bmark (\d{12,14})\b", iso, reason)


def _headline(metrics) -> str:
    shown = []
    for name in ("k", "silhouette", "davies_bouldin", "roc_auc", "log_loss"):
        value = metrics.get(name)
        if isinstance(value, float):
            shown.append(f"{name}={value:.3f}")
        elif value is not None and not isinstance(value, (dict, list)):
            shown.append(f"{name}={value}")
    return " ".join(shown)


def _counts(counts) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items()) if not isinstance(v, (dict, list)))


def _list(registry, kind: str) -> int:
    from ...models.model_registry import version_id

    versions = registry.versions(kind)
    if not versions:
        print(f"no {kind} versions")
        return 1
    pointer = registry.pointer(kind)
    print(f"{'':1} {'version':<12} {'created (UTC)':<19}  {'source':<8} {'bytes':>8}  counts / metrics")
    for v in versions:
        mark = "*" if pointer and pointer.version == v.number else " "
        size = "pruned" if v.pruned else v.payload_size
        print(f"{mark} {v.id:<12} {v.created_at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S}  {v.source:<8} "
              f"{size:>8}  {_counts(v.counts)}  {_headline(v.metrics)}".rstrip())
    if pointer:
        state = "pinned (publishes do not move it; `promote` unpins)" if pointer.pinned else "follows new publishes"
        print(f"\nserving {version_id(kind, pointer.version)}, {state}")
    events = registry.events(kind)
    if events:
        print("\npointer moves:")
        for e in events:
            came_from = version_id(kind, e.from_version) if e.from_version else "-"
            reason = f"  ({_dated(e.reason)})" if e.reason else ""
            print(f"  {e.at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S}  {e.action:<8} {came_from} -> "
                  f"{version_id(kind, e.to_version)}{reason}")
    return 0


def _show(registry, kind: str, version: Optional[str], as_json: bool) -> int:
    if version is None:
        pointer = registry.pointer(kind)
        if pointer is None:
            print(f"no {kind} model has been published yet", file=sys.stderr)
            return 1
        version = pointer.version
    found = registry.describe(kind, version)
    served = registry.store.current_version(kind)
    doc = {
        "id": found.id, "kind": found.kind, "version": found.number, "serving": served == found.number,
        "created_at": found.created_at.isoformat(), "source": found.source,
        "payload_sha256": found.payload_sha256, "payload_bytes": found.payload_size,
        "pruned_at": found.pruned_at.isoformat() if found.pruned else None,
        "counts": found.counts, "metrics": found.metrics,
    }
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    for key in ("id", "serving", "created_at", "source", "payload_sha256", "payload_bytes", "pruned_at"):
        if key == "pruned_at" and not found.pruned:
            continue
        print(f"{key:<15} {doc[key]}")
    for key in ("counts", "metrics"):
        print(f"{key:<15} {json.dumps(doc[key], sort_keys=True)}")
    return 0


def version_ranges(kind: str, numbers: list[int]) -> str:
    """``seg-000001..seg-000004, seg-000007`` for [1, 2, 3, 4, 7]: a first prune can name thousands."""
    from ...models.model_registry import version_id

    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(version_id(kind, a) if a == b else f"{version_id(kind, a)}..{version_id(kind, b)}"
                     for a, b in runs)


def _prune(registry, kind: str, keep_last: int, keep_days: Optional[float], dry_run: bool) -> int:
    sizes = {v.number: v.payload_size or 0 for v in registry.versions(kind)}
    pruned = registry.prune(kind, keep_last, keep_days, dry_run=dry_run)
    kept = sum(1 for n, size in sizes.items() if size and n not in pruned)
    if not pruned:
        print(f"{kind}: nothing to prune ({kept} versions keep their payload)")
        return 0
    freed = sum(sizes.get(n, 0) for n in pruned)
    verb = "would prune" if dry_run else "pruned"
    print(f"{kind}: {verb} {len(pruned)} versions ({freed} payload bytes): {version_ranges(kind, pruned)}")
    print(f"{kind}: {kept} versions {'would keep' if dry_run else 'keep'} their payload")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import psycopg
    import redis

    from ...models.model_registry import ModelRegistry, RegistryError, version_id
    try:
        with ModelRegistry(args.redis_url, args.warehouse_dsn, args.warehouse_schema,
                           args.key_prefix) as registry:
            if args.command == "list":
                return _list(registry, args.kind)
            if args.command == "show":
                return _show(registry, args.kind, args.version, args.json)
            if args.command == "sync":
                print(f"mirrored {registry.sync(args.kind)} {args.kind} versions to Redis")
                return 0
            if args.command == "prune":
                return _prune(registry, args.kind, args.keep_last, args.keep_days, args.dry_run)
            move = registry.rollback if args.command == "rollback" else registry.promote
            pointer = move(args.kind, args.to, reason=args.reason)
            pinned = " (pinned)" if pointer.pinned else ""
            print(f"{args.kind}: serving {version_id(args.kind, pointer.version)}{pinned}")
            return 0
    except RegistryError as exc:
        print(f"onboardflow models: {exc}", file=sys.stderr)
        return 2
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        print(f"onboardflow models: warehouse schema '{args.warehouse_schema}' has no registry tables, or older "
              "ones: nothing ran in this deployment yet (`make demo` fills it), or run "
              f"`onboardflow warehouse migrate --warehouse-schema {args.warehouse_schema}`", file=sys.stderr)
        return 2
    except (psycopg.OperationalError, redis.ConnectionError):
        raise  # one line from the command line's handler (runners/cli/__init__.py)
    except redis.RedisError as exc:
        print(f"onboardflow models: Redis: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
