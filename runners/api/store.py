"""The API's reads of the Redis profile store, asynchronous (redis.asyncio), one round trip each.

In: pseudonyms and segment names. Out: typed profiles (the store's own
``decode_profile``), pages of segment members, segment sizes. Layout and
encoding: docs/redis-contract.md; the key names are the store's
(``ProfileKeys``), the connection settings the project's (``redis_settings``:
TLS, password files). Every command has a ``timeout_s`` deadline; a slower or
unreachable Redis raises ``redis.exceptions.RedisError`` (``ConnectionError``
or ``TimeoutError``), which the routes answer as unavailable.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ...transforms.connections import redis_settings
from ...transforms.profile_store.encoding import decode_profile
from ...transforms.profile_store.keys import ProfileKeys


class AsyncProfileReader:
    def __init__(self, redis_url: str, key_prefix: str, timeout_s: float = 0.25) -> None:
        self.keys = ProfileKeys(key_prefix)
        plain, credentials = redis_settings(redis_url)
        # No retries: a request must answer within its deadline, and the fallback is the answer.
        self._client = redis.asyncio.Redis.from_url(
            plain, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, client_name="onboardflow-api", **credentials)

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self) -> bool:
        return bool(await self._client.ping())

    async def profile(self, user_key: str) -> Optional[dict[str, Any]]:
        """The decoded profile of ``user_key``, or None when there is none."""
        raw = await self._client.hgetall(self.keys.profile(user_key))
        return decode_profile(raw) if raw else None

    async def visitor_profile(self, visitor_key: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """A visitor's profile, or its account's once identity stitching retired the visitor into one
        (its ``stitched`` marker names the account): (decoded profile or None, the account's key or None).
        One round trip; a second only for a stitched visitor."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.profile(visitor_key))
            pipe.get(self.keys.stitched(visitor_key))
            raw, account = await pipe.execute()
        if raw:
            return decode_profile(raw), None
        if not account:
            return None, None
        account_key = account.decode("utf-8")
        return await self.profile(account_key), account_key

    async def segment_page(self, segment: str, cursor: int, limit: int) -> tuple[int, list[str]]:
        """One SSCAN step of the segment's set: (next cursor, 0 at the end; members, about ``limit`` of them).

        SSCAN's count is a hint: a page may hold more or fewer members, even
        none before the end; a member may appear twice across pages (Redis
        guarantees every member present for the whole scan appears at least once).
        """
        cursor, members = await self._client.sscan(self.keys.segment(segment), cursor=cursor, count=limit)
        return int(cursor), sorted(m.decode("utf-8") for m in members)

    async def segment_sizes(self, segments: Iterable[str]) -> dict[str, int]:
        """SCARD of every segment's set, in one pipeline (0 for a segment nobody is in)."""
        names = list(segments)
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.scard(self.keys.segment(name))
            sizes = await pipe.execute()
        return dict(zip(names, (int(s) for s in sizes)))
