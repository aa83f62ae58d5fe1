"""`onboardflow evaluate`: the online models against ground truth, on populations we did not design them on.

Each *design* is a population with known personas: ``generator`` (the
project's own ``JourneyGenerator``) and the independently written designs of
``runners/sim/populations.py`` (``saas_teams``, ``mobile_consumer``,
``b2b_trial``: other persona sets, unequal mixes, other session shapes and
noise). For each, without Kafka, Beam or any service:

1. **Backfill replay.** Events, in event-time order, drive the pipeline's
   profile stage itself (``ProfileMachine``, ``transforms/profile.py``) on a
   small in-process engine (``_Replay``: states in a dict, timers in a heap).
   Each ``--tick-minutes`` slice is one bundle: its events are folded in, then
   the watermark moves to its end, the due timers (probe; lifecycle: time-based
   rules, refreshes, dormancy, expiry) fire, and every user touched gets one
   update at the slice's end; a lifecycle update of a user with no event in
   the slice comes at the timer's time.
2. **Segments as the pipeline makes them.** At every event-time mark (every
   ``--refit-hours``) the segmenter is refitted on the population's latest
   profiles (``Segmenter.fit``, identified users ordered by key, as
   ``transforms/online_models.py`` does from the profile store), and every
   profile is re-scored (the pipeline's sweep): at the end of the backfill --
   the bounded run's final mark -- every user has the final model's cluster.
3. **Live phase.** One ordinary login per user an hour after the backfill,
   scored with the same served model, as ``make demo`` does. *Stability* is
   the share of users with at least 10 events whose cluster did not change.
   The next mark's refit on the profiles after the logins gives the label
   agreement between consecutive model versions.
4. **Propensity**, prequentially (test, then train) on the profile updates:
   predictions at checkpoints, labelled 1 when the tutorial is completed and
   0 after ``--timeout-days``; ROC-AUC, log loss, Brier score and a
   reliability curve per design.

Output: the per-design table on stdout, ``report.json``, ``contingency.png``
(persona x segment heat map per design, after the live phase),
``calibration.png`` (reliability curves) and ``evaluation.png`` (ARI per
mark over event time) in ``--out``.

    onboardflow evaluate                                  # every design (make evaluate)
    onboardflow evaluate --designs saas_teams --users 1000 --out .run/eval-small
    onboardflow evaluate --through-pipeline               # also through Kafka, Prism and Redis
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

from ...schemas.units import DAY_MS, HOUR_MS, MINUTE_MS
from ...transforms.profile import (
    EVENT,
    PROBE,
    ClearState,
    DeadLetter,
    Duplicate,
    Emit,
    ProfileConfig,
    ProfileMachine,
    SetTimer,
    Store,
    TooLate,
    UserProfileState,
)
from ..sim.generator import GeneratorConfig, JourneyGenerator

#: Users whose clusters count for stability: one event is noise for fewer.
STABILITY_MIN_EVENTS = 10
TARGETS = {"ari_live": 0.6, "stable_share": 0.95, "scored_share": 1.0, "roc_auc": 0.75}


class ProfileTick(NamedTuple):
    """One profile update of the replay: at event time ``at_ms``, for ``user_key`` of ``persona``."""

    at_ms: int
    user_key: str
    persona: str
    profile: dict


@dataclass
class Design:
    """A population with ground truth: personas by user id and its events in event-time order."""

    name: str
    description: str
    personas: dict
    start_ms: int
    end_ms: int
    events: Callable[[], Iterator[dict]]


def generator_design(users: int = 10_000, seed: int = 42) -> Design:
    """The project's own generator (``runners/sim/generator.py``) at its default settings."""
    config = GeneratorConfig(users=users, seed=seed)
    generator = JourneyGenerator(config)
    personas = {u.user_id: u.persona for u in generator.users()}
    return Design("generator", "the project's own JourneyGenerator (5 personas)", personas,
                  config.start_ms, generator.horizon_end_ms, generator.events_in_event_time)


def population_design(name: str, users: int = 2000, seed: int = 7) -> Design:
    """A design of ``runners/sim/populations.py``."""
    from ..sim.populations import population

    pop = population(name, users=users, seed=seed)
    return Design(name, pop.description, {u.user_id: u.persona for u in pop.users()},
                  pop.start_ms, pop.start_ms + int(pop.days * DAY_MS), pop.events)


def design_names() -> list[str]:
    try:
        from ..sim.populations import DESIGNS
    except ImportError:
        DESIGNS = {}
    return ["generator", *DESIGNS]


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
    source,
    tick_ms: int = 60 * MINUTE_MS,
    profile_config: ProfileConfig = ProfileConfig(),
    stats: Optional[Counter] = None,
    states: Optional[dict] = None,
) -> Iterator[ProfileTick]:
    """Profile updates of a design's users in event-time order (module docstring, step 1).

    ``source``: a ``Design`` or a ``GeneratorConfig`` (the generator design).
    ``stats`` (if given) counts ``events`` (folded in), ``users``, ``updates``
    and the events the machine turned away (``duplicates``, ``too_late``,
    ``dead_letters``); ``states`` (if given) receives every user's
    ``UserProfileState`` (a user whose state expired has none).
    """
    design = source if isinstance(source, Design) else generator_design(source.users, source.seed)
    machine = ProfileMachine(profile_config, clock_ms=lambda: design.end_ms, snapshots=False)
    replay = _Replay(machine, design.personas,
                     stats if stats is not None else Counter(), states if states is not None else {})
    tick_end: Optional[int] = None
    for event in design.events():
        t = event["occurred_at"]
        if tick_end is None:
            tick_end = (t // tick_ms + 1) * tick_ms
        while t >= tick_end:
            yield from replay.advance_watermark(tick_end - 1)
            tick_end += tick_ms
        if not event.get("user_id"):
            continue  # anonymous visitors: the pipeline keys them apart, without a persona
        replay.on_event(_flat_event(event))
    if tick_end is not None:
        yield from replay.advance_watermark(tick_end - 1)
        # Timers due within the horizon only: the stream ends there.
        yield from replay.advance_watermark(design.end_ms)


class _Replay:
    """An in-process engine for ``ProfileMachine``: states in a dict, event-time timers in a heap.

    Events of one tick are one bundle: the watermark stays at the previous
    tick's end while they are folded in; then it advances to the tick's end,
    the timers due fire in time order, and each user touched gets one update
    (coalesced like a bundle's) at the tick's end. A lifecycle update of a
    user not touched in the tick is its own update at the timer's time.
    """

    def __init__(self, machine: ProfileMachine, personas: dict, stats: Counter, states: dict):
        self.machine, self.personas, self.stats, self.states = machine, personas, stats, states
        self.users: set[str] = set()
        self.timers: dict[tuple[str, str], int] = {}    # (user_key, timer) -> pending firing time
        self.heap: list[tuple[int, str, str]] = []      # (at, user_key, timer); stale if not in timers
        self.pending: dict[str, UserProfileState] = {}  # user_key -> state to emit at the tick's end

    def on_event(self, event: dict) -> None:
        key = event["user_key"]
        if key not in self.users:
            self.users.add(key)
            self.stats["users"] += 1
        self._carry_out(key, self.machine.on_event(self.states.get(key), event), None)

    def advance_watermark(self, at: int) -> Iterator[ProfileTick]:
        heap, timers = self.heap, self.timers
        while heap and heap[0][0] <= at:
            fired, key, timer = heapq.heappop(heap)
            if timers.get((key, timer)) != fired:
                continue  # replaced by a later set
            del timers[(key, timer)]
            state = self.states.get(key)
            if timer == PROBE:
                decisions = self.machine.on_probe(state, fired)
            else:
                decisions = self.machine.on_lifecycle(state, key, fired)
            yield from self._carry_out(key, decisions, fired)
        for key in sorted(self.pending):
            self.stats["updates"] += 1
            yield ProfileTick(at, key, self.personas[key], self.pending[key].snapshot(key))
        self.pending.clear()

    def _carry_out(self, key: str, decisions, fired: Optional[int]) -> Iterator[ProfileTick]:
        ticks = []
        for d in decisions:
            kind = type(d)
            if kind is Store:
                self.states[key] = d.state
            elif kind is SetTimer:
                self.timers[(key, d.timer)] = d.at_ms
                heapq.heappush(self.heap, (d.at_ms, key, d.timer))
            elif kind is Emit:
                if d.cause == EVENT:
                    self.stats["events"] += 1
                # The machine makes no snapshots here (snapshots=False): the state is read when emitted.
                state = self.states[key]
                if fired is not None and key not in self.pending:
                    ticks.append(ProfileTick(fired, key, self.personas[key], state.snapshot(key)))
                else:
                    self.pending[key] = state
            elif kind is ClearState:
                self.states.pop(key, None)
            elif kind is Duplicate:
                self.stats["duplicates"] += 1
            elif kind is TooLate:
                self.stats["too_late"] += 1
            elif kind is DeadLetter:
                self.stats["dead_letters"] += 1
        self.stats["updates"] += len(ticks)
        return ticks


# -- one design ------------------------------------------------------------------


@dataclass
class DesignResult:
    """What the evaluation of one design measured (module docstring)."""

    design: str
    description: str
    users: int
    events: int
    updates: int
    model_versions: int
    ari_backfill: float
    ari_live: float
    stable_share: float
    stability_users: int
    scored_share: float
    label_agreement: float
    labels: dict
    sizes: dict
    roc_auc: float
    roc_auc_warm: float         # predictions made once the model was warm (past its cold start)
    log_loss: float
    brier: float
    outcomes: int
    positives: int
    calibration: list          # (mean predicted, observed rate, n) per decile of predictions
    contingency: dict          # persona -> label -> users, after the live phase
    timeline: list = field(default_factory=list)  # (day, ARI of the fresh model on the population then)
    seconds: float = 0.0

    def misses(self) -> list[str]:
        """The targets this design misses, as text (empty: all met)."""
        out = []
        if not self.ari_live >= TARGETS["ari_live"]:
            out.append(f"ARI after the live phase {self.ari_live:.3f} < {TARGETS['ari_live']}")
        if not self.stable_share >= TARGETS["stable_share"]:
            out.append(f"stability {self.stable_share:.3f} < {TARGETS['stable_share']}")
        if not self.scored_share >= TARGETS["scored_share"]:
            out.append(f"scored {self.scored_share:.3f} < 1")
        if not self.roc_auc >= TARGETS["roc_auc"]:
            out.append(f"propensity ROC-AUC {self.roc_auc:.3f} < {TARGETS['roc_auc']}")
        return out


def _ari(truth: list, predicted: list) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(truth, predicted)) if len(truth) > 1 else float("nan")


def _auc(scores: list[float], labels: list[int]) -> float:
    """ROC-AUC, or NaN when it is undefined (no labels, or only one class)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < sum(labels) < len(labels) else float("nan")


def reliability(probabilities: list[float], labels: list[int], bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean predicted, observed positive rate, count) per equal-count bin of the predictions."""
    pairs = sorted(zip(probabilities, labels))
    out = []
    for b in range(bins):
        chunk = pairs[b * len(pairs) // bins:(b + 1) * len(pairs) // bins]
        if chunk:
            out.append((sum(p for p, _ in chunk) / len(chunk), sum(y for _, y in chunk) / len(chunk), len(chunk)))
    return out


def evaluate_design(design: Design, tick_ms: int = 60 * MINUTE_MS, refit_ms: int = 24 * HOUR_MS,
                    timeout_days: float = 3.0, n_clusters: int = 6, seed: int = 42,
                    progress: bool = False) -> DesignResult:
    """Replay ``design`` through the models as the pipeline runs them (module docstring)."""
    from ...models.features import feature_vector
    from ...models.propensity import PropensityModel, log_loss
    from ...models.segmentation import UNASSIGNED, SegmentSettings
    from ...transforms.segment import RuleSet

    started = time.perf_counter()
    settings = SegmentSettings(refit_ms=refit_ms, n_clusters=n_clusters, seed=seed)

    def fit_population(latest: dict):
        # The pipeline reads the store ordered by user key (transforms/rescore.py).
        return settings.fit([latest[k] for k in sorted(latest)])

    propensity = PropensityModel(timeout_days=timeout_days)
    warm_since: Optional[int] = None
    stats: Counter = Counter()
    states: dict[str, UserProfileState] = {}
    latest: dict[str, dict] = {}
    completed: set[str] = set()
    outcomes = []
    timeline = []
    versions = 0
    next_mark: Optional[int] = None
    # The pipeline's profile settings with the default rules' time marks (pipelines/onboarding.py).
    profile_config = ProfileConfig(time_marks=RuleSet.load().time_marks)

    def refit(at: int) -> None:
        nonlocal versions
        model = fit_population(latest)
        if model is None:
            return
        versions += 1
        keys = sorted(latest)
        timeline.append(((at - design.start_ms) / DAY_MS,
                         _ari([design.personas[k] for k in keys],
                              [model.predict_one(feature_vector(latest[k])) for k in keys])))
        if progress:
            print(f"  {design.name}: day {timeline[-1][0]:5.1f}, {len(keys):6,} users, ARI {timeline[-1][1]:.3f}",
                  file=sys.stderr, flush=True)

    for tick in replay_profiles(design, tick_ms=tick_ms, profile_config=profile_config, stats=stats, states=states):
        key, at = tick.user_key, tick.at_ms
        if next_mark is None:
            next_mark = (at // refit_ms + 1) * refit_ms
        while at >= next_mark:
            refit(next_mark)
            next_mark += refit_ms
        latest[key] = tick.profile
        x = feature_vector(tick.profile)
        # Label before predicting: the update that shows completion must not be stored as a training point.
        new = propensity.expire(at)
        if (tick.profile.get("onboarding_progress") or 0.0) >= 1.0 and key not in completed:
            completed.add(key)
            new += propensity.label(key, 1, at)
        propensity.predict(key, x, at)
        if warm_since is None and propensity.warm:
            warm_since = at
        outcomes += new
    # Only horizons that end within the stream: after it, a completion could not be seen.
    outcomes += propensity.expire(design.end_ms)

    # The end of the backfill is the bounded run's last mark: fit, publish, sweep.
    keys = sorted(latest)
    served = fit_population(latest)
    if served is None:
        raise ValueError(f"design {design.name}: too few users to fit a segmenter")
    versions += 1
    before = {k: served.predict_one(feature_vector(latest[k])) for k in keys}
    truth = [design.personas[k] for k in keys]

    # Live phase: one login per user an hour after the backfill, on a copy of the state.
    live_at = design.end_ms + HOUR_MS
    live = ProfileMachine(profile_config, clock_ms=lambda: live_at)
    after_profiles = {}
    for k in keys:
        state = live.load(states[k].to_primitive()) if k in states else None
        login = {"event_id": f"live-login-{k}", "event_type": "login", "user_key": k,
                 "occurred_at": live_at, "properties": {"method": "password"}}
        after_profiles[k] = next(d.current for d in live.on_event(state, login) if type(d) is Emit)
    after = {k: served.predict_one(feature_vector(after_profiles[k])) for k in keys}
    settled = [k for k in keys if (latest[k].get("events_total") or 0) >= STABILITY_MIN_EVENTS]
    stable = sum(before[k] == after[k] for k in settled)
    # The next mark refits on the profiles after the logins: do the labels hold?
    nxt = fit_population(after_profiles)
    relabelled = [nxt.label(nxt.predict_one(feature_vector(after_profiles[k]))) for k in keys] if nxt else []
    agreement = ((sum(served.label(after[k]) == r for k, r in zip(keys, relabelled)) / len(keys))
                 if nxt else float("nan"))

    contingency: dict = {}
    for k in keys:
        row = contingency.setdefault(design.personas[k], {})
        label = served.label(after[k])
        row[label] = row.get(label, 0) + 1
    probs = [o.probability for o in outcomes]
    ys = [o.label for o in outcomes]
    warm = [o for o in outcomes if warm_since is not None and o.predicted_at >= warm_since]
    return DesignResult(
        design=design.name, description=design.description, users=stats["users"], events=stats["events"],
        updates=stats["updates"], model_versions=versions,
        ari_backfill=_ari(truth, [before[k] for k in keys]),
        ari_live=_ari(truth, [after[k] for k in keys]),
        stable_share=stable / len(settled) if settled else float("nan"), stability_users=len(settled),
        scored_share=sum(after[k] != UNASSIGNED for k in keys) / len(keys),
        label_agreement=agreement,
        labels={str(cid): label for cid, label in served.labels().items()},
        sizes={served.label(cid): n for cid, n in served.sizes().items()},
        roc_auc=_auc(probs, ys),
        roc_auc_warm=_auc([o.probability for o in warm], [o.label for o in warm]),
        log_loss=sum(log_loss(y, p) for p, y in zip(probs, ys)) / len(ys) if ys else float("nan"),
        brier=sum((p - y) ** 2 for p, y in zip(probs, ys)) / len(ys) if ys else float("nan"),
        outcomes=len(ys), positives=sum(ys), calibration=reliability(probs, ys),
        contingency=contingency, timeline=timeline, seconds=time.perf_counter() - started,
    )


# -- the report ------------------------------------------------------------------


def columns(headers: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """A text table: one column per header, one line per (name, values) row, values right-aligned."""
    width = max(len(k) for k, _ in rows)
    cols = [max(len(h), *(len(v[i]) for _, v in rows)) for i, h in enumerate(headers)]
    lines = [" " * width + "  " + "  ".join(h.rjust(c) for h, c in zip(headers, cols))]
    for name, values in rows:
        lines.append(name.ljust(width) + "  " + "  ".join(v.rjust(c) for v, c in zip(values, cols)))
    return "\n".join(lines)


def table(results: list[DesignResult]) -> str:
    """The per-design table, one column per design."""
    def f(v, fmt="{:.3f}"):
        return "n/a" if isinstance(v, float) and math.isnan(v) else fmt.format(v)

    rows = [
        ("users / events", [f"{r.users:,} / {r.events:,}" for r in results]),
        ("model versions (event-time marks + end)", [str(r.model_versions) for r in results]),
        ("ARI vs personas after the backfill", [f(r.ari_backfill) for r in results]),
        (f"ARI after one live login per user (>= {TARGETS['ari_live']})", [f(r.ari_live) for r in results]),
        (f"stability: same cluster after the login (>= {TARGETS['stable_share']:.0%})",
         [f"{f(r.stable_share)} of {r.stability_users:,}" for r in results]),
        ("profiles scored (target 100 %)", [f"{r.scored_share:.1%}" for r in results]),
        ("labels kept by the next model version", [f(r.label_agreement) for r in results]),
        (f"propensity ROC-AUC (>= {TARGETS['roc_auc']})", [f(r.roc_auc) for r in results]),
        ("propensity ROC-AUC once warm", [f(r.roc_auc_warm) for r in results]),
        ("propensity Brier score / log loss", [f"{f(r.brier)} / {f(r.log_loss)}" for r in results]),
        ("labelled predictions (positives)", [f"{r.outcomes:,} ({r.positives:,})" for r in results]),
        ("wall time", [f"{r.seconds:.0f} s" for r in results]),
    ]
    return columns([r.design for r in results], rows)


def plot_contingency(results: list[DesignResult], path: Path) -> None:
    """Persona x segment label heat maps, one per design (share of each persona's users)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        personas = sorted(r.contingency)
        labels = sorted({label for row in r.contingency.values() for label in row})
        counts = np.array([[r.contingency[p].get(label, 0) for label in labels] for p in personas], dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(personas)), personas, fontsize=8)
        for i in range(len(personas)):
            for j in range(len(labels)):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.6 else "black")
        ax.set_title(f"{r.design}: ARI {r.ari_live:.2f} after live logins", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(results: list[DesignResult], path: Path) -> None:
    """Reliability curves of the propensity model (predicted vs observed completion), one line per design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    for r in results:
        if r.calibration:
            ax.plot([c[0] for c in r.calibration], [c[1] for c in r.calibration], marker="o",
                    label=f"{r.design} (Brier {r.brier:.3f}, AUC {r.roc_auc:.2f})")
    ax.set_xlabel("predicted probability of completing onboarding (decile mean)")
    ax.set_ylabel("observed completion rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(results: list[DesignResult], path: Path) -> None:
    """ARI of each model version on the population at its mark, over event time, per design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results:
        ax.plot([t[0] for t in r.timeline], [t[1] for t in r.timeline], marker=".", label=r.design)
    ax.axhline(TARGETS["ari_live"], color="grey", linestyle=":", linewidth=1, label="target 0.6")
    ax.set_ylim(0, 1)
    ax.set_xlabel("event time, days since the design's start")
    ax.set_ylabel("ARI vs personas (model fitted at the mark)")
    ax.legend(fontsize=8, loc="lower right")
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
    from ..settings import settings

    deployment = settings()
    p = argparse.ArgumentParser(prog="onboardflow evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--designs", default="all",
                   help="comma-separated designs (generator, saas_teams, mobile_consumer, b2b_trial) or all")
    p.add_argument("--users", type=int, default=2000, help="users per population design (default %(default)s)")
    p.add_argument("--generator-users", type=int, default=10_000,
                   help="users of the generator design (default %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="generator and model seed (default %(default)s)")
    p.add_argument("--population-seed", type=int, default=7, help="seed of the population designs")
    p.add_argument("--clusters", type=int, default=6, help="k of the segmenter (default %(default)s)")
    p.add_argument("--refit-hours", type=float, default=24.0,
                   help="event time between segmenter refits (default %(default)s)")
    p.add_argument("--out", default=".run/evaluate", help="directory for report.json and the plots")
    p.add_argument("--tick-minutes", type=int, default=60,
                   help="event-time slice per profile update, minutes (default %(default)s)")
    p.add_argument("--timeout-days", type=float, default=3.0,
                   help="prediction horizon: a point without completion this many days later is a 0 "
                        "(default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    t = p.add_argument_group("through the pipeline (runners/cli/evaluate_pipeline.py; services of make services-up)")
    t.add_argument("--through-pipeline", action="store_true",
                   help="also run each population design through Kafka, the pipeline (Prism) and Redis, "
                        "with a live phase")
    t.add_argument("--pipeline-users", type=int, default=500,
                   help="users per design through the pipeline (default %(default)s: Prism folds a few hundred "
                        "events/s, and b2b_trial has ~136 events per user)")
    # The deployment's endpoints (runners/settings.py); each run uses its own topics, keys and schemas.
    t.add_argument("--bootstrap-servers", default=deployment.kafka_bootstrap)
    t.add_argument("--redis-url", default=deployment.redis_url)
    t.add_argument("--warehouse-dsn", default=deployment.warehouse_dsn)
    t.add_argument("--live-timeout", type=float, default=180.0,
                   help="seconds to wait for every login of the live phase (default %(default)s)")
    t.add_argument("--keep", action="store_true", help="keep the runs' topics, Redis keys and schemas")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["identity"]:
        from .evaluate_identity import main as identity_main
        return identity_main(argv[1:])
    args = _parse(argv)
    names = design_names() if args.designs == "all" else [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = set(names) - set(design_names())
    if unknown:
        print(f"unknown designs {sorted(unknown)}; known: {design_names()}", file=sys.stderr)
        return 2
    results = []
    for name in names:
        design = (generator_design(args.generator_users, args.seed) if name == "generator"
                  else population_design(name, args.users, args.population_seed))
        print(f"onboardflow evaluate: {name} ({len(design.personas):,} users): {design.description}",
              file=sys.stderr, flush=True)
        results.append(evaluate_design(design, tick_ms=args.tick_minutes * MINUTE_MS,
                                       refit_ms=int(args.refit_hours * HOUR_MS), timeout_days=args.timeout_days,
                                       n_clusters=args.clusters, seed=args.seed, progress=not args.quiet))
    print(table(results))
    for r in results:
        print(f"\n{r.design}: personas x segments after the live phase (users)")
        labels = sorted({label for row in r.contingency.values() for label in row})
        width = max(len(p) for p in r.contingency)
        print(" " * width + "  " + "  ".join(f"{label[:14]:>14}" for label in labels))
        for persona in sorted(r.contingency):
            print(f"{persona:<{width}}  " + "  ".join(f"{r.contingency[persona].get(label, 0):>14,}"
                                                       for label in labels))
        for miss in r.misses():
            print(f"  MISSED: {miss}")
    piped = []
    if args.through_pipeline:
        from . import evaluate_pipeline

        for name in names:
            if name == "generator":
                continue  # millions of events: the in-process replay covers it
            piped.append(evaluate_pipeline.evaluate_through_pipeline(
                name, args.pipeline_users, args.population_seed, args.bootstrap_servers, args.redis_url,
                args.warehouse_dsn, live_timeout_s=args.live_timeout, keep=args.keep))
        if piped:
            print("\nthrough the pipeline (Kafka -> Prism -> Redis, then one live login per user):")
            print(evaluate_pipeline.table(piped))
            for r in piped:
                lost = r.logins_sent - r.logins_arrived
                if lost:
                    print(f"  {r.design}: {lost} logins never reached a profile (users without personalization "
                          "consent have none)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": vars(args), "targets": TARGETS, "designs": [asdict(r) for r in results],
              "through_pipeline": [asdict(r) for r in piped]}
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2), encoding="utf-8")
    plot_contingency(results, out / "contingency.png")
    plot_calibration(results, out / "calibration.png")
    plot_timeline(results, out / "evaluation.png")
    print(f"\nwrote {out / 'report.json'}, contingency.png, calibration.png and evaluation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
