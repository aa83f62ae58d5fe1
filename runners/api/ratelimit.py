"""Per-key rate limit of the personalization API: one token bucket per API key.

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second;
each request takes one. An empty bucket refuses the request with the time
until the next token (the 429's ``Retry-After``). Buckets live in the
server's memory: each server process limits on its own (docs/api.md).
Requests run on one event loop, so no lock is needed.

>>> clock = iter([0.0, 0.0, 0.0, 0.5]).__next__
>>> limiter = RateLimiter(rate=2, burst=2, clock=clock)
>>> limiter.take("k"), limiter.take("k"), limiter.take("k"), limiter.take("k")
(0.0, 0.0, 0.5, 0.0)
"""
from __future__ import annotations

import time
from typing import Callable


class RateLimiter:
    """Token buckets by key id. ``take(key)`` -> 0.0 when allowed, else the seconds to wait."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("the rate limit needs rate > 0 requests/s and burst >= 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        now = self._clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate
