"""`onboardflow train`: bootstrap the online segmenter from the warehouse history.

The training job itself (Beam: warehouse -> feature matrix; scikit-learn:
choose k, seed the online segmenter; the propensity replay) is
pipelines/train.py; this command parses the flags, publishes the models to the
registry (``--no-publish`` skips it: re-running on the same warehouse
publishes the same bytes, and the registry returns the existing version) and
reports. The warehouse, Redis and their names default to the deployment's
(runners/settings.py), the one `make demo` fills.

Report: a table per k and the chosen clusters (label, size) on the console
and in ``OUT/train-report.txt``, the same as JSON in ``train-report.json``,
and ``k-selection.png`` (silhouette and Davies-Bouldin against k).

Run it locally (services from ``make services-up``, a warehouse filled by the
pipeline)::

    onboardflow train --out .run/train
    onboardflow train --k-min 3 --k-max 8 --pca none --out .run/train --no-publish

or on another runner, passing Beam options through (``--out`` must then be
storage both the workers and the launcher see: the launcher reads the
feature matrix back from it)::

    onboardflow train --runner FlinkRunner --flink_master=localhost:8081 --environment_type=LOOPBACK

Exit status: 0 trained (and published); 2 bad arguments or an unreachable
service; 3 too few usable profiles (fewer than ``--min-users``, or not more
than ``--k-max``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ...pipelines.train import (
    DEFAULT_K_MAX,
    DEFAULT_K_MIN,
    DEFAULT_MIN_USERS,
    DEFAULT_PCA,
    DEFAULT_SEED,
    DEFAULT_SILHOUETTE_SAMPLE,
    DEFAULT_TOLERANCE,
    Bootstrap,
    KScore,
    TooFewProfiles,
    bootstrap_propensity,
    cluster_profiles,
    count_users,
    extract_features,
    fit_bootstrap,
    read_snapshot_history,
    seed_segmenter,
)

EXIT_TOO_FEW = 3


# --------------------------------------------------------------------------- the report


def format_report(boot: Bootstrap, clusters: list[dict], agreement: float, counts: Mapping[str, int],
                  tolerance: float) -> str:
    lines = [
        f"onboardflow train: {boot.n_rows} users, features standardized"
        + (f", PCA to {boot.pca_components} components ({boot.explained_variance:.1%} of variance)"
           if boot.pca_components else ""),
        "",
        f"{'k':>3}  {'silhouette':>10}  {'davies_bouldin':>14}  {'inertia':>12}  {'smallest':>8}",
    ]
    for s in boot.scores:
        mark = "  <- chosen" if s.k == boot.chosen.k else ""
        lines.append(f"{s.k:>3}  {s.silhouette:>10.4f}  {s.davies_bouldin:>14.4f}  {s.inertia:>12.1f}  "
                     f"{s.smallest_share:>8.1%}{mark}")
    lines += [
        "",
        f"rule: best silhouette; within {tolerance} of it, lowest Davies-Bouldin; "
        f"then smaller k -> k = {boot.chosen.k}",
        "",
        f"{'cluster':>7}  {'label':<20} {'users':>7} {'share':>7}",
    ]
    for c in clusters:
        lines.append(f"{c['cluster_id']:>7}  {c['label']:<20} {c['users']:>7} {c['share']:>7.1%}")
    lines += [
        "",
        f"seeded online segmenter agrees with the offline clustering on {agreement:.1%} of users",
        "counts: " + ", ".join(f"{k}={v}" for k, v in counts.items()),
    ]
    return "\n".join(lines)


def plot_k_selection(scores: Sequence[KScore], chosen_k: int, path: Path) -> None:
    """k against silhouette (left axis) and Davies-Bouldin (right axis), chosen k marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    ks = [s.k for s in scores]
    fig, left = plt.subplots(figsize=(7, 4), dpi=110)
    left.plot(ks, [s.silhouette for s in scores], "o-", color="tab:blue", label="silhouette (higher is better)")
    left.set_xlabel("k (clusters)")
    left.set_ylabel("silhouette", color="tab:blue")
    left.set_xticks(ks)
    right = left.twinx()
    right.plot(ks, [s.davies_bouldin for s in scores], "s--", color="tab:red",
               label="Davies-Bouldin (lower is better)")
    right.set_ylabel("Davies-Bouldin", color="tab:red")
    left.axvline(chosen_k, color="grey", linestyle=":", label=f"chosen k = {chosen_k}")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    left.set_title("onboardflow train: choosing the number of segments")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def _pca(value: str) -> Optional[float]:
    if value.lower() in ("none", "off", "0"):
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("--pca is a component count, a variance share or 'none'") from None
    if not (0 < number < 1 or (number >= 1 and number == int(number))):
        raise argparse.ArgumentTypeError("--pca is a component count (>= 1) or a variance share in (0, 1)")
    return number


def _as_of(value: str) -> int:
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError("--as-of is an ISO-8601 time, e.g. 2026-02-01T00:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def _parser() -> argparse.ArgumentParser:
    from ..settings import add_store_flags, settings

    deployment = settings()
    parser = argparse.ArgumentParser(
        prog="onboardflow train",
        description="Bootstrap the online segmenter from the warehouse: choose k, seed, publish. "
                    "Unknown flags are passed to Beam's PipelineOptions.")
    add_store_flags(parser, deployment)
    parser.add_argument("--k-min", type=int, default=DEFAULT_K_MIN, help="smallest k tried (default: %(default)s)")
    parser.add_argument("--k-max", type=int, default=DEFAULT_K_MAX, help="largest k tried (default: %(default)s)")
    parser.add_argument("--pca", type=_pca, default=DEFAULT_PCA,
                        help="reduce with PCA before clustering: components (e.g. 5), variance share "
                             "(default: %(default)s) or 'none'")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="silhouette within this of the best counts as a tie (default: %(default)s)")
    parser.add_argument("--silhouette-sample", type=int, default=DEFAULT_SILHOUETTE_SAMPLE,
                        help="rows sampled for the silhouette (default: %(default)s)")
    parser.add_argument("--min-users", type=int, default=DEFAULT_MIN_USERS,
                        help="refuse to train on fewer usable profiles (default: %(default)s)")
    parser.add_argument("--as-of", type=_as_of, default=None,
                        help="train on the profiles as of this event time (ISO-8601; default: the latest)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    parser.add_argument("--read-shards", type=int, default=4, help="parallel warehouse reads (default: %(default)s)")
    parser.add_argument("--out", default=str(deployment.run_dir / "train"),
                        help="report directory (default: %(default)s)")
    parser.add_argument("--no-publish", action="store_true", help="report only; do not register the model")
    parser.add_argument("--no-propensity", action="store_true",
                        help="do not bootstrap the propensity model from the snapshot history")
    parser.add_argument("--timeout-days", type=float, default=3.0,
                        help="propensity horizon: completes onboarding within N days (default: %(default)s)")
    parser.add_argument("--runner", default="prism",
                        help="'prism' (local, default) or a Beam runner name; other flags go to Beam")
    parser.add_argument("--prism-path", default=None, help=argparse.SUPPRESS)
    return parser


def _pipeline_options(args, beam_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    from ..local import local_pipeline_options

    if args.runner.lower() in ("prism", "prismrunner"):
        if beam_args:
            raise SystemExit(f"onboardflow train: unknown arguments for the local runner: {' '.join(beam_args)}")
        return local_pipeline_options(False, prism_path=args.prism_path, job_name="onboardflow-train")
    return PipelineOptions([f"--runner={args.runner}", *beam_args])


def run(argv: Optional[list[str]] = None) -> dict:
    """Train (and publish); returns the report as a dict. Raises TooFewProfiles, RegistryError, psycopg errors."""
    args, beam_args = _parser().parse_known_args(argv)
    if not 2 <= args.k_min <= args.k_max:
        raise ValueError("need 2 <= --k-min <= --k-max")
    if args.read_shards < 1 or args.silhouette_sample < 2 or args.min_users < 1:
        raise ValueError("--read-shards, --min-users must be >= 1 and --silhouette-sample >= 2")
    from ...models.features import FEATURES, SEGMENT_FEATURES

    dsn, schema = args.warehouse_dsn, args.warehouse_schema
    needed = max(args.min_users, args.k_max + 1)
    available = count_users(dsn, schema, args.as_of)
    if available < needed:
        raise TooFewProfiles(
            f"the warehouse schema '{schema}' has {available} users with profile snapshots"
            f"{' as of the --as-of time' if args.as_of is not None else ''}; training needs at least {needed} "
            f"(--min-users {args.min_users}, and more than --k-max {args.k_max}). "
            "Run the pipeline on more events first (`make demo` fills the default deployment), "
            "or lower --min-users / --k-max.")

    out = Path(args.out)
    started = time.monotonic()
    rows, dead_letters = extract_features(_pipeline_options(args, beam_args), dsn, schema, args.read_shards,
                                          args.as_of, out)
    beam_seconds = time.monotonic() - started
    if len(rows) < needed:
        raise TooFewProfiles(
            f"only {len(rows)} of {available} profiles gave usable feature vectors "
            f"({len(dead_letters)} dead letters in {out / 'dead_letters.jsonl'}); training needs at least {needed}.")

    import numpy as np

    # The feature matrix holds the whole vector; the clustering uses the
    # behaviour features the online segmenter uses, the profiles (labels) all.
    full = np.array([r["x"] for r in rows], dtype=float)
    matrix = full[:, [FEATURES.index(name) for name in SEGMENT_FEATURES]]
    boot = fit_bootstrap(matrix, range(args.k_min, args.k_max + 1), args.pca, args.seed,
                         args.silhouette_sample, args.tolerance)
    population = {n: (float(m), float(s)) for n, m, s in zip(FEATURES, full.mean(axis=0), full.std(axis=0))}
    segmenter, ids = seed_segmenter(boot, SEGMENT_FEATURES, args.seed,
                                    profiles=cluster_profiles(full, boot.labels, boot.chosen.k, FEATURES),
                                    population=population)
    online = np.array([segmenter.predict_one(dict(zip(FEATURES, r))) for r in full.tolist()])
    agreement = float((online == np.array(ids)[boot.labels]).mean())
    sizes = np.bincount(boot.labels, minlength=boot.chosen.k)
    clusters = [{"cluster_id": ids[i], "label": segmenter.label(ids[i]), "users": int(sizes[i]),
                 "share": round(float(sizes[i]) / boot.n_rows, 6)} for i in range(boot.chosen.k)]
    counts = {"users": boot.n_rows, "users_in_warehouse": available, "dead_letters": len(dead_letters)}
    metrics = {
        "k": boot.chosen.k, "silhouette": boot.chosen.silhouette, "davies_bouldin": boot.chosen.davies_bouldin,
        "online_agreement": round(agreement, 6), "pca_components": boot.pca_components,
        "explained_variance": boot.explained_variance, "tolerance": args.tolerance,
        "k_scores": [asdict(s) for s in boot.scores], "clusters": clusters, "seed": args.seed,
        "features": list(SEGMENT_FEATURES),
    }
    if args.as_of is not None:
        metrics["as_of_ms"] = args.as_of
    report = {"counts": counts, "metrics": metrics, "beam_seconds": round(beam_seconds, 3), "published": None}

    prop = None
    if not args.no_propensity:
        # closing(): an error mid-replay must not leave the server-side cursor's transaction open.
        with contextlib.closing(read_snapshot_history(dsn, schema, args.as_of)) as history:
            prop = bootstrap_propensity(history, args.timeout_days)
        report["propensity"] = {
            "snapshots": prop.snapshots, "skipped": prop.skipped, "labelled": prop.labelled,
            "positives": prop.positives, "roc_auc": prop.roc_auc, "log_loss": prop.log_loss,
            "warm": prop.model.warm, "timeout_days": args.timeout_days, "published": None,
        }

    if not args.no_publish:
        from ...models.model_registry import ModelRegistry

        with ModelRegistry(args.redis_url, dsn, schema, args.key_prefix) as registry:
            result = registry.publish("segmentation", segmenter.to_bytes(), counts=counts, metrics=metrics,
                                      source="train", reason=f"onboardflow train: k={boot.chosen.k}")
            if prop is not None and prop.model.warm:
                pub = registry.publish(
                    "propensity", prop.model.to_bytes(include_pending=False),
                    counts={"snapshots": prop.snapshots, "labels": prop.labelled, "positives": prop.positives},
                    metrics={"roc_auc": prop.roc_auc, "log_loss": prop.log_loss, "timeout_days": args.timeout_days},
                    source="train", reason="onboardflow train: replay of the snapshot history")
                report["propensity"]["published"] = {"version": pub.version.id, "created": pub.created,
                                                     "serving": pub.serving}
        report["published"] = {"version": result.version.id, "created": result.created, "serving": result.serving}

    text = format_report(boot, clusters, agreement, counts, args.tolerance)
    if report["published"]:
        p = report["published"]
        text += (f"\npublished {p['version']}" + ("" if p["created"] else " (already registered: same model)")
                 + ("" if p["serving"] else "; NOT serving: the segmentation pointer is pinned by a rollback"))
    if prop is not None:
        text += (f"\npropensity (completes onboarding within {args.timeout_days:g} days), replayed from "
                 f"{prop.snapshots:,} snapshots: {prop.labelled:,} labelled points ({prop.positives:,} positive), "
                 f"prequential ROC-AUC {prop.roc_auc if prop.roc_auc is not None else 'n/a'}, "
                 f"log loss {prop.log_loss if prop.log_loss is not None else 'n/a'}; ")
        published = report["propensity"]["published"]
        if published:
            text += f"published {published['version']}" + ("" if published["created"] else " (already registered)")
        elif not prop.model.warm:
            text += (f"not published: needs {prop.model.min_per_class} labelled points of each class "
                     f"(has {prop.positives:,} positive, {prop.labelled - prop.positives:,} negative)")
        else:
            text += "not published (--no-publish)"
    (out / "train-report.txt").write_text(text + "\n", encoding="utf-8")
    (out / "train-report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    plot_k_selection(boot.scores, boot.chosen.k, out / "k-selection.png")
    print(text)
    print(f"report: {out / 'train-report.txt'}, {out / 'train-report.json'}, plot: {out / 'k-selection.png'}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    import psycopg

    from ...models.model_registry import RegistryError

    try:
        run(argv)
    except TooFewProfiles as exc:
        print(f"onboardflow train: not enough data: {exc}", file=sys.stderr)
        return EXIT_TOO_FEW
    except (ValueError, RegistryError, FileNotFoundError) as exc:
        print(f"onboardflow train: {exc}", file=sys.stderr)
        return 2
    except psycopg.errors.UndefinedTable:
        print("onboardflow train: warehouse tables are missing: run `onboardflow warehouse migrate` "
              "(and the pipeline, to fill profile_snapshots)", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        from . import unreachable_service

        print(f"onboardflow train: {unreachable_service(exc) or str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
