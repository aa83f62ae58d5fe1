"""`onboardflow outbox`: inspect or drain the Redis outboxes by hand.

The pipeline relays its outboxes itself after every bundle of writes
(pipelines/beam/relay.py). Use this after an incident, e.g. a pipeline that was
stopped for good after a crash, to publish what it left behind, or to see how
much is waiting::

    onboardflow outbox status
    onboardflow outbox relay [--key-prefix obf --bootstrap-servers localhost:9092 \\
        --segment-changes-topic onboarding.segment-changes --dead-letter-topic onboarding.events.dlq \\
        --warehouse-dsn postgresql://... --warehouse-schema warehouse]

(the deployment's settings, runners/settings.py, unless a flag says otherwise)

Relaying is safe while the pipeline runs (one relay per stream holds the lock
at a time) and safe to repeat: nothing is published twice.
"""
from __future__ import annotations

import argparse
import logging

from ...transforms.outbox.keys import STREAMS, OutboxKeys
from ...transforms.outbox.settings import RelaySettings, make_relays


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onboardflow outbox", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("status", "relay"))
    # Every default is the deployment's (runners/settings.py).
    for flag in ("--redis-url", "--key-prefix", "--bootstrap-servers", "--segment-changes-topic",
                 "--dead-letter-topic", "--warehouse-dsn", "--warehouse-schema", "--registry-url"):
        p.add_argument(flag, default=None, help="default: the deployment's")
    p.add_argument("--rules-file", default=None)
    return p


def _with_deployment(args):
    """Fill what the flags left out from the deployment's settings."""
    from ..settings import settings

    deployment = settings()
    defaults = {"redis_url": deployment.redis_url, "key_prefix": deployment.redis_key_prefix,
                "bootstrap_servers": deployment.kafka_bootstrap,
                "segment_changes_topic": deployment.segment_changes_topic,
                "dead_letter_topic": deployment.dead_letter_topic, "warehouse_dsn": deployment.warehouse_dsn,
                "warehouse_schema": deployment.warehouse_schema, "registry_url": deployment.schema_registry_url}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = _with_deployment(_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ...transforms.segment import RuleSet

    settings = RelaySettings(args.redis_url, args.key_prefix, args.bootstrap_servers, args.segment_changes_topic,
                             args.dead_letter_topic, args.warehouse_dsn, args.warehouse_schema,
                             RuleSet.load(args.rules_file) if args.rules_file else None, args.registry_url)
    relays = make_relays(settings)
    keys = OutboxKeys(args.key_prefix)
    try:
        for name in STREAMS:
            relay = relays[name]
            if args.action == "relay":
                report = relay.relay()
                print(f"{keys.stream(name)}: relayed {report.entries} entries, sent {report.records} records "
                      f"({report.skipped} already sent), {report.rows} new warehouse rows, "
                      f"{report.rejected} rows refused")
            else:
                print(f"{keys.stream(name)}: {relay.backlog()} entries waiting")
    finally:
        for relay in relays.values():
            relay.close()
    return 0
