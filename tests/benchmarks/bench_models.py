"""Learn and predict rates of the online models, and the clusterer/classifier comparison.

Run: .venv/bin/python tests/benchmarks/bench_models.py [--users N] [--repeats R]

One replay of the generator's stream (``replay_profiles`` of
runners/cli/evaluate.py: N users, default 1,000, seed 42) gives the profile
updates in event-time order; their feature vectors are kept in memory so
every model is timed on the same points, without the replay's own cost.
Single-threaded; rates are the median of R runs (default 3), in profile
updates per second:

* feature_vector: profile dict -> features;
* the segmenter (``Segmenter.fit``): its ARI against the personas on the
  replay's latest profiles, and fit time and predict rate on populations of
  1,000 to 50,000 users -- the work of one event-time mark;
* each propensity classifier (logistic regression, Hoeffding tree):
  predict (with checkpoint storage), and learn (River learn_one on stored
  points), plus its prequential ROC-AUC on this stream;
* snapshot size and to_bytes/from_bytes time of both models, and of the
  propensity model with 50,000 users pending in the portable and the old pickle format.
"""
import argparse
import random
import statistics
import sys
import time
from collections import Counter

from sklearn.metrics import adjusted_rand_score, roc_auc_score

from onboardflow.models import snapshot
from onboardflow.models.features import feature_vector
from onboardflow.models.propensity import CLASSIFIERS, DAY_MS, PropensityModel
from onboardflow.models.segmentation import Segmenter
from onboardflow.runners.cli.evaluate import replay_profiles
from onboardflow.runners.sim.generator import GeneratorConfig
from onboardflow.transforms.online_models import LEARNER_SNAPSHOT_KIND, LearnerState


def median_rate(n, runs):
    return n / statistics.median(runs)


def timed(fn, repeats):
    runs, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - t0)
    return runs, result


def bench_segmenter(points, repeats, sizes=(1_000, 10_000, 50_000)):
    """The population fit at a mark, and scoring, on every user's latest profile.

    Populations larger than the replay are the replay's latest vectors
    cycled with a little noise (fit time depends on rows, not on who they are).
    """
    latest, persona = {}, {}
    for key, who, _, x, _ in points:
        latest[key], persona[key] = x, who
    keys = sorted(latest)
    rows = [latest[k] for k in keys]
    seg = Segmenter(seed=42).fit(rows)
    ari = adjusted_rand_score([persona[k] for k in keys], [seg.predict_one(latest[k]) for k in keys])
    print(f"  fit on the replay's {len(rows):,} users: ARI vs personas {ari:.3f}, "
          f"labels {sorted(seg.labels().values())}")
    rng = random.Random(1)
    for n in sizes:
        population = [{f: v * (1 + rng.gauss(0, 0.02)) for f, v in rows[i % len(rows)].items()} for i in range(n)]
        fit_runs, model = timed(lambda: Segmenter(seed=42).fit(population), repeats)
        predict_runs, _ = timed(lambda: [model.predict_one(x) for x in population], repeats)
        print(f"  population {n:>7,}: fit {statistics.median(fit_runs):6.2f} s  "
              f"predict {median_rate(n, predict_runs):>9,.0f}/s", flush=True)


def bench_propensity(points, repeats):
    for name in CLASSIFIERS:
        def prequential():
            model = PropensityModel(classifier=name)
            outcomes, done = [], set()
            predict_s = 0.0
            for key, _, at, x, progress in points:
                outcomes += model.expire(at)
                if progress >= 1.0 and key not in done:
                    done.add(key)
                    outcomes += model.label(key, 1, at)
                t0 = time.perf_counter()
                model.predict(key, x, at)
                predict_s += time.perf_counter() - t0
            return model, outcomes, predict_s

        results = [prequential() for _ in range(repeats)]
        model, outcomes, _ = results[-1]
        predict_rate = len(points) / statistics.median(r[2] for r in results)
        auc = roc_auc_score([o.label for o in outcomes], [o.probability for o in outcomes])
        auc_at_label = roc_auc_score([o.label for o in outcomes], [o.probability_at_label for o in outcomes])
        # Learning alone, timed on every update's features with the user's stream label.
        label_of = {o.user_key: o.label for o in outcomes}
        stored = [(x, label_of.get(key, 0)) for key, _, _, x, _ in points]

        def learn_only():
            m = PropensityModel(classifier=name).model
            for x, y in stored:
                m.learn_one(x, bool(y))

        learn_runs, _ = timed(learn_only, repeats)
        print(f"  {name:<20} ROC-AUC {auc:.3f} (at label {auc_at_label:.3f})  "
              f"predict {predict_rate:>9,.0f}/s  learn {median_rate(len(stored), learn_runs):>9,.0f}/s "
              f"({len(outcomes):,} labelled points)", flush=True)


def bench_snapshots(points, repeats):
    latest = {key: x for key, _, _, x, _ in points}
    seg = Segmenter(seed=42).fit([latest[k] for k in sorted(latest)])
    prop = PropensityModel()
    for key, _, at, x, _ in points:
        prop.predict(key, x, at)
        prop.expire(at)
    for name, model, cls in (("segmenter", seg, Segmenter), ("propensity", prop, PropensityModel)):
        dump_runs, data = timed(model.to_bytes, repeats)
        load_runs, _ = timed(lambda: cls.from_bytes(data), repeats)
        print(f"  {name:<11} {len(data):>10,} bytes  to_bytes {statistics.median(dump_runs) * 1000:7.1f} ms  "
              f"from_bytes {statistics.median(load_runs) * 1000:7.1f} ms"
              + (f"  ({prop.pending_users:,} users pending)" if name == "propensity" else ""))


def bench_propensity_formats(points, repeats, pending_users=(50_000,)):
    """The propensity snapshot with users awaiting labels: portable JSON (format 2) vs the pickle it replaced.

    Each synthetic pending user has three stored points (day 0, 1, 2), as in
    ``bench_learner_checkpoint``; the model has learned the replay first.
    """
    vectors = [x for _, _, _, x, _ in points]
    for n in pending_users:
        model = PropensityModel()
        for key, _, at, x, _ in points:
            model.predict(key, x, at)
            model.expire(at)
        model.expire(10 ** 15)
        for i in range(n):
            for day in range(3):
                model.predict(f"u{i}", vectors[(3 * i + day) % len(vectors)], day * DAY_MS + i)
        for label, dump in (("format 2, JSON", model.to_bytes),
                            ("format 1, pickle", lambda: snapshot.dump("propensity", model))):
            dump_runs, data = timed(dump, repeats)
            load_runs, _ = timed(lambda: PropensityModel.from_bytes(data), repeats)
            print(f"  {model.pending_users:>7,} users pending, {label:<16}: {len(data) / 1e6:6.1f} MB  "
                  f"dump {statistics.median(dump_runs) * 1000:7.0f} ms  "
                  f"load {statistics.median(load_runs) * 1000:7.0f} ms", flush=True)
        served = model.to_bytes(include_pending=False)
        print(f"  serving copy (include_pending=False): {len(served):,} bytes")


def bench_learner_checkpoint(points, repeats, pending_users=(10_000, 50_000)):
    """The learning stage's Beam-state checkpoint (written after every batch) as users await labels.

    Each synthetic pending user has three stored points (day 0, 1, 2 of the
    3-day horizon) with the feature vectors of the replay, cycled.
    """
    vectors = [x for _, _, _, x, _ in points]
    for n in pending_users:
        learner = LearnerState()
        for i in range(n):
            for day in range(3):
                learner.propensity.predict(f"u{i}", vectors[(3 * i + day) % len(vectors)], day * DAY_MS + i)
        for level in (6, 1):
            dump_runs, data = timed(lambda: snapshot.dump(LEARNER_SNAPSHOT_KIND, learner, level=level), repeats)
            load_runs, _ = timed(lambda: snapshot.load(LEARNER_SNAPSHOT_KIND, data), repeats)
            print(f"  {n:>7,} users pending, zlib level {level}: {len(data) / 1e6:6.1f} MB  "
                  f"dump {statistics.median(dump_runs) * 1000:7.0f} ms  "
                  f"load {statistics.median(load_runs) * 1000:7.0f} ms"
                  + ("  (what the learner writes)" if level == 1 else ""), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    stats = Counter()
    t0 = time.perf_counter()
    ticks = list(replay_profiles(GeneratorConfig(users=args.users, seed=42), stats=stats))
    print(f"replay: {args.users:,} users, {stats['events']:,} events -> {len(ticks):,} profile updates "
          f"in {time.perf_counter() - t0:.1f} s")
    runs, vectors = timed(lambda: [feature_vector(t.profile) for t in ticks], args.repeats)
    print(f"feature_vector: {median_rate(len(ticks), runs):,.0f} profiles/s")
    # (user_key, persona, at_ms, features, onboarding progress), in event-time order
    points = [(t.user_key, t.persona, t.at_ms, x, t.profile.get("onboarding_progress") or 0.0)
              for t, x in zip(ticks, vectors)]
    print("segmenter (k-means on the population at a mark; docs/models.md):")
    bench_segmenter(points, args.repeats)
    print("propensity (delayed labels, 7-day horizon):")
    bench_propensity(points, args.repeats)
    print("snapshots:")
    bench_snapshots(points, args.repeats)
    print("propensity snapshot formats (models/propensity.py to_bytes):")
    bench_propensity_formats(points, args.repeats)
    print("learner checkpoint (transforms/online_models.py LearnerState, per batch):")
    bench_learner_checkpoint(points, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
