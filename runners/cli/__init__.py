"""The `onboardflow` command line.

Each subcommand lives in its own module with a ``main(argv)``; this file only
dispatches, so `onboardflow --help` stays fast (no Beam import) and each
command parses its own flags.

    onboardflow produce ...        synthetic onboarding events to Kafka
    onboardflow registry ...       list, govern (config, check) or serve the schema registry
    onboardflow run ...            the onboarding pipeline (Beam options pass through)
    onboardflow profile USER_ID    read one profile back from Redis
    onboardflow serve ...          the personalization API (docs/api.md)
    onboardflow experiments ...    declared experiments and their reports (docs/experiments.md)
"""
from __future__ import annotations

import importlib
import logging
import re
import sys

# name -> ("module" or "module:function" relative to this package, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "produce": (".produce", "produce synthetic onboarding journeys to Kafka"),
    "registry": (".registry", "list, register, check, configure or serve the Avro schema registry"),
    "run": (".run", "run the onboarding personalization pipeline"),
    "profile": (".profile", "read one user's profile from Redis"),
    "erase": (".erase", "erase a user (or follow the erasure-request topic): profile, segments, warehouse rows"),
    "warehouse": (".warehouse", "apply or inspect warehouse migrations"),
    "demo": (".demo", "produce events, run the pipeline, print a summary"),
    "lag": (".lag", "print the pipeline's consumer lag and event-time lag once"),
    "lag-exporter": (".lag:exporter_main", "serve consumer and event-time lag for Prometheus"),
    "train": (".train", "bootstrap the online segmenter from the warehouse (choose k, publish)"),
    "models": (".models", "list, show, roll back or promote model versions"),
    "rfm": (".rfm", "fit the RFM population reference on the profile store and publish it"),
    "outbox": (".outbox", "show or relay the outboxes (segment changes, snapshots, dead letters)"),
    "serve": (".serve", "serve the personalization API (profiles, decisions, segments) over HTTP"),
    "apikeys": (".apikeys", "create, list or revoke the personalization API's keys"),
    "experiments": (".experiments", "list the declared experiments; report one (completion by variant, SRM, plot)"),
    "evaluate": (".evaluate",
                 "segments and propensity on four population designs: ARI, stability, calibration, plots"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: onboardflow COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `onboardflow COMMAND --help` for a command's options; `--verbose` (anywhere)",
              "shows Beam's and the runner's own logs and full tracebacks.",
              "Every command targets one deployment (runners/settings.py: OBF_* variables, else",
              "the endpoints `make services-up` wrote to $OBF_RUN_DIR/services.env, else the local services)."]
    return "\n".join(lines)


class _BeamImportNoise(logging.Filter):
    """Drops the warning Beam logs on the root logger when it is imported without GCP's client
    libraries ("apitools not found, and bigquery client libraries are not available"): onboardflow
    uses neither, and every command printed it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


class _RunnerChatter(logging.Filter):
    """Without ``--verbose``: only onboardflow's own records, and errors from anyone else.

    Beam, Prism's job server (a logger Beam sets to INFO itself) and the Kafka
    client log every job-state change, bundle and reconnect at INFO/WARNING on
    stderr; a command's own output is what a user ran it for.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("onboardflow") or record.levelno >= logging.ERROR


#: Errors Beam's SDK harness prints (to stderr and its log) that are no failure of the job:
#: Prism's FinalizeBundle for a bundle that registered nothing (docs/local-runner.md).
HARMLESS_HARNESS_ERRORS = ("Bundle is not in a finalizable state",)


class _QuietStderr:
    """``sys.stderr`` without the harness's harmless tracebacks (``HARMLESS_HARNESS_ERRORS``).

    Beam's SDK worker ``print``s each failed instruction's traceback in one
    write, then its newline; both are dropped for the known-harmless ones.
    """

    def __init__(self, stream):
        self._stream, self._skip_newline = stream, False

    def write(self, text: str) -> int:
        if any(marker in text for marker in HARMLESS_HARNESS_ERRORS):
            self._skip_newline = True
            return len(text)
        if self._skip_newline and text == "\n":
            self._skip_newline = False
            return len(text)
        self._skip_newline = False
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


#: Commands that run as services: operators read their logs, so a dependency's errors (a Kafka
#: broker going away, a reconnect) stay in them; the Beam and Prism chatter does not.
SERVICES = frozenset({"run", "lag-exporter", "serve"})


def configure_logging(verbose: bool = False, service: bool = False) -> None:
    """One stderr handler for every command: onboardflow's INFO and up, others' errors; everything with
    ``verbose``. ``service``: keep the Kafka client's connection errors (``SERVICES``)."""
    root = logging.getLogger()
    if not verbose and not isinstance(sys.stderr, _QuietStderr):
        sys.stderr = _QuietStderr(sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_BeamImportNoise())
    if not verbose:
        handler.addFilter(_RunnerChatter())
    handler.set_name("onboardflow-cli")
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "onboardflow-cli"] + [handler]
    root.setLevel(logging.INFO)
    # Records are made only to be dropped otherwise: keep the chattiest loggers quiet at the source.
    if not verbose:
        for name in ("apache_beam", "urllib3"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # The Kafka client logs each dropped connection it then re-opens as an ERROR; for a
        # one-shot command a failure that matters reaches it as an exception, while a service's
        # log must show the outage (docs/reliability.md).
        logging.getLogger("kafka").setLevel(logging.ERROR if service else logging.CRITICAL)
        # Except the connection layer's errors: transforms/connections.py keeps the last security
        # refusal among them for the one-line error (kafka_refusal); a one-shot's output drops them.
        logging.getLogger("kafka.net").setLevel(logging.NOTSET if service else logging.ERROR)
        if not service:
            handler.addFilter(_kafka_below_critical)


def _kafka_below_critical(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("kafka") and record.levelno < logging.CRITICAL)


def unreachable_service(exc: BaseException) -> str | None:
    """One line for a refused or failed connection to Kafka, Redis or PostgreSQL, else None.

    Looks through the exception's causes; only modules already imported are consulted.
    """
    from ...transforms.connections import kafka_refusal, redact
    from ..settings import settings

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        redis_mod, kafka_mod, psycopg_mod = (sys.modules.get(m) for m in ("redis", "kafka.errors", "psycopg"))
        hint = "is it running? `make services-up`"
        if redis_mod is not None and isinstance(exc, redis_mod.exceptions.AuthenticationError):
            return f"Redis refused the credentials: {exc} (docs/security.md)"
        if redis_mod is not None and isinstance(exc, redis_mod.exceptions.ConnectionError):
            where = re.search(r"[\w.-]+:\d+", str(exc))
            where = where.group(0) if where else redact(re.sub(r"//[^@/]*@", "//", settings().redis_url))
            if "SSL" in str(exc) or "reset by peer" in str(exc) or "closed by server" in str(exc):
                return (f"Redis at {where} refused the connection: {exc} "
                        "(TLS-only servers need a rediss:// URL and its CA, docs/security.md)")
            return f"cannot reach Redis at {where if '//' in where else 'redis://' + where}: {hint}"
        kafka_errors = tuple(getattr(kafka_mod, name) for name in ("NoBrokersAvailable", "KafkaConnectionError")
                             if hasattr(kafka_mod, name)) if kafka_mod is not None else ()
        refusal = kafka_refusal(exc)
        if refusal is not None:
            return str(refusal)
        if kafka_errors and isinstance(exc, kafka_errors):
            return f"cannot reach Kafka at {redact(settings().kafka_bootstrap)}: {hint}"
        if psycopg_mod is not None and isinstance(exc, psycopg_mod.OperationalError):
            text = str(exc).strip()
            if re.search(r"password authentication failed|SSL|certificate|no pg_hba.conf entry", text):
                return f"PostgreSQL refused the connection: {text.splitlines()[-1]} (docs/security.md)"
            if re.search(r"refused|could not connect|connection (to server|failed)|timeout expired", text):
                where = redact(re.sub(r"//[^@/]*@", "//", settings().warehouse_dsn))
                return f"cannot reach PostgreSQL at {where}: {hint}"
            return None
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    configure_logging(verbose, service=bool(argv) and argv[0] in SERVICES)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"onboardflow: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # "module" runs module.main; "module:function" runs another entry point of it.
    module_name, _, function = COMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name, package=__name__)
    try:
        result = getattr(module, function or "main")(rest)
    except Exception as exc:  # noqa: BLE001 - only connection failures are turned into one line
        message = unreachable_service(exc)
        if message is None or verbose:
            raise
        print(f"onboardflow {name}: {message}", file=sys.stderr)
        return 2
    return int(result or 0)
