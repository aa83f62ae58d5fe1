"""`onboardflow profile`: read one user's profile back from Redis, or sweep segments.

    onboardflow profile USER_ID [--redis-url URL] [--key-prefix PREFIX]
                        [--secret-file PATH | --secret-env NAME] [--json]
    onboardflow profile --key USER_KEY [--redis-url URL] [--json]
    onboardflow profile --sweep-segments [--redis-url URL]

USER_ID is the raw account id: the key is derived from it with the
pipeline's pseudonymization secret (HMAC-SHA256), exactly as the
anonymization stage does, so operators never handle keys and raw ids never
reach Redis. ``--key`` looks a profile up by its pseudonymous key instead (as
found in the warehouse or a segment set) and needs no secret.
``--sweep-segments`` removes segment-set members whose profile expired or no
longer lists the segment (see docs/redis-contract.md); run it periodically.

Redis, the key prefix and the secret default to the deployment's
(runners/settings.py; the key file is the one `onboardflow demo` writes).

Exit status: 0 found (or sweep done), 1 no such profile, 2 usage or
configuration error. The raw user id is never echoed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any, Optional

from .secret import add_secret_flags, cli_secret


def _parser() -> argparse.ArgumentParser:
    from ..settings import settings

    deployment = settings()
    parser = argparse.ArgumentParser(
        prog="onboardflow profile",
        description="Print one user's profile from the Redis profile store.",
    )
    parser.add_argument("user_id", nargs="?", metavar="USER_ID", help="raw user id (the key is derived from it)")
    parser.add_argument("--key", metavar="USER_KEY", help="look up by pseudonymous user_key instead of USER_ID")
    parser.add_argument("--sweep-segments", action="store_true",
                        help="remove stale segment-set members instead of printing a profile")
    parser.add_argument("--redis-url", default=deployment.redis_url,
                        help="Redis URL (default: the deployment's, %(default)s)")
    parser.add_argument("--key-prefix", default=deployment.redis_key_prefix,
                        help="key prefix of the store (default: the deployment's, %(default)s)")
    add_secret_flags(parser, deployment)
    parser.add_argument("--json", action="store_true", help="print the profile as one JSON object")
    return parser


#: Fields holding epoch milliseconds: printed as ISO 8601 times (``--json`` keeps the numbers).
TIME_FIELDS = ("as_of", "signup_at", "first_event_at", "last_event_at", "updated_at")


def _iso(ms: int) -> str:
    at = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _format(profile: dict[str, Any]) -> str:
    width = max(len(name) for name in profile)
    lines = []
    for name, value in profile.items():
        if name in TIME_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            text = _iso(value)
        else:
            text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    modes = sum(bool(x) for x in (args.user_id, args.key, args.sweep_segments))
    if modes != 1:
        print("onboardflow profile: give exactly one of USER_ID, --key or --sweep-segments", file=sys.stderr)
        return 2

    # Imported here so `--help` and usage errors stay fast (no Beam import).
    from ...transforms.profile_store.store import ProfileStore

    secret = None
    if args.user_id:
        try:
            secret = cli_secret(args, "onboardflow profile")
        except SystemExit as exit_:
            return int(exit_.code)
    try:
        store = ProfileStore(args.redis_url, secret, key_prefix=args.key_prefix)
    except ValueError as exc:
        print(f"onboardflow profile: {exc}", file=sys.stderr)
        return 2
    with store:
        if args.sweep_segments:
            report = store.sweep_segments()
            print(
                f"swept {report.segments_scanned} segment sets: checked {report.members_checked} members, "
                f"removed {report.members_removed}"
            )
            return 0
        profile = store.get(args.user_id) if args.user_id else store.get_by_key(args.key)
    if profile is None:
        print("onboardflow profile: no profile for this user (never written, or expired)", file=sys.stderr)
        return 1
    print(json.dumps(profile, sort_keys=True) if args.json else _format(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
