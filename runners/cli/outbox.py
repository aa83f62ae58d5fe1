"""`onboardflow outbox`: inspect or drain the Redis outboxes by hand.

The pipeline relays its outboxes itself after every bundle of writes
(transforms/relay.py). Use this after an incident, e.g. a pipeline that was
stopped for good after a crash, to publish what it left behind, or to see how
much is waiting::

    onboardflow outbox status --key-prefix obf
    onboardflow outbox relay --key-prefix obf --bootstrap-servers localhost:9092 \\
        --segment-changes-topic onboarding.segment-changes --dead-letter-topic onboarding.events.dlq \\
        --warehouse-dsn postgresql://... --warehouse-schema onboardflow

Relaying is safe while the pipeline runs (one relay per stream holds the lock
at a time) and safe to repeat: nothing is published twice.
"""
from __future__ import annotations

import argparse
import logging
import os

from ...transforms.outbox.keys import STREAMS, OutboxKeys
from ...transforms.outbox.settings import RelaySettings, make_relays


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onboardflow outbox", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("status", "relay"))
    p.add_argument("--redis-url", default=os.environ.get("OBF_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--key-prefix", default="obf")
    p.add_argument("--bootstrap-servers", default=None)
    p.add_argument("--segment-changes-topic", default=None)
    p.add_argument("--dead-letter-topic", default=None)
    p.add_argument("--warehouse-dsn", default=os.environ.get("OBF_WAREHOUSE_DSN"))
    p.add_argument("--warehouse-schema", default="onboardflow")
    p.add_argument("--rules-file", default=None)
    p.add_argument("--registry-url", default=None)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = RelaySettings(args.redis_url, args.key_prefix, args.bootstrap_servers, args.segment_changes_topic,
                             args.dead_letter_topic, args.warehouse_dsn, args.warehouse_schema, args.rules_file,
                             args.registry_url)
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
