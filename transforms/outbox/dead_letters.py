"""Dead letters of the Kafka source, recorded in the outbox once per source coordinate.

In: ``(id, raw key, framed Avro value)`` triples; ``dead_letter_id`` gives a
letter its deterministic id. Out: how many were new; a replayed id records
nothing. The relay (``relay.py``) publishes the stream to the DLQ topic.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Optional

import redis

from .keys import DEAD_LETTERS, OutboxKeys
from .retry import retry_transient

# KEYS[1] the set of recorded ids, KEYS[2] the dead-letter stream.
# ARGV: [1] id, [2] framed Avro value, [3] raw key ('' when none), [4] '1' if there is a key.
#: the ``operation`` label of its Redis errors in ``onboardflow_redis_errors_total``
REDIS_OPERATION = "dead_letter_outbox"

RECORD_DEAD_LETTER_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'v', ARGV[2], 'k', ARGV[3], 'hk', ARGV[4])
return 1
"""


def dead_letter_id(letter: dict) -> str:
    """The deterministic id of a dead letter: ``topic/partition/offset`` of its source record.

    Letters without Kafka coordinates get ``sha256:<hex of the payload>``.
    """
    topic, partition, offset = letter.get("source_topic"), letter.get("source_partition"), letter.get("source_offset")
    if isinstance(topic, str) and topic and isinstance(partition, int) and isinstance(offset, int) and offset >= 0:
        return f"{topic}/{partition}/{offset}"
    payload = letter.get("value") or b""
    return "sha256:" + hashlib.sha256(payload if isinstance(payload, bytes) else str(payload).encode()).hexdigest()


class DeadLetterOutbox:
    """Records dead letters in the outbox once per id (``write(batch)``).

    Transient Redis errors are retried for up to ``retry_s`` seconds, then raised;
    ``on_redis_error(operation)`` (operation ``"dead_letter_outbox"``) is called
    after every failed attempt: the ``onboardflow_redis_errors_total`` counter.
    """

    def __init__(self, client: redis.Redis, keys: OutboxKeys, retry_s: float = 300.0,
                 on_redis_error: Optional[Callable[[str], None]] = None):
        self._client, self._keys, self._retry_s = client, keys, retry_s
        self._on_error = None if on_redis_error is None else (lambda _error: on_redis_error(REDIS_OPERATION))
        self._script = client.register_script(RECORD_DEAD_LETTER_LUA)

    def write(self, batch: Sequence[tuple[str, Optional[bytes], bytes]]) -> int:
        if not batch:
            return 0

        def once() -> int:
            pipe = self._client.pipeline(transaction=False)
            for letter_id, key, value in batch:
                self._script(keys=[self._keys.dead_letter_ids, self._keys.stream(DEAD_LETTERS)],
                             args=[letter_id, value, key or b"", "1" if key is not None else "0"], client=pipe)
            return sum(int(r) for r in pipe.execute())
        return retry_transient(once, self._retry_s, "dead-letter outbox", on_error=self._on_error)
