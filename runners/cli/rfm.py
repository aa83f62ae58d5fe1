"""`onboardflow rfm refresh`: the RFM population reference, computed from the profile store and published.

    onboardflow rfm refresh [--min-buyers 5] [--every SECONDS]

Reads every profile the deployment's Redis profile store holds (``ProfileSweep``,
the population the online segmenter is refitted on), fits the quintile
boundaries of recency, frequency and monetary value over the buyers among them
(models/rfm_reference.py) and publishes them as a version of the registry kind
``rfm`` (JSON; ``onboardflow models list --kind rfm`` lists them, ``models
rollback --kind rfm`` serves an older one). The pipeline's RFM step on every
worker, in both engines, picks the new version up within
``--model_refresh_seconds`` and scores each profile on its next update.

Why the profile store and not the warehouse's profile snapshots: it holds
exactly the live population, one current profile per user, which is what the
scores rank a user against; the snapshots are history (every version of every
profile, including users whose state expired) and would need a newest-per-user
query over all of it. Publishing is idempotent: the same population gives the
same payload, hence the same version (the registry identifies versions by the
payload's SHA-256), so a retried or periodic refresh over an unchanged store
creates nothing. ``--every`` repeats the refresh until interrupted (a cron job
does the same). Fewer than ``--min-buyers`` buyers: nothing is published.

Exit status: 0 published (or already current), 1 too few buyers, 2 a refused
request or an unreachable service. docs/rfm.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import NamedTuple, Optional

from ...models.rfm_reference import MIN_POPULATION, RFM_KIND, RfmReference, fit_reference


class Refreshed(NamedTuple):
    """One refresh: the profiles read, the reference fitted (None: too few buyers), its version id, new or not."""

    profiles: int
    reference: Optional[RfmReference]
    created: bool


def refresh_reference(redis_url: str, warehouse_dsn: str, warehouse_schema: str, key_prefix: str,
                      min_population: int = MIN_POPULATION, reason: str = "rfm refresh") -> Refreshed:
    """Fit the reference on the profile store's population and publish it (module docstring)."""
    from ...models.model_registry import ModelRegistry
    from ...transforms.rescore import ProfileSweep

    sweep = ProfileSweep(redis_url, key_prefix)
    try:
        population = sweep.population()
    finally:
        sweep.close()
    reference = fit_reference(population, min_population)
    if reference is None:
        return Refreshed(len(population), None, False)
    with ModelRegistry(redis_url, warehouse_dsn, warehouse_schema, key_prefix) as registry:
        result = registry.publish(RFM_KIND, reference.to_json(), counts={"profiles": len(population),
                                                                         "buyers": reference.population},
                                  metrics=reference.describe(), source="batch", reason=reason)
    return Refreshed(len(population), reference.with_version(result.version.id), result.created)


def describe(refreshed: Refreshed) -> str:
    """One line per outcome, as the command and the demo print it."""
    ref = refreshed.reference
    if ref is None:
        return f"RFM reference: not published, too few buyers among {refreshed.profiles:,} profiles"
    state = "published" if refreshed.created else "unchanged"
    bounds = json.dumps({"recency_days": [round(b, 2) for b in ref.recency_days],
                         "frequency": list(ref.frequency), "monetary": list(ref.monetary)})
    return (f"RFM reference {ref.version} {state}: {ref.population:,} buyers of {refreshed.profiles:,} profiles; "
            f"quintile boundaries {bounds}")


def _parser() -> argparse.ArgumentParser:
    from ..settings import add_store_flags, settings

    parser = argparse.ArgumentParser(prog="onboardflow rfm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("refresh", help="fit the RFM reference on the profile store and publish it")
    cmd.add_argument("--min-buyers", type=int, default=MIN_POPULATION,
                     help="publish nothing with fewer buyers than this (default %(default)s)")
    cmd.add_argument("--every", type=float, default=None,
                     help="repeat every this many seconds until interrupted (default: once)")
    add_store_flags(cmd, settings())
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import psycopg

    from ...models.model_registry import RegistryError

    while True:
        try:
            refreshed = refresh_reference(args.redis_url, args.warehouse_dsn, args.warehouse_schema,
                                          args.key_prefix, args.min_buyers)
        except RegistryError as exc:
            print(f"onboardflow rfm: {exc}", file=sys.stderr)
            return 2
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
            print(f"onboardflow rfm: warehouse schema '{args.warehouse_schema}' has no registry tables: run "
                  f"`onboardflow warehouse migrate --warehouse-schema {args.warehouse_schema}`", file=sys.stderr)
            return 2
        print(describe(refreshed), flush=True)
        if args.every is None:
            return 0 if refreshed.reference is not None else 1
        try:
            time.sleep(args.every)
        except KeyboardInterrupt:
            return 0
