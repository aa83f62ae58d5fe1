"""``onboardflow evaluate identity``: identity stitching against the generator's ground truth.

The generator (runners/sim/generator.py) is run with cross-device visitors
(``--cross-device-share`` of users also browse anonymously on another device
before signing up; ``--login-share`` of those later log in there). Its stream,
in the order a collector sends it (out of order, late and duplicated events
included), goes through the pipeline's own stages in-process, without
services: anonymization (a throw-away secret), the identity resolver
(transforms/identity.py) and the profile machine (transforms/profile.py),
with a watermark trailing the newest event by ``--out-of-orderness-s``.

Ground truth (``JourneyGenerator.identity_truth``): every (device, account)
pair a user's events carried; *deterministic* when an event carried both ids.

* **precision**: links made that are true / links made (target >= 0.99);
* **recall**: deterministic pairs linked / deterministic pairs (>= 0.95): an
  event carried both ids, or an anonymous event of the device gave the
  account's e-mail address (reported apart too);
* **coverage**: true pairs linked / all true pairs (devices never logged in
  on cannot be linked by ids: informative, no target);
* **events moved**: anonymous events of deterministically linked devices that
  count on the right account's profile / all such events.

    onboardflow evaluate identity --users 2000 --json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional

from ...schemas.units import DAY_MS
from ...transforms.anonymize import PERSONALIZATION, EventAnonymizer, Pseudonymizer, generate_demo_secret
from ...transforms.identity import CONFLICT, IdentityConfig, LocalIdentities
from ...transforms.profile import ProfileConfig, ProfileMachine, Store, TooLate
from ..sim.generator import GeneratorConfig, JourneyGenerator

TARGETS = {"precision": 0.99, "recall": 0.95}


@dataclass
class IdentityReport:
    """The figures of one evaluation (module docstring)."""

    users: int
    devices: int
    true_pairs: int
    deterministic_pairs: int
    links: int
    correct_links: int
    conflicts: int
    precision: float
    recall: float
    coverage: float
    anonymous_events: int
    events_moved: int
    events_moved_share: float
    #: of the anonymous events not moved, those too late for any profile (arrived past the allowed lateness)
    events_too_late: int = 0
    #: deterministic pairs only an e-mail address links (the device never carried the account id)
    email_pairs: int = 0
    email_recall: float = 1.0

    def misses(self) -> list[str]:
        return [f"{name} {getattr(self, name):.4f} < {target}" for name, target in TARGETS.items()
                if getattr(self, name) < target]


def evaluate_identity(config: GeneratorConfig, out_of_orderness_ms: int = 5 * 60_000,
                      lateness_ms: int = 24 * 3_600_000) -> IdentityReport:
    """Run the generator's stream through anonymization, the resolver and the profile machine; score it."""
    generator = JourneyGenerator(config)
    secret = generate_demo_secret()
    pseudonymizer = Pseudonymizer(secret)
    anonymizer = EventAnonymizer(pseudonymizer)
    profile_config = ProfileConfig(allowed_lateness_ms=lateness_ms, dedup_horizon_ms=max(lateness_ms, 2 * DAY_MS))
    machine = ProfileMachine(profile_config, clock_ms=lambda: generator.horizon_end_ms + DAY_MS, snapshots=False)
    identities = LocalIdentities(IdentityConfig())
    states: dict = {}
    # Where each anonymous event (by event id) was folded in: the keys whose profile counts it.
    folded_on: dict[str, set] = {}
    # Anonymous events a profile refused as too late (behind the watermark by more than the lateness).
    too_late: set = set()
    conflicts = 0
    watermark = None
    for _kind, raw in generator.events():
        routed = anonymizer.anonymize(raw)
        if routed.route != PERSONALIZATION:
            continue
        event = routed.record
        forwarded, stitches = identities.resolve(event)
        conflicts += sum(1 for stitch in stitches if stitch.status == CONFLICT)
        for f in forwarded:
            key = f["user_key"]
            decisions = machine.on_event(states.get(key), f)
            if any(type(d) is Store for d in decisions):
                states[key] = next(d.state for d in decisions if type(d) is Store)
                if not f.get("identified"):
                    folded_on.setdefault(f["event_id"], set()).add(key)
            elif any(type(d) is TooLate for d in decisions) and not f.get("identified"):
                too_late.add(f["event_id"])
        t = event["occurred_at"]
        newest = t if watermark is None else max(watermark + out_of_orderness_ms, t)
        if watermark is None or newest - out_of_orderness_ms > watermark:
            watermark = newest - out_of_orderness_ms
            state = states.get(event["user_key"])
            if state is not None:
                machine.on_probe(state, watermark)

    user_of_key = {pseudonymizer.user_key(u.user_id): u.user_id for u in generator.users()}
    device_of_key = {}
    truth = list(generator.identity_truth())
    for row in truth:
        device_of_key[pseudonymizer.user_key(None, row["anonymous_id"])] = row["anonymous_id"]
    consenting = {u.user_id for u in generator.users() if u.consent["personalization"]}
    truth = [row for row in truth if row["user_id"] in consenting]
    true_pairs = {(row["anonymous_id"], row["user_id"]) for row in truth}
    deterministic = {(row["anonymous_id"], row["user_id"]) for row in truth if row["deterministic"]}
    by_email = {(row["anonymous_id"], row["user_id"]) for row in truth if row["match"] == "email"}
    made = {(device_of_key.get(device, device), user_of_key.get(link.user_key, link.user_key))
            for device, link in identities.links.items() if link is not None}
    correct = made & true_pairs

    # Events: the anonymous events of deterministically linked devices, on the right account's profile.
    owner_key = {pseudonymizer.user_key(None, a): pseudonymizer.user_key(u) for a, u in deterministic}
    moved = total = late = 0
    for _kind, raw in generator.events():
        if raw["user_id"] or not raw["anonymous_id"] or _kind != "valid":
            continue
        device = pseudonymizer.user_key(None, raw["anonymous_id"])
        if device not in owner_key:
            continue
        total += 1
        on_account = owner_key[device] in folded_on.get(raw["event_id"], ())
        moved += on_account
        late += not on_account and raw["event_id"] in too_late
    return IdentityReport(
        users=config.users, devices=len({row["anonymous_id"] for row in truth}), true_pairs=len(true_pairs),
        deterministic_pairs=len(deterministic), links=len(made), correct_links=len(correct), conflicts=conflicts,
        precision=len(correct) / len(made) if made else 1.0,
        recall=len(made & deterministic) / len(deterministic) if deterministic else 1.0,
        coverage=len(correct) / len(true_pairs) if true_pairs else 1.0,
        anonymous_events=total, events_moved=moved, events_moved_share=moved / total if total else 1.0,
        events_too_late=late,
        email_pairs=len(by_email), email_recall=len(made & by_email) / len(by_email) if by_email else 1.0)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="onboardflow evaluate identity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cross-device-share", type=float, default=0.3)
    parser.add_argument("--login-share", type=float, default=0.8)
    parser.add_argument("--out-of-orderness-s", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    config = GeneratorConfig(seed=args.seed, users=args.users, cross_device_share=args.cross_device_share,
                             cross_device_login_share=args.login_share)
    report = evaluate_identity(config, out_of_orderness_ms=int(args.out_of_orderness_s * 1000))
    if args.json:
        print(json.dumps({**asdict(report), "targets": TARGETS, "missed": report.misses()}, indent=1))
    else:
        counts = Counter({"links made": report.links, "correct": report.correct_links,
                          "conflicts": report.conflicts})
        print(f"identity stitching on {report.users:,} generated users ({report.devices:,} devices, "
              f"{report.true_pairs:,} true device-account pairs, {report.deterministic_pairs:,} deterministic)")
        print("  " + ", ".join(f"{k}: {v:,}" for k, v in counts.items()))
        print(f"  precision {report.precision:.4f} (target >= {TARGETS['precision']})   "
              f"recall {report.recall:.4f} (target >= {TARGETS['recall']})   coverage {report.coverage:.4f}")
        print(f"  of the deterministic pairs, {report.email_pairs:,} are linked by e-mail only: "
              f"recall {report.email_recall:.4f}")
        print(f"  anonymous events of linked devices on the account's profile: {report.events_moved:,} of "
              f"{report.anonymous_events:,} ({report.events_moved_share:.4f}); of the rest, "
              f"{report.events_too_late:,} arrived too late for any profile")
        for miss in report.misses():
            print(f"  MISSED: {miss}")
    return 1 if report.misses() else 0


if __name__ == "__main__":
    sys.exit(main())
