"""The API's OpenAPI document, as committed in docs/api/openapi.json.

``openapi_text()`` is the document FastAPI generates from the routes and
response models, as indented JSON; a unit test holds the committed file equal
to it (tests/unit/test_api_openapi.py). Regenerate it after changing a route:

    make openapi            # or: onboardflow serve --write-openapi docs/api/openapi.json
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import ApiConfig

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.json"


def openapi_text() -> str:
    """The document of an app built with placeholder settings (no connection is made)."""
    from .app import create_app

    app = create_app(ApiConfig(redis_url="redis://127.0.0.1:6379/0", key_prefix="obf",
                               api_keys_file=Path("/nonexistent/apikeys.json")))
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"


def write(path: Path = DOCUMENT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(openapi_text(), encoding="utf-8")
    return path
