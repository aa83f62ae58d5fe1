"""Every error body of the personalization API has one shape: ``{"error": CODE, "detail": TEXT, ...}``.

``ApiError`` carries the status, the code, a sentence for people, optional
headers (``WWW-Authenticate``, ``Retry-After``) and extra fields
(``missing_scope``, ``retry_after_s``); ``ErrorBody`` is its OpenAPI schema.
Codes: ``unauthorized`` 401, ``forbidden`` 403, ``not_found`` 404,
``rate_limited`` 429, ``store_unavailable`` / ``secret_unavailable`` /
``warehouse_unavailable`` 503. Bodies never carry a raw user id or a key.
"""
from __future__ import annotations

from typing import Any, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    error: str
    detail: str
    missing_scope: Optional[str] = None
    scopes: Optional[list[str]] = None
    retry_after_s: Optional[int] = None


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: Optional[dict[str, str]] = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers, self.extra = status, error, detail, headers, extra

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, "detail": self.detail, **self.extra}, status_code=self.status,
                            headers=self.headers)


def responses(*statuses: int) -> dict[int, dict]:
    """The OpenAPI ``responses`` entry of a route's error statuses."""
    text = {401: "No valid API key", 403: "The key lacks the route's scope", 404: "Not found",
            429: "Over the key's rate limit", 503: "A store the route needs is unavailable"}
    return {s: {"model": ErrorBody, "description": text[s]} for s in statuses}
