"""`onboardflow erase`: the right to erasure, for one user or from the erasure-request topic.

    onboardflow erase USER_ID --requested-by WHO [--json] [store and secret flags]
    onboardflow erase --follow [--topic TOPIC] [--group GROUP] [--idle-exit SECONDS] [...]

USER_ID is the raw account id; it is pseudonymized here with the
deployment's secret and goes no further (never printed, logged or stored).
The erasure itself (transforms/erasure.py) suppresses the pseudonym, removes
the user's profile, segment memberships and pending outbox entries from Redis
and their rows from the warehouse, and writes an audit row. What it removed is
printed by store; ``--json`` prints the report as one object.

``--follow`` consumes the erasure-request topic (default: the deployment's
events topic with ``.erasures`` instead of ``.events``) in its own consumer
group and erases each request, committing the offset after the erasure, so a
crash repeats at most the erasures not yet committed (each keyed by its
coordinates: a repeat removes nothing more and keeps the first audit row).
A request is a JSON value ``{"user_id": ..., "requested_by": ...,
"requested_at": ISO 8601 (optional)}``; anything else is a dead letter (raw
bytes, reason ``invalid_erasure_request``, stage ``erasure``) on the
deployment's dead-letter topic, and counted. ``--idle-exit`` stops after that
many seconds without a record (tests, one-shot jobs); without it the command
runs until interrupted.

Exit status: 0 done, 2 usage or configuration error.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional

from .secret import add_secret_flags, cli_secret

_LOG = logging.getLogger(__name__)
PROG = "onboardflow erase"
INVALID_REQUEST = "invalid_erasure_request"


def _parser() -> argparse.ArgumentParser:
    from ..settings import add_store_flags, settings

    deployment = settings()
    parser = argparse.ArgumentParser(prog=PROG, description="Erase a user from the profile store and the warehouse.")
    parser.add_argument("user_id", nargs="?", metavar="USER_ID", help="raw user id (pseudonymized here, never echoed)")
    parser.add_argument("--requested-by", help="who asked for the erasure (recorded in the audit row)")
    parser.add_argument("--follow", action="store_true", help="consume the erasure-request topic instead")
    parser.add_argument("--topic", default=erasure_topic(deployment.events_topic),
                        help="erasure-request topic (default: %(default)s)")
    parser.add_argument("--group", default=f"{deployment.consumer_group}-erasure",
                        help="consumer group of --follow (default: %(default)s)")
    parser.add_argument("--bootstrap", default=deployment.kafka_bootstrap, help="Kafka bootstrap servers")
    parser.add_argument("--dead-letter-topic", default=deployment.dead_letter_topic,
                        help="where malformed requests go (default: %(default)s)")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                        help="with --follow: stop after this long without a record")
    parser.add_argument("--json", action="store_true", help="print each report as one JSON object")
    add_store_flags(parser, deployment)
    # Erasing deletes rows: the schema owner's role where the deployment has one (docs/security.md).
    parser.set_defaults(warehouse_dsn=deployment.warehouse_owner_dsn or deployment.warehouse_dsn)
    add_secret_flags(parser, deployment)
    return parser


def erasure_topic(events_topic: str) -> str:
    """The erasure-request topic beside ``events_topic`` (``onboarding.events`` -> ``onboarding.erasures``)."""
    base = events_topic[: -len(".events")] if events_topic.endswith(".events") else events_topic
    return f"{base}.erasures"


def _print(report, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"erasure_id": report.erasure_id, "user_key": report.user_key,
                          "removed": report.removed, "completed_at": report.completed_at.isoformat(),
                          "already_audited": report.already_audited}, sort_keys=True), flush=True)
        return
    removed = ", ".join(f"{name} {n}" for name, n in sorted(report.removed.items()))
    again = " (already carried out before: audit row kept)" if report.already_audited else ""
    print(f"erased user_key {report.user_key[:12]}…: {report.total} items removed ({removed}); "
          f"audit row {report.erasure_id}{again}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if bool(args.user_id) == bool(args.follow):
        print(f"{PROG}: give exactly one of USER_ID or --follow", file=sys.stderr)
        return 2
    if args.user_id and not args.requested_by:
        print(f"{PROG}: --requested-by is required (the audit row records who asked)", file=sys.stderr)
        return 2
    try:
        secret = cli_secret(args, PROG)
    except SystemExit as exit_:
        return int(exit_.code)

    from ...transforms.anonymize import Pseudonymizer
    from ...transforms.connections import redis_client
    from ...transforms.erasure import ErasureRequest, UserEraser
    from ...transforms.profile_store.keys import ProfileKeys

    pseudonymizer = Pseudonymizer(secret)
    client = redis_client(args.redis_url, socket_timeout=30, socket_connect_timeout=10)
    try:
        eraser = UserEraser(client, ProfileKeys(args.key_prefix), args.warehouse_dsn, args.warehouse_schema)
        if args.user_id:
            _print(eraser.erase(ErasureRequest(pseudonymizer.user_key(args.user_id), args.requested_by)), args.json)
            return 0
        return _follow(args, eraser, pseudonymizer, client)
    finally:
        client.close()


def _follow(args, eraser, pseudonymizer, client) -> int:
    from kafka import KafkaConsumer
    from kafka.structs import OffsetAndMetadata

    from ...schemas.wire import InvalidEvent
    from ...transforms.connections import kafka_config
    from ...transforms.decode import OnboardingEventDecoder
    from ...transforms.erasure import erasure_request_from_message
    from ...transforms.kafka.records import KafkaRecord
    from ...transforms.outbox.dead_letters import DeadLetterOutbox, dead_letter_id
    from ...transforms.outbox.keys import DEAD_LETTERS, OutboxKeys
    from ...transforms.outbox.settings import RelaySettings, make_relays

    consumer = KafkaConsumer(args.topic, **kafka_config(args.bootstrap, group_id=args.group,
                                                        enable_auto_commit=False, auto_offset_reset="earliest"))
    # Malformed requests take the pipeline's dead-letter path: recorded once per source
    # coordinate in the outbox, relayed to the dead-letter topic and the warehouse.
    outbox = DeadLetterOutbox(client, OutboxKeys(args.key_prefix))
    relay = make_relays(RelaySettings(args.redis_url, args.key_prefix, bootstrap_servers=args.bootstrap,
                                      dead_letter_topic=args.dead_letter_topic, warehouse_dsn=args.warehouse_dsn,
                                      warehouse_schema=args.warehouse_schema), client)[DEAD_LETTERS]
    decoder = OnboardingEventDecoder()
    erased = dead = 0
    last_record = time.monotonic()
    try:
        while args.idle_exit is None or time.monotonic() - last_record < args.idle_exit:
            for tp, records in consumer.poll(timeout_ms=1000).items():
                for record in records:
                    last_record = time.monotonic()
                    request = erasure_request_from_message(record.value, record.topic, record.partition,
                                                           record.offset, pseudonymizer.user_key)
                    if request is None:
                        raw = KafkaRecord(record.topic, record.partition, record.offset, record.timestamp,
                                          record.key, record.value)
                        letter = decoder.dead_letter(raw, InvalidEvent(
                            INVALID_REQUEST, "not a JSON object with non-empty string user_id and requested_by"),
                            stage="erasure")
                        outbox.write([(dead_letter_id(letter), record.key, decoder.encode_dead_letter(letter))])
                        relay.relay()
                        dead += 1
                    else:
                        _print(eraser.erase(request), args.json)
                        erased += 1
                    consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
    finally:
        relay.close()
        consumer.close()
    print(f"{PROG}: {erased} erasure(s) carried out, {dead} malformed request(s) dead-lettered", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
