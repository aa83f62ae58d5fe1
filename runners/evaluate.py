"""`onboardflow evaluate`: the online models against the generator's ground truth.

What it does, without Kafka, Beam or any service:

1. **Replay.** ``JourneyGenerator`` invents ``--users`` users (default 10,000,
   seed 42, every other generator setting at its default) and their journeys
   are merged in *event-time* order. Each identified event is folded into the
   user's ``UserProfileState`` -- the same pure state the pipeline's keyed
   profile stage keeps (``transforms/profile.py``). Pre-signup anonymous page
   views are skipped: the pipeline keys them under a separate ``anon:``
   pseudonym, a profile with no ground-truth persona.
2. **Profile updates as the pipeline emits them.** The pipeline coalesces a
   user's events per bundle and emits one profile update; here every user
   touched within a ``--tick-minutes`` slice of event time (default 60) gets
   one update at the end of the slice. Like the pipeline's lifecycle timer
   (``UserProfileState.next_lifecycle_ms``), a user also gets an update with
   no new event when a time-based rule can flip (the end of the new-user
   window, dormancy, the default rules' time marks) and, in their first week
   of silence, a refresh a day after their newest event or refresh, then a
   weekly one until dormancy (``ProfileConfig.slow_refresh_ms``).
3. **Prequential learning (test, then train).** For every update: the
   segmenter assigns a cluster with the model as it is, then learns the
   point; the propensity model predicts completion within ``--timeout-days``
   (default 7) and, at checkpoints of the user's age, stores the features as
   they are now; when the profile shows the tutorial completed, the label (1)
   arrives and trains on the stored, earlier features; stored points with no
   completion ``--timeout-days`` later are labelled 0 by ``expire``. Each
   stored prediction is scored against its label *before* the model learns
   from it: that is the prequential ROC-AUC and log loss. Points whose
   horizon reaches past the end of the stream are never labelled.
   Drift detectors watch the cluster mix (of updates carrying new events,
   as the pipeline's learner does) and the propensity error.
4. **Report.** ARI of the profiles' ``cluster_id`` (each user's latest
   assignment, as Redis would hold it) against the personas, at the moment
   the 10,000th user is first seen and at the end of the stream; prequential
   ROC-AUC and log loss; drift events; a table on stdout, ``report.json`` and
   ``evaluation.png`` (metrics over event time) in ``--out``.

    onboardflow evaluate                       # 10,000 users, seed 42 (make evaluate)
    onboardflow evaluate --users 2000 --out .run/eval-small

``--clusterer`` and ``--classifier`` swap the models compared in
docs/models.md. ``replay_profiles`` is also what
tests/benchmarks/bench_models.py replays, so every figure there comes from
the same stream.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from onboardflow.runners.generator import DAY_MS, MAX_PRE_SIGNUP_MS, GeneratorConfig, JourneyGenerator
from onboardflow.transforms.profile import ProfileConfig, UserProfileState

MINUTE_MS = 60_000
ARI_USERS = 10_000


class ProfileTick(NamedTuple):
    """One profile update of the replay: at event time ``at_ms``, for ``user_key`` of ``persona``."""

    at_ms: int
    user_key: str
    persona: str
    profile: dict


def _flat_event(event: dict) -> dict:
    # The anonymized shape the profile stage reads (transforms/anonymize.py),
    # reduced to what the state uses; the raw user id stands in for the
    # pseudonym, which changes nothing the models see.
    return {
        "event_id": event["event_id"],
        "event_type": event["event_type"],
        "user_key": event["user_id"],
        "occurred_at": event["occurred_at"],
        "properties": event["properties"],
    }


def replay_profiles(
    config: GeneratorConfig,
    tick_ms: int = 60 * MINUTE_MS,
    profile_config: ProfileConfig = ProfileConfig(),
    stats: Optional[Counter] = None,
) -> Iterator[ProfileTick]:
    """Profile updates of the generator's users in event-time order (see the module docstring).

    ``stats`` (if given) counts ``events``, ``users`` and ``updates``.
    """
    generator = JourneyGenerator(config)
    stats = stats if stats is not None else Counter()
    users = generator.users()
    upcoming = next(users, None)
    journeys: list[tuple[int, int, dict, Iterator[dict]]] = []
    persona: dict[str, str] = {}
    states: dict[str, UserProfileState] = {}
    dirty: set[str] = set()
    # (due, user_key) of lifecycle timers, lazily invalidated: an entry is
    # live while it is still the state's next lifecycle time.
    lifecycle: list[tuple[int, str]] = []
    tick_end: Optional[int] = None

    def flush(at: int) -> Iterator[ProfileTick]:
        while lifecycle and lifecycle[0][0] <= at:
            due, key = heapq.heappop(lifecycle)
            state = states[key]
            if key in dirty or due != state.next_lifecycle_ms() or state.expired_at(due):
                continue
            state.advance_to(due)
            stats["updates"] += 1
            yield ProfileTick(due, key, persona[key], state.snapshot(key))
            heapq.heappush(lifecycle, (state.next_lifecycle_ms(), key))
        for key in sorted(dirty):
            state = states[key]
            stats["updates"] += 1
            yield ProfileTick(at, key, persona[key], state.snapshot(key))
            heapq.heappush(lifecycle, (state.next_lifecycle_ms(), key))
        dirty.clear()

    while True:
        while upcoming is not None and (
            not journeys or upcoming.signup_ms - MAX_PRE_SIGNUP_MS <= journeys[0][0]
        ):
            it = generator.journey(upcoming)
            first = next(it, None)
            if first is not None:
                heapq.heappush(journeys, (first["occurred_at"], upcoming.index, first, it))
                persona[upcoming.user_id] = upcoming.persona
            upcoming = next(users, None)
        if not journeys:
            break
        t, index, event, it = journeys[0]
        following = next(it, None)
        if following is None:
            heapq.heappop(journeys)
        else:
            heapq.heapreplace(journeys, (following["occurred_at"], index, following, it))
        if tick_end is None:
            tick_end = (t // tick_ms + 1) * tick_ms
        while t >= tick_end:
            yield from flush(tick_end - 1)
            tick_end += tick_ms
        if not event.get("user_id"):
            continue
        key = event["user_id"]
        state = states.get(key)
        if state is None:
            state = states[key] = UserProfileState.new(profile_config)
            stats["users"] += 1
        state.apply(_flat_event(event))
        stats["events"] += 1
        dirty.add(key)
    if tick_end is not None:
        yield from flush(tick_end - 1)
        # Lifecycle updates due within the horizon only: the stream ends there.
        end = generator.horizon_end_ms
        while lifecycle and lifecycle[0][0] <= end:
            yield from flush(lifecycle[0][0])


# -- prequential evaluation ----------------------------------------------------


@dataclass
class Evaluation:
    """What one evaluation run measured (see ``evaluate``)."""

    users: int
    events: int
    updates: int
    seconds: float
    ari_at_10k: Optional[float]
    #: the lowest end-of-day ARI from the day the 10,000th user was seen on (and that day)
    ari_min_after_10k: Optional[tuple[float, float]]
    ari_final: float
    ari_final_refit: float
    roc_auc: float
    log_loss: float
    roc_auc_first_week: float
    roc_auc_at_label: float
    roc_auc_warm: float
    warm_day: Optional[float]
    log_loss_at_label: float
    outcomes: int
    positives: int
    label_agreement: float
    drift_events: Counter
    segment_rate: float
    propensity_rate: float
    labels: dict
    confusion: dict
    timeline: list = field(default_factory=list)  # (day, users, ari, auc, log_loss)

    def table(self) -> str:
        rows = [
            ("users / events / profile updates", f"{self.users:,} / {self.events:,} / {self.updates:,}"),
            ("ARI vs personas when user 10,000 is first seen",
             "n/a (fewer users)" if self.ari_at_10k is None else f"{self.ari_at_10k:.3f}  (target >= 0.6)"),
            ("lowest end-of-day ARI after that (day)",
             "n/a" if self.ari_min_after_10k is None
             else f"{self.ari_min_after_10k[0]:.3f}  (day {self.ari_min_after_10k[1]:.0f})"),
            ("ARI vs personas, end of stream (profiles' cluster_id)", f"{self.ari_final:.3f}  (target >= 0.6)"),
            ("ARI, end of stream, all users re-assigned by the final model", f"{self.ari_final_refit:.3f}"),
            ("propensity prequential ROC-AUC", f"{self.roc_auc:.3f}  (target >= 0.75)"),
            ("propensity prequential log loss", f"{self.log_loss:.3f}"),
            ("ROC-AUC of predictions in a user's first 7 days", f"{self.roc_auc_first_week:.3f}"),
            ("ROC-AUC of predictions made once the model was warm",
             f"{self.roc_auc_warm:.3f}  (warm from day {self.warm_day:.1f})" if self.warm_day is not None
             else "n/a (never warm)"),
            ("ROC-AUC / log loss, test-then-train at label arrival",
             f"{self.roc_auc_at_label:.3f} / {self.log_loss_at_label:.3f}"),
            ("labelled predictions (positives)", f"{self.outcomes:,} ({self.positives:,})"),
            ("stream labels agreeing with ground truth", f"{self.label_agreement:.3f}"),
            ("drift events (segment mix / propensity error)",
             f"{self.drift_events['clustering']} / {self.drift_events['propensity']}"),
            ("segmenter predict+learn rate", f"{self.segment_rate:,.0f} updates/s"),
            ("propensity predict(+label) rate", f"{self.propensity_rate:,.0f} updates/s"),
            ("wall time", f"{self.seconds:.0f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _auc(scores: list[float], labels: list[int]) -> float:
    """ROC-AUC, or NaN when it is undefined (no labels, or only one class)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < sum(labels) < len(labels) else float("nan")


def evaluate(config: GeneratorConfig, tick_ms: int = 60 * MINUTE_MS, timeout_days: float = 3.0,
             clusterer: str = "kmeans", classifier: str = "logistic_regression",
             progress: bool = False) -> Evaluation:
    """Replay the generator's stream through the online models, prequentially (module docstring)."""
    from sklearn.metrics import adjusted_rand_score

    from onboardflow.models.drift import PropensityErrorDrift, SegmentMixDrift
    from onboardflow.models.features import feature_vector, is_activity_update
    from onboardflow.models.propensity import PropensityModel, log_loss
    from onboardflow.models.segmentation import UNASSIGNED, OnlineSegmenter
    from onboardflow.transforms.segment import RuleSet

    started = time.perf_counter()
    segmenter = OnlineSegmenter(clusterer=clusterer, seed=config.seed)
    propensity = PropensityModel(classifier=classifier, timeout_days=timeout_days)
    mix_drift, error_drift = SegmentMixDrift(), PropensityErrorDrift()
    truth = {u.user_id: u for u in JourneyGenerator(config).users()}
    stats: Counter = Counter()
    persona: dict[str, str] = {}
    cluster_of: dict[str, int] = {}
    latest_x: dict[str, dict] = {}
    completed: set[str] = set()
    outcomes = []
    drift_counts: Counter = Counter()
    seg_s = prop_s = 0.0
    ari_at_10k: Optional[float] = None
    timeline = []
    next_day: Optional[int] = None
    warm_since: Optional[int] = None

    def ari_now() -> float:
        keys = [k for k in cluster_of if cluster_of[k] != UNASSIGNED]
        if len(keys) < 2:
            return float("nan")
        return float(adjusted_rand_score([persona[k] for k in keys], [cluster_of[k] for k in keys]))

    def outcome_metrics(until_ms: int) -> tuple[float, float]:
        done = [o for o in outcomes if o.labelled_at <= until_ms]
        if not done:
            return float("nan"), float("nan")
        return (_auc([o.probability for o in done], [o.label for o in done]),
                sum(log_loss(o.label, o.probability) for o in done) / len(done))

    # The pipeline's profile settings with the default rules' time marks (pipelines/onboarding.py).
    profile_config = ProfileConfig(time_marks=RuleSet.load().time_marks)
    for tick in replay_profiles(config, tick_ms=tick_ms, profile_config=profile_config, stats=stats):
        key, at = tick.user_key, tick.at_ms
        if next_day is None:
            next_day = (at // DAY_MS + 1) * DAY_MS
        while at >= next_day:
            auc, loss = outcome_metrics(next_day)
            timeline.append(((next_day - config.start_ms) / DAY_MS, len(persona), ari_now(), auc, loss))
            if progress:
                print(f"  day {timeline[-1][0]:4.0f}: {len(persona):6,} users, ARI {timeline[-1][2]:.3f}, "
                      f"AUC {auc:.3f}", file=sys.stderr, flush=True)
            next_day += DAY_MS
        if key not in persona:
            persona[key] = tick.persona
            if len(persona) == ARI_USERS:
                ari_at_10k = ari_now()
        x = feature_vector(tick.profile)
        latest_x[key] = x

        t0 = time.perf_counter()
        cid = segmenter.predict_one(x)
        segmenter.learn_one(x, cid)
        t1 = time.perf_counter()
        if cid != UNASSIGNED:
            cluster_of[key] = cid
        if cid != UNASSIGNED and is_activity_update(tick.profile):
            for _ in mix_drift.update(cid, at):
                drift_counts["clustering"] += 1

        t2 = time.perf_counter()
        # Label before predicting: the update that shows completion must not be stored as a training point.
        new = propensity.expire(at)
        if (tick.profile.get("onboarding_progress") or 0.0) >= 1.0 and key not in completed:
            completed.add(key)
            new += propensity.label(key, 1, at)
        propensity.predict(key, x, at)
        t3 = time.perf_counter()
        if warm_since is None and propensity.warm:
            warm_since = at
        seg_s += t1 - t0
        prop_s += t3 - t2
        for o in new:
            outcomes.append(o)
            for _ in error_drift.update(o.label, o.probability, o.labelled_at):
                drift_counts["propensity"] += 1
    # Only horizons that end within the stream: after it, a completion could not be seen.
    outcomes += propensity.expire(config.start_ms + int(config.horizon_days * DAY_MS))

    auc, loss = outcome_metrics(2 ** 62)
    keys = sorted(k for k in cluster_of)
    refit = [segmenter.predict_one(latest_x[k]) for k in keys]
    warm = [o for o in outcomes if warm_since is not None and o.predicted_at >= warm_since]
    first_week = [o for o in outcomes if o.predicted_at - truth[o.user_key].signup_ms < 7 * DAY_MS]
    # Per user: the stream's label (completion seen, or timed out) vs the generator's plan.
    stream_label = {o.user_key: o.label for o in outcomes}
    agree = sum(stream_label[k] == int(truth[k].will_complete_onboarding) for k in stream_label)
    confusion: dict = {}
    labels = segmenter.labels()
    for k in keys:
        cell = (persona[k], labels.get(cluster_of[k], "unassigned"))
        confusion[cell] = confusion.get(cell, 0) + 1
    after = [(ari, day) for day, users, ari, _, _ in timeline if users >= ARI_USERS and math.isfinite(ari)]
    return Evaluation(
        users=stats["users"], events=stats["events"], updates=stats["updates"],
        seconds=time.perf_counter() - started,
        ari_at_10k=ari_at_10k, ari_min_after_10k=min(after) if after else None, ari_final=ari_now(),
        ari_final_refit=float(adjusted_rand_score([persona[k] for k in keys], refit)) if keys else float("nan"),
        roc_auc=auc, log_loss=loss,
        roc_auc_warm=_auc([o.probability for o in warm], [o.label for o in warm]),
        warm_day=None if warm_since is None else (warm_since - config.start_ms) / DAY_MS,
        roc_auc_at_label=_auc([o.probability_at_label for o in outcomes], [o.label for o in outcomes]),
        log_loss_at_label=(sum(log_loss(o.label, o.probability_at_label) for o in outcomes) / len(outcomes)
                           if outcomes else float("nan")),
        roc_auc_first_week=_auc([o.probability for o in first_week], [o.label for o in first_week]),
        outcomes=len(outcomes), positives=sum(o.label for o in outcomes),
        label_agreement=agree / len(stream_label) if stream_label else float("nan"),
        drift_events=drift_counts,
        segment_rate=stats["updates"] / seg_s if seg_s else 0.0,
        propensity_rate=stats["updates"] / prop_s if prop_s else 0.0,
        labels=labels, confusion=confusion, timeline=timeline,
    )


def plot(result: Evaluation, path: Path) -> None:
    """ARI, ROC-AUC and log loss over event time, with the targets, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [r[0] for r in result.timeline]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    top.plot(days, [r[2] for r in result.timeline], label="ARI vs personas (profiles' cluster_id)")
    top.plot(days, [r[3] for r in result.timeline], label="propensity ROC-AUC (prequential, cumulative)")
    top.axhline(0.6, color="C0", linestyle=":", linewidth=1, label="ARI target 0.6")
    top.axhline(0.75, color="C1", linestyle=":", linewidth=1, label="AUC target 0.75")
    top.set_ylim(0, 1)
    top.legend(loc="lower right", fontsize=8)
    top.set_title(f"onboardflow evaluate: {result.users:,} users, {result.updates:,} profile updates")
    bottom.plot(days, [r[4] for r in result.timeline], color="C2", label="propensity log loss (cumulative)")
    users = bottom.twinx()
    users.plot(days, [r[1] for r in result.timeline], color="grey", linestyle="--", label="users seen")
    bottom.set_xlabel("event time, days since the start of the timeline")
    bottom.legend(loc="upper left", fontsize=8)
    users.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(value):
    """``value`` with NaN (a metric undefined on this run) as null, so report.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _parse(argv):
    p = argparse.ArgumentParser(prog="onboardflow evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=ARI_USERS, help="synthetic users (default %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="generator seed (default %(default)s)")
    p.add_argument("--out", default=".run/evaluate", help="directory for report.json and evaluation.png")
    p.add_argument("--tick-minutes", type=int, default=60,
                   help="event-time slice per profile update, minutes (default %(default)s)")
    p.add_argument("--timeout-days", type=float, default=3.0,
                   help="prediction horizon: a point without completion this many days later is a 0 "
                        "(default %(default)s)")
    p.add_argument("--clusterer", default="kmeans", help="kmeans, streamkmeans, dbstream or denstream")
    p.add_argument("--classifier", default="logistic_regression", help="logistic_regression or hoeffding_tree")
    p.add_argument("--quiet", action="store_true", help="no per-day progress on stderr")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    config = GeneratorConfig(users=args.users, seed=args.seed)
    print(f"onboardflow evaluate: {args.users:,} users, seed {args.seed}, default generator settings",
          file=sys.stderr)
    result = evaluate(config, tick_ms=args.tick_minutes * MINUTE_MS, timeout_days=args.timeout_days,
                      clusterer=args.clusterer, classifier=args.classifier, progress=not args.quiet)
    print(result.table())
    print("\nsegment labels:", ", ".join(f"{i}={t}" for i, t in sorted(result.labels.items())))
    print("personas x labels (users, by their last cluster_id):")
    for (who, label), n in sorted(result.confusion.items()):
        print(f"  {who:<15} {label:<18} {n:>6,}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("confusion", "drift_events")}
    report["confusion"] = [[w, l, n] for (w, l), n in sorted(result.confusion.items())]
    report["drift_events"] = dict(result.drift_events)
    report["settings"] = vars(args)
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2), encoding="utf-8")
    plot(result, out / "evaluation.png")
    print(f"\nwrote {out / 'report.json'} and {out / 'evaluation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
