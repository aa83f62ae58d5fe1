"""``/operator``: a small read-only operator page, static HTML and JavaScript served by the API itself.

The page (static/operator.html, static/operator.js; no external resources,
a Content-Security-Policy of ``'self'`` only) asks for an API key, keeps it in
the tab's ``sessionStorage`` only, and calls the JSON routes with it: a
profile lookup by user id (showing the pseudonym, never the id typed in,
which is cleared from the field once sent), segment sizes, serving model
versions and consumer lag. Without a key, or with a refused one, it shows the
refusal in ``#error`` and nothing else. The page itself needs no key: it
holds no data. Element ids are a contract with the browser test (docs/api.md).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

STATIC = Path(__file__).resolve().parent / "static"
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_FILES = {"operator.html": "text/html; charset=utf-8", "operator.js": "text/javascript; charset=utf-8",
          "operator.css": "text/css; charset=utf-8"}

router = APIRouter(include_in_schema=False)


def _serve(name: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=_FILES[name], headers=_HEADERS)


@router.get("/operator")
async def operator_page() -> Response:
    return _serve("operator.html")


@router.get("/operator/{name}")
async def operator_asset(name: str) -> Response:
    if name not in _FILES or name == "operator.html":
        return Response(status_code=404)
    return _serve(name)
