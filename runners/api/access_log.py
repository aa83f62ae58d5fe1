"""Access log and request metrics of the personalization API: one ASGI middleware, one JSON line per request.

Each line (logger ``onboardflow.api.access``, INFO) is a JSON object::

    {"at": "2026-12-07T05:43:03.123Z", "method": "GET", "route": "/v1/decisions/{user_id}",
     "status": 200, "latency_ms": 1.84, "key": "onboarding-ui", "worker": 4242, "fallback": "unknown_user"}

``route`` is the route template, never the path, and there is no query
string: a raw user id appears in neither. ``key`` is the API key's *name*
(None when no valid key was sent); the key itself is never logged.
``worker`` is the serving process's pid (`serve --workers N`).
``fallback`` is present on decisions served with the fallback. The same
numbers feed ``ApiMetrics`` (``metrics.py``).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time

from .metrics import UNMATCHED, ApiMetrics

ACCESS_LOGGER = "onboardflow.api.access"
_LOG = logging.getLogger(ACCESS_LOGGER)
_CONVERTER = re.compile(r"\{(\w+):\w+\}")  # {user_id:path} -> {user_id}, as the OpenAPI document names it


def route_template(scope) -> str:
    """The template of the route that answered (``scope["route"]``, set by FastAPI's router), or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return _CONVERTER.sub(r"{\1}", path) if path else UNMATCHED


class AccessLogMiddleware:
    """Times every HTTP request, then logs it and counts it (``ApiMetrics``)."""

    def __init__(self, app, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.worker = os.getpid()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - started
            route = route_template(scope)
            self.metrics.observe(scope["method"], route, status, seconds)
            if _LOG.isEnabledFor(logging.INFO):
                state = scope.get("state") or {}
                line = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace(
                            "+00:00", "Z"),
                        "method": scope["method"], "route": route, "status": status,
                        "latency_ms": round(seconds * 1000, 3), "key": state.get("api_key_name"),
                        "worker": self.worker}
                if state.get("fallback_reason"):
                    line["fallback"] = state["fallback_reason"]
                _LOG.info(json.dumps(line, separators=(",", ":")))
