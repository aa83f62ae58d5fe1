"""The personalization API (`onboardflow serve`): profiles and onboarding decisions for downstream apps.

Modules: ``app`` (``create_app(config)``, the FastAPI application),
``config`` (``ApiConfig``), ``routes`` (the ``/v1`` routes), ``auth`` and
``keys`` (API keys and scopes), ``ratelimit``, ``store`` (async Redis
reads), ``decisions`` and ``catalogue`` (tracks and next steps),
``status`` (model versions and lag), ``schemas`` (response bodies),
``errors``, ``access_log``, ``metrics``, ``operator`` (the operator page),
``openapi`` (the committed document). Guide: docs/api.md.
"""
