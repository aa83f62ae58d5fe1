"""The pseudonymization secret for commands that take raw user ids (`profile`, `erase`).

``add_secret_flags`` gives a parser ``--secret-file`` / ``--secret-env``;
``cli_secret`` loads the secret from them, else from ``$OBF_PSEUDONYM_SECRET``,
else from the deployment's key file (the one `onboardflow demo` writes), and
exits with status 2 and a message naming where it looked (never the secret).
"""
from __future__ import annotations

import os
import sys

DEFAULT_SECRET_ENV = "OBF_PSEUDONYM_SECRET"


def add_secret_flags(parser, deployment) -> None:
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--secret-file", metavar="PATH", help="file holding the pseudonymization secret")
    secret.add_argument("--secret-env", metavar="NAME",
                        help=f"environment variable holding the secret (default: {DEFAULT_SECRET_ENV} when set, "
                             f"else the deployment's key file {deployment.key_file})")


def cli_secret(args, prog: str) -> bytes:
    """The secret ``args`` point at; exits 2 with a message when there is none."""
    from ...transforms.anonymize import SecretError, load_secret
    from ..settings import settings

    secret_file = args.secret_file
    if not secret_file and not args.secret_env and not os.environ.get(DEFAULT_SECRET_ENV):
        key_file = settings().key_file  # written by `onboardflow demo`
        if not key_file.is_file():
            print(f"{prog}: no pseudonymization key for deployment '{settings().deployment}': "
                  f"{key_file} does not exist (`onboardflow demo` writes it) and ${DEFAULT_SECRET_ENV} is "
                  "not set; pass --secret-file or --secret-env", file=sys.stderr)
            raise SystemExit(2)
        secret_file = key_file
    try:
        return load_secret(path=secret_file, env_var=None if secret_file else (args.secret_env or DEFAULT_SECRET_ENV))
    except SecretError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
