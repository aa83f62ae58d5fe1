"""`onboardflow experiments`: the declared experiments, and one experiment's report from the warehouse.

    onboardflow experiments list [--json] [--experiments-file PATH] [--warehouse-dsn ... --warehouse-schema ...]
    onboardflow experiments report NAME [--days 14] [--as-of 2026-03-01T00:00:00Z] [--json] [--plot PATH]
                                        [--experiments-file PATH] [--warehouse-dsn ... --warehouse-schema ...]

``list`` prints each experiment of the experiments file
(pipelines/experiments.yaml; transforms/experiments.py) with its status,
window, eligibility and variants, and the users exposed to each variant so
far (``experiment_exposures``; "-" when the warehouse cannot be read).
``report`` reads the experiment's exposures and its users' onboarding
completions (transforms/warehouse/experiments.py) and prints, per variant:
users exposed and analysed (window over), completion within ``--days`` of
the first exposure with its 95% Wilson interval, median hours to
activation; per treatment: the difference in completion against control
with the 95% Newcombe interval and the z-test p-value; and the
sample-ratio-mismatch check (chi-square against the declared weights,
flagged at p < 0.001). Statistics: transforms/experiment_report.py,
docs/experiments.md. ``--json`` prints the report as JSON instead; the PNG
plot (completion rate per variant with its interval; the ``cli`` extra's
matplotlib) goes to ``--plot`` (default
``$OBF_RUN_DIR/experiments/NAME.png``; ``--plot ''`` for none).

Exit status: 0 report printed, 1 the sample ratio is mismatched (the
report is printed, and says so), 2 usage error or unknown experiment.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Optional

PROG = "onboardflow experiments"


def _timestamp_ms(text: str) -> int:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: an ISO-8601 time such as 2026-03-01T00:00:00Z") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: needs a timezone (e.g. a trailing Z)")
    return int(value.timestamp() * 1000)


def _parser() -> argparse.ArgumentParser:
    from ..settings import settings

    deployment = settings()
    parser = argparse.ArgumentParser(prog=PROG, description="Declared experiments and their reports.")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="the declared experiments and their exposures so far")
    report = sub.add_parser("report", help="one experiment's completion by variant, difference, sample ratio")
    report.add_argument("name", help="the experiment's name (pipelines/experiments.yaml)")
    report.add_argument("--days", type=float, default=14.0,
                        help="completion counts within this many days of the first exposure (default: %(default)g)")
    report.add_argument("--as-of", type=_timestamp_ms, default=None, metavar="TIME",
                        help="the report's time: users exposed less than --days before it are not analysed "
                             "(default: now)")
    report.add_argument("--plot", default=None, metavar="PATH",
                        help="PNG of completion per variant (default: $OBF_RUN_DIR/experiments/NAME.png; '' none)")
    for cmd in (listing, report):
        cmd.add_argument("--json", action="store_true", help="print JSON")
        cmd.add_argument("--experiments-file", type=Path, default=None, metavar="PATH",
                         help="the experiments file (default: pipelines/experiments.yaml)")
        cmd.add_argument("--warehouse-dsn", default=deployment.warehouse_dsn,
                         help="PostgreSQL DSN (default: the deployment's, OBF_WAREHOUSE_DSN)")
        cmd.add_argument("--warehouse-schema", default=deployment.warehouse_schema,
                         help="warehouse schema (default: the deployment's, %(default)s)")
    return parser


def _iso(ms: Optional[int]) -> str:
    if ms is None:
        return "open"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _list(experiments, args) -> int:
    import psycopg

    from ...transforms.warehouse.experiments import exposure_counts

    try:
        counts: Optional[dict] = exposure_counts(args.warehouse_dsn, args.warehouse_schema)
    except psycopg.Error as exc:
        print(f"{PROG}: exposures unavailable ({type(exc).__name__})", file=sys.stderr)
        counts = None
    rows = []
    for e in experiments:
        exposed = (counts or {}).get(e.name, {})
        rows.append({
            "name": e.name, "status": e.status, "start": _iso(e.start_ms), "end": _iso(e.end_ms),
            "control": e.control, "weights": e.weights,
            "eligible": {"segments_any": sorted(e.segments_any) if e.segments_any else None,
                         "tracks": sorted(e.tracks) if e.tracks else None},
            "exposed": None if counts is None else {v: exposed.get(v, 0) for v in e.weights},
            "description": e.description,
        })
    if args.json:
        print(json.dumps({"version": experiments.version, "experiments": rows}, indent=2))
        return 0
    print(f"experiments file version {experiments.version}: {len(rows)} experiment(s)")
    for r in rows:
        variants = ", ".join(f"{v} {w:g}" + ("" if r["exposed"] is None else f" ({r['exposed'][v]:,} exposed)")
                             for v, w in r["weights"].items())
        eligible = "; ".join(f"{k} {', '.join(v)}" for k, v in r["eligible"].items() if v) or "everyone"
        print(f"  {r['name']}  [{r['status']}]  {r['start']} .. {r['end']}  eligible: {eligible}")
        print(f"      variants: {variants}")
    return 0


def format_report(report) -> str:
    """The report as a text table (what `experiments report` prints without --json)."""
    lines = [f"experiment {report.experiment}: completion within {report.days:g} days of the first exposure, "
             f"as of {_iso(report.as_of_ms)}",
             f"  {'variant':<14} {'weight':>6} {'exposed':>8} {'analysed':>8} {'completed':>9} "
             f"{'rate':>7}  {'95% CI (Wilson)':<17} {'median h to activation':>22}"]
    for v in report.variants:
        rate = "-" if v.completion_rate is None else f"{v.completion_rate:.1%}"
        median = "-" if v.median_hours_to_activation is None else f"{v.median_hours_to_activation:.1f}"
        lines.append(f"  {v.variant:<14} {v.weight:>6g} {v.exposed:>8,} {v.analysed:>8,} {v.completed:>9,} "
                     f"{rate:>7}  [{v.rate_ci_low:.1%}, {v.rate_ci_high:.1%}]{'':<3} {median:>22}")
    for c in report.comparisons:
        p = "-" if c.p_value is None else f"{c.p_value:.3g}"
        lines.append(f"  {c.variant} - {c.control}: {c.difference * 100:+.2f} pp, 95% CI (Newcombe) "
                     f"[{c.ci_low * 100:+.2f}, {c.ci_high * 100:+.2f}] pp, z-test p = {p}")
    verdict = "MISMATCH: do not trust the differences" if report.srm_flagged else "ok"
    lines.append(f"  sample ratio: chi2 = {report.srm_chi2:.2f}, p = {report.srm_p_value:.3g} "
                 f"(flag below {report.srm_alpha:g}): {verdict}")
    if report.undeclared:
        lines.append(f"  exposures of variants no longer declared (left out): {report.undeclared}")
    return "\n".join(lines)


def plot_report(report, path: Path) -> Path:
    """Completion rate per variant with its 95% Wilson interval, as a PNG at ``path``."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the experiment plot needs matplotlib: pip install 'onboardflow[cli]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.variant for v in report.variants]
    rates = [100 * (v.completion_rate or 0.0) for v in report.variants]
    errors = [[r - 100 * v.rate_ci_low for r, v in zip(rates, report.variants)],
              [100 * v.rate_ci_high - r for r, v in zip(rates, report.variants)]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 4.0))
    colors = ["#8c8c8c" if n == report.control else "#2b6cb0" for n in names]
    ax.bar(names, rates, yerr=errors, capsize=6, color=colors)
    for i, v in enumerate(report.variants):
        ax.text(i, 1, f"n={v.analysed:,}", ha="center", va="bottom", color="white", fontsize=8)
    ax.set_ylabel(f"completed onboarding within {report.days:g} days (%)")
    title = f"{report.experiment}"
    for c in report.comparisons:
        title += f"\n{c.variant} - {c.control}: {c.difference * 100:+.1f} pp [{c.ci_low * 100:+.1f}, " \
                 f"{c.ci_high * 100:+.1f}]"
    if report.srm_flagged:
        title += f"\nSAMPLE RATIO MISMATCH (p = {report.srm_p_value:.2g})"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _report(experiments, args) -> int:
    from ...transforms.experiment_report import build_report
    from ...transforms.warehouse.experiments import read_outcomes
    from ..paths import run_dir

    if args.name not in experiments:
        print(f"{PROG}: no experiment named {args.name!r} (declared: "
              f"{', '.join(e.name for e in experiments) or 'none'})", file=sys.stderr)
        return 2
    outcomes = read_outcomes(args.warehouse_dsn, args.name, args.warehouse_schema)
    as_of = args.as_of if args.as_of is not None else time.time_ns() // 1_000_000
    report = build_report(experiments[args.name], outcomes, args.days, as_of)
    plot = args.plot if args.plot is not None else str(run_dir() / "experiments" / f"{args.name}.png")
    written = plot_report(report, Path(plot)) if plot else None
    if args.json:
        print(json.dumps({**report.to_dict(), "plot": str(written) if written else None}, indent=2))
    else:
        print(format_report(report))
        if written:
            print(f"  plot: {written}")
    return 1 if report.srm_flagged else 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from ...models.tracks import TrackPolicy
    from ...transforms.experiments import DEFAULT_EXPERIMENTS_PATH, ExperimentError, ExperimentSet
    from ...transforms.segment import RuleSet

    try:
        rules = RuleSet.load()
        experiments = ExperimentSet.load(args.experiments_file or DEFAULT_EXPERIMENTS_PATH, rules.known_segments,
                                         TrackPolicy.from_yaml(segment_rules=rules).tracks)
    except ExperimentError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return _list(experiments, args) if args.command == "list" else _report(experiments, args)


if __name__ == "__main__":
    sys.exit(main())
