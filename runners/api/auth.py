"""Who is calling, and may they: API keys with scopes, and the per-key rate limit, as FastAPI dependencies.

In: the ``Authorization: Bearer <key>`` header. Out: the caller's ``ApiKey``
(its name goes to the access log), or an ``ApiError``:

* 401 ``unauthorized``: no key, or a key that is malformed, unknown or revoked
  (the body says which of "missing" or "not valid", never why a key is invalid);
* 403 ``forbidden``: a valid key without the route's scope (the body names the
  scope it lacks and the scopes it has);
* 429 ``rate_limited``: the key's bucket is empty (``Retry-After`` in seconds).

Keys and scopes: keys.py; the rate limit: ratelimit.py; docs/api.md.
"""
from __future__ import annotations

import math
from typing import Optional

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .keys import ApiKey

bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="An API key from `onboardflow apikeys create`: `Authorization: Bearer obf_…`")


def require(scope: str):
    """A dependency that lets a request through only with a valid key holding ``scope``, within its rate."""

    async def check(request: Request,
                    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> ApiKey:
        service = request.app.state.service
        if credentials is None:
            raise ApiError(401, "unauthorized", "missing API key: send `Authorization: Bearer <key>`",
                           headers={"WWW-Authenticate": "Bearer"})
        key = service.keys.authenticate(credentials.credentials)
        if key is None:
            raise ApiError(401, "unauthorized", "API key not valid (unknown, revoked or malformed)",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        request.state.api_key_name = key.name
        if scope not in key.scopes:
            raise ApiError(403, "forbidden", f"API key '{key.name}' lacks the scope {scope}",
                           missing_scope=scope, scopes=list(key.scopes))
        wait = service.limiter.take(key.id)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            raise ApiError(429, "rate_limited", f"API key '{key.name}' is over its rate limit "
                           f"({service.limiter.rate:g} requests/s, burst {service.limiter.burst})",
                           headers={"Retry-After": str(retry_after)}, retry_after_s=retry_after)
        return key

    check.__name__ = f"require_{scope.replace(':', '_')}"
    return check
