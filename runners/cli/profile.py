"""`onboardflow profile`: read one user's profile back from Redis, or sweep segments.

    onboardflow profile USER_ID [--redis-url URL] [--key-prefix obf]
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

Exit status: 0 found (or sweep done), 1 no such profile, 2 usage or
configuration error. The raw user id is never echoed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

DEFAULT_SECRET_ENV = "OBF_PSEUDONYM_SECRET"


def _default_redis_url() -> str:
    return f"redis://{os.environ.get('REDIS_HOST', '127.0.0.1')}:{os.environ.get('REDIS_PORT', '6379')}/0"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onboardflow profile",
        description="Print one user's profile from the Redis profile store.",
    )
    parser.add_argument("user_id", nargs="?", metavar="USER_ID", help="raw user id (the key is derived from it)")
    parser.add_argument("--key", metavar="USER_KEY", help="look up by pseudonymous user_key instead of USER_ID")
    parser.add_argument("--sweep-segments", action="store_true",
                        help="remove stale segment-set members instead of printing a profile")
    parser.add_argument("--redis-url", default=_default_redis_url(),
                        help="Redis URL (default: redis://$REDIS_HOST:$REDIS_PORT/0)")
    parser.add_argument("--key-prefix", default=None, help="key prefix of the store (default: obf)")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--secret-file", metavar="PATH", help="file holding the pseudonymization secret")
    secret.add_argument("--secret-env", metavar="NAME",
                        help=f"environment variable holding the secret (default: {DEFAULT_SECRET_ENV})")
    parser.add_argument("--json", action="store_true", help="print the profile as one JSON object")
    return parser


def _format(profile: dict[str, Any]) -> str:
    width = max(len(name) for name in profile)
    lines = []
    for name, value in profile.items():
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
    from ...transforms.anonymize import SecretError, load_secret
    from ...transforms.profile_store.keys import DEFAULT_KEY_PREFIX
    from ...transforms.profile_store.store import ProfileStore

    secret = None
    if args.user_id:
        try:
            secret = load_secret(path=args.secret_file,
                                 env_var=None if args.secret_file else (args.secret_env or DEFAULT_SECRET_ENV))
        except SecretError as exc:
            print(f"onboardflow profile: {exc}", file=sys.stderr)
            return 2
    try:
        store = ProfileStore(args.redis_url, secret, key_prefix=args.key_prefix or DEFAULT_KEY_PREFIX)
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
