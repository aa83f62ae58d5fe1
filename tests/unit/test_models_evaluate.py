"""runners/cli/evaluate.py: the replay feeds the models as the pipeline would, and the report is written."""
import json
from collections import Counter

from onboardflow.runners.cli.evaluate import evaluate_design, main, population_design, replay_profiles
from onboardflow.runners.sim.generator import DAY_MS, GeneratorConfig, JourneyGenerator


def test_replay_emits_profile_updates_in_event_time_order_for_every_user():
    config = GeneratorConfig(users=30, seed=3)
    stats = Counter()
    ticks = list(replay_profiles(config, stats=stats))
    assert [t.at_ms for t in ticks] == sorted(t.at_ms for t in ticks)
    truth = {u.user_id: u.persona for u in JourneyGenerator(config).users()}
    assert {t.user_key for t in ticks} == set(truth)
    assert all(t.persona == truth[t.user_key] for t in ticks)
    assert stats["users"] == 30 and stats["updates"] == len(ticks)
    # Profiles never run ahead of the update they belong to.
    assert all(t.profile["as_of"] <= t.at_ms for t in ticks)


def test_a_silent_user_gets_a_dormancy_update_like_the_pipeline_timer():
    ticks = list(replay_profiles(GeneratorConfig(users=40, seed=5)))
    dormant = [t for t in ticks if t.profile["recency_ms"] > 30 * DAY_MS]
    assert dormant, "no churner went dormant within the horizon"
    assert all(t.persona in ("churner", "stalled") for t in dormant)


def test_evaluate_command_prints_the_per_design_table_and_writes_report_and_plots(tmp_path, capsys):
    assert main(["--designs", "generator,saas_teams", "--generator-users", "60", "--users", "150",
                 "--seed", "2", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "generator" in out and "saas_teams" in out
    assert "ARI after one live login per user" in out and "stability" in out and "Brier" in out
    assert "personas x segments" in out
    report = json.loads((tmp_path / "report.json").read_text())
    by_name = {d["design"]: d for d in report["designs"]}
    assert set(by_name) == {"generator", "saas_teams"}
    for d in by_name.values():
        assert d["scored_share"] == 1.0  # the final sweep scores everyone
        assert sum(sum(row.values()) for row in d["contingency"].values()) == d["users"]
        assert 0.0 <= d["brier"] <= 1.0 and d["calibration"]
        assert len(set(d["labels"].values())) == len(d["labels"])
    for name in ("contingency.png", "calibration.png", "evaluation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_design_is_refused(capsys):
    assert main(["--designs", "nope", "--quiet"]) == 2
    assert "unknown designs" in capsys.readouterr().err


def test_the_same_design_evaluates_to_the_same_segments_twice():
    design = population_design("mobile_consumer", users=200, seed=3)
    a, b = evaluate_design(design, n_clusters=4), evaluate_design(design, n_clusters=4)
    assert a.contingency == b.contingency and a.labels == b.labels and a.ari_live == b.ari_live


def test_every_user_silent_at_the_end_of_the_new_user_window_gets_an_update_then():
    # The pipeline's lifecycle timer fires at signup + 7 days (+1 ms), when the
    # "new user" rules flip, even without a new event; the replay does too,
    # exactly once per user, with the profile advanced to that moment.
    config = GeneratorConfig(users=40, seed=5)
    signup = {u.user_id: u.signup_ms for u in JourneyGenerator(config).users()}
    ticks = list(replay_profiles(config))
    window_end = {k: s + 7 * DAY_MS + 1 for k, s in signup.items()}
    at_window_end = [t for t in ticks if t.at_ms == window_end[t.user_key]]
    assert at_window_end, "no user was silent when their new-user window ended"
    assert len({t.user_key for t in at_window_end}) == len(at_window_end)
    for t in at_window_end:
        assert t.profile["as_of"] == t.at_ms
        assert t.profile["recency_ms"] > 0
