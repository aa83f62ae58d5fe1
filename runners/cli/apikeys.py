"""`onboardflow apikeys`: create, list and revoke the personalization API's keys (runners/api/keys.py).

    onboardflow apikeys create NAME --scopes profiles:read[,segments:read,users:erase] [--keys-file PATH]
    onboardflow apikeys list [--json] [--keys-file PATH]
    onboardflow apikeys revoke NAME [--keys-file PATH]

``create`` prints the new key once, on stdout alone (``KEY=$(onboardflow
apikeys create ...)`` captures it); only its SHA-256 is stored, so it cannot
be shown again: a lost key is revoked and replaced. ``list`` shows names,
ids, scopes and dates, never a key. ``revoke`` takes effect on a running
server within about a second. The file defaults to the deployment's
(``OBF_API_KEYS_FILE``, else ``$OBF_RUN_DIR/keys/<deployment>.apikeys.json``)
and is written with mode 0600. Scopes: docs/api.md.

Exit status: 0 done, 1 nothing listed, 2 usage error or a refused change.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

PROG = "onboardflow apikeys"


def _parser() -> argparse.ArgumentParser:
    from ..api.keys import SCOPES
    from ..settings import settings

    default = settings().api_keys_path
    parser = argparse.ArgumentParser(prog=PROG, description="Manage the personalization API's keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="make a key and print it once")
    create.add_argument("name", help="who uses the key (e.g. onboarding-ui); recorded in logs and audits")
    create.add_argument("--scopes", required=True,
                        help=f"comma-separated, of: {', '.join(SCOPES)}")
    listing = sub.add_parser("list", help="every key (revoked ones marked), never a key itself")
    listing.add_argument("--json", action="store_true", help="one JSON object")
    revoke = sub.add_parser("revoke", help="refuse the key from now on")
    revoke.add_argument("name")
    for cmd in (create, listing, revoke):
        cmd.add_argument("--keys-file", type=Path, default=default, help="the keys file (default: %(default)s)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from ..api.keys import ApiKeyError, KeyFile

    keys = KeyFile(args.keys_file)
    try:
        if args.command == "create":
            plaintext, entry = keys.create(args.name, [s.strip() for s in args.scopes.split(",") if s.strip()])
            print(plaintext)
            print(f"{PROG}: created key '{entry.name}' (id {entry.id}, scopes {', '.join(entry.scopes)}) in "
                  f"{args.keys_file}; it is shown only this once", file=sys.stderr)
            return 0
        if args.command == "revoke":
            entry = keys.revoke(args.name)
            print(f"revoked key '{entry.name}' (id {entry.id}) at {entry.revoked_at}")
            return 0
        entries = keys.load()
    except ApiKeyError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"keys": [{k: v for k, v in e.as_json().items() if k != "sha256"} for e in entries]},
                         indent=2, sort_keys=True))
        return 0 if entries else 1
    if not entries:
        print(f"no API keys in {args.keys_file}")
        return 1
    width = max(len(e.name) for e in entries)
    for e in entries:
        state = f"revoked {e.revoked_at}" if e.revoked_at else "active"
        print(f"{e.name:<{width}}  {e.id}  {','.join(e.scopes):<42}  created {e.created_at}  {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
