"""The `onboardflow` command line.

Each subcommand lives in its own module with a ``main(argv)``; this file only
dispatches, so `onboardflow --help` stays fast (no Beam import) and each
command parses its own flags.

    onboardflow produce ...        synthetic onboarding events to Kafka
    onboardflow registry ...       list / serve the schema registry
    onboardflow run ...            the onboarding pipeline (Beam options pass through)
    onboardflow profile USER_ID    read one profile back from Redis
"""
from __future__ import annotations

import importlib
import logging
import sys

# name -> ("module" or "module:function" relative to this package, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "produce": (".produce", "produce synthetic onboarding journeys to Kafka"),
    "registry": (".registry", "list or serve the Avro schema registry"),
    "run": ("...pipelines.onboarding", "run the onboarding personalization pipeline"),
    "profile": (".profile", "read one user's profile from Redis"),
    "warehouse": (".warehouse", "apply or inspect warehouse migrations"),
    "demo": (".demo", "produce events, run the pipeline, print a summary"),
    "lag": (".lag", "print the pipeline's consumer lag and event-time lag once"),
    "lag-exporter": (".lag:exporter_main", "serve consumer and event-time lag for Prometheus"),
    "train": (".train", "bootstrap the online segmenter from the warehouse (choose k, publish)"),
    "models": (".models", "list, show, roll back or promote model versions"),
    "outbox": (".outbox", "show or relay the outboxes (segment changes, snapshots, dead letters)"),
    "evaluate": (".evaluate",
                 "segments and propensity on four population designs: ARI, stability, calibration, plots"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: onboardflow COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `onboardflow COMMAND --help` for a command's options."]
    return "\n".join(lines)


class _BeamImportNoise(logging.Filter):
    """Drops the warning Beam logs on the root logger when it is imported without GCP's client
    libraries ("apitools not found, and bigquery client libraries are not available"): onboardflow
    uses neither, and every command printed it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().addFilter(_BeamImportNoise())
    argv = list(sys.argv[1:] if argv is None else argv)
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
    result = getattr(module, function or "main")(rest)
    return int(result or 0)


