"""`onboardflow serve`: the personalization API (runners/api/, docs/api.md) on uvicorn.

    onboardflow serve [--host 127.0.0.1] [--port 8080] [--workers 1] [--stale-after 14d]
                      [--rate-limit 100] [--rate-burst 200] [--api-keys-file PATH]
                      [--experiments-file PATH] [--exposure-flush-ms 200]
                      [store flags] [--secret-file PATH | --secret-env NAME]
                      [--bootstrap-servers ... --consumer-group ... --topic ...]
    onboardflow serve --write-openapi docs/api/openapi.json

Redis, the key prefix, the warehouse (for erasures and experiment
exposures), Kafka (for the lag in
``/v1/status``), the API keys file and the pseudonymization secret default to
the deployment's (runners/settings.py, runners/cli/secret.py); the secret
is required: the service holds it so apps never do. Keys: `onboardflow
apikeys`. One JSON access-log line per request goes to stdout (route
template, status, latency, key name; never a user id or a key); the
service's own messages go to stderr. Runs until interrupted (SIGINT/SIGTERM:
in-flight requests finish). ``--write-openapi`` writes the OpenAPI document
and exits.

``--workers N`` runs N server processes on the one port (uvicorn's process
manager; one process is one GIL, and one process answers about 500 requests a
second on this project's 2-core machine: docs/performance.md "The API"). Each
worker builds its own app from the same flags (``OBF_API_SERVE_ARGV``, flags
only: the secret is read again from its file or variable, never passed); the
rate limit is split between them (each allows ``--rate-limit``/N, burst
``--rate-burst``/N, so a key gets about the limit over the port);
``/metrics`` sums every worker (prometheus-client's multiprocess mode, files
in a private temporary directory removed at exit).

Exit status: 0 stopped cleanly (or document written), 2 usage or configuration error.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .secret import add_secret_flags, cli_secret

PROG = "onboardflow serve"
_LOG = logging.getLogger("onboardflow.serve")
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> Optional[float]:
    """``90``, ``90s``, ``15m``, ``6h``, ``14d`` -> seconds; ``off`` -> None (never stale)."""
    if text == "off":
        return None
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 90s, 15m, 6h, 14d, or off")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _parser() -> argparse.ArgumentParser:
    from ..api.config import DEFAULT_STALE_AFTER_S
    from ..settings import add_store_flags, settings

    deployment = settings()
    parser = argparse.ArgumentParser(prog=PROG, description="Serve the personalization API (docs/api.md).")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes on the port (default: %(default)s; see the module docstring)")
    parser.add_argument("--api-keys-file", type=Path, default=deployment.api_keys_path,
                        help="hashed API keys (`onboardflow apikeys`; default: %(default)s)")
    parser.add_argument("--stale-after", type=duration_s, default=DEFAULT_STALE_AFTER_S, metavar="DURATION",
                        help="serve the fallback decision for a profile the store last wrote longer ago "
                             "(90s, 15m, 6h, 14d, or off; default: 14d)")
    parser.add_argument("--rate-limit", type=float, default=100.0, metavar="PER_S",
                        help="requests a second per API key, on average (default: %(default)g)")
    parser.add_argument("--rate-burst", type=int, default=200,
                        help="requests a key may make at once (default: %(default)s)")
    parser.add_argument("--redis-timeout-ms", type=float, default=250.0,
                        help="per Redis read; slower is answered as unavailable (default: %(default)g)")
    parser.add_argument("--bootstrap-servers", default=deployment.kafka_bootstrap,
                        help="Kafka, for the consumer lag of /v1/status ('' leaves it out; default: %(default)s)")
    parser.add_argument("--consumer-group", default=deployment.consumer_group,
                        help="the pipeline's consumer group (default: %(default)s)")
    parser.add_argument("--topic", action="append", default=None,
                        help=f"a topic the pipeline reads; repeat (default: {deployment.events_topic})")
    parser.add_argument("--experiments-file", type=Path, default=None, metavar="PATH",
                        help="the experiments the decisions serve (default: pipelines/experiments.yaml)")
    parser.add_argument("--exposure-flush-ms", type=float, default=200.0, metavar="MS",
                        help="longest wait before served variants are written to the warehouse as exposures "
                             "(default: %(default)g)")
    parser.add_argument("--write-openapi", type=Path, default=None, metavar="PATH",
                        help="write the OpenAPI document to PATH and exit")
    add_store_flags(parser, deployment)
    # Erasing deletes rows: the schema owner's role where the deployment has one (docs/security.md).
    parser.set_defaults(warehouse_dsn=deployment.warehouse_owner_dsn or deployment.warehouse_dsn)
    add_secret_flags(parser, deployment)
    return parser


def _access_log_to_stdout() -> None:
    from ..api.access_log import ACCESS_LOGGER

    logger = logging.getLogger(ACCESS_LOGGER)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


#: The worker processes' flags (``--workers`` > 1): `serve`'s own argv, as JSON.
WORKER_ARGV = "OBF_API_SERVE_ARGV"


def _app(args, workers: int = 1):
    """The app for parsed ``args`` (each worker's share of the rate limit), or an exit status on a refusal."""
    try:
        secret = cli_secret(args, PROG)
    except SystemExit as exit_:
        return int(exit_.code)

    from ...transforms.experiments import ExperimentError
    from ..api.app import create_app
    from ..api.catalogue import CatalogueError
    from ..api.config import ApiConfig
    from ..api.keys import ApiKeyError
    from ..settings import settings

    config = ApiConfig.from_settings(
        settings(), secret, redis_url=args.redis_url, key_prefix=args.key_prefix,
        api_keys_file=args.api_keys_file, warehouse_dsn=args.warehouse_dsn or None,
        warehouse_schema=args.warehouse_schema, kafka_bootstrap=args.bootstrap_servers or None,
        consumer_group=args.consumer_group, topics=tuple(args.topic or (settings().events_topic,)),
        stale_after_s=args.stale_after, rate_per_s=args.rate_limit / workers,
        rate_burst=max(1, math.ceil(args.rate_burst / workers)), redis_timeout_s=args.redis_timeout_ms / 1000,
        exposure_flush_ms=args.exposure_flush_ms,
        **({"experiments_file": args.experiments_file} if args.experiments_file else {}))
    try:
        app = create_app(config)
    except (ApiKeyError, CatalogueError, ExperimentError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    _access_log_to_stdout()
    return app


def worker_app():
    """A worker process's app (``--workers`` > 1): built from the flags in ``OBF_API_SERVE_ARGV``."""
    args = _parser().parse_args(json.loads(os.environ[WORKER_ARGV]))
    app = _app(args, args.workers)
    if isinstance(app, int):
        raise SystemExit(app)
    return app


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.write_openapi is not None:
        from ..api.openapi import write

        print(f"wrote {write(args.write_openapi)}")
        return 0
    if args.workers < 1:
        print(f"{PROG}: --workers must be at least 1", file=sys.stderr)
        return 2
    app = _app(args)  # built here in every case: a refusal (no secret, a bad keys file) stops before any worker
    if isinstance(app, int):
        return app

    import uvicorn

    keys = len(app.state.service.keys)
    _LOG.info("serving the personalization API on http://%s:%d (prefix '%s', %d active API keys in %s, %d worker%s)",
              args.host, args.port, args.key_prefix, keys, args.api_keys_file, args.workers,
              "" if args.workers == 1 else "s")
    if keys == 0:
        _LOG.warning("no active API key: every /v1 request is refused; `onboardflow apikeys create NAME --scopes ...`")
    common = dict(host=args.host, port=args.port, access_log=False, log_config=None, server_header=False,
                  lifespan="on", timeout_graceful_shutdown=10)
    if args.workers == 1:
        server = uvicorn.Server(uvicorn.Config(app, **common))
        server.run()
        return 0 if server.started else 2
    metrics_dir = tempfile.mkdtemp(prefix="onboardflow-api-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[WORKER_ARGV] = json.dumps(argv)
    try:
        uvicorn.run(f"{__package__}.serve:worker_app", factory=True,
                    workers=args.workers, **common)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
