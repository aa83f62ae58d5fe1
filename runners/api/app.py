"""``create_app(config)``: the personalization API as a FastAPI application (served by `onboardflow serve`).

In: an ``ApiConfig``. Out: the ASGI app with the ``/v1`` routes (routes.py),
the operational routes (``/healthz``, ``/readyz``, ``/metrics``), the
operator page (operator.py), the access log and request metrics
(access_log.py). What the app holds is one ``ApiService``: the async Redis
reader, the pseudonymizer (the service holds the secret so apps never do),
the API keys, the rate limiter, the track policy, steps catalogue and
experiments, the model-registry and lag readers, the eraser, and the
experiment exposure log (exposures.py, written in the background while the
app runs). Clients are closed when the
app shuts down. Routes, auth and fallbacks: docs/api.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import redis
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...models.tracks import TrackPolicy
from ...transforms.anonymize import Pseudonymizer
from ...transforms.connections import redis_client
from ...transforms.erasure import UserEraser
from ...transforms.experiments import ExperimentSet
from ...transforms.profile_store.keys import ProfileKeys
from ...transforms.segment import RuleSet
from . import operator, routes
from .access_log import AccessLogMiddleware
from .catalogue import StepCatalogue
from .config import ApiConfig
from .errors import ApiError
from .exposures import ExposureLog, warehouse_writer
from .keys import KeyRing
from .metrics import ApiMetrics
from .ratelimit import RateLimiter
from .schemas import Health, Readiness
from .status import LagStatus, ModelVersions
from .store import AsyncProfileReader

API_VERSION = "1.0.0"
DESCRIPTION = """Profiles and onboarding decisions of onboardflow's pipeline for downstream apps.

The service holds the pseudonymization secret: apps send raw user ids and never see or compute
pseudonyms' keys. Every `/v1` route needs an API key (`Authorization: Bearer obf_...`) with the
route's scope. Guide: docs/api.md."""


@dataclasses.dataclass
class ApiService:
    config: ApiConfig
    reader: AsyncProfileReader
    pseudonymizer: Optional[Pseudonymizer]
    keys: KeyRing
    limiter: RateLimiter
    policy: TrackPolicy
    catalogue: StepCatalogue
    experiments: ExperimentSet
    rules: RuleSet
    metrics: ApiMetrics
    models: ModelVersions
    lag: Optional[LagStatus]
    eraser: Optional[UserEraser]
    exposures: Optional[ExposureLog]
    _sync_redis: redis.Redis

    @property
    def segment_names(self) -> list[str]:
        return sorted(self.rules.names)

    async def close(self) -> None:
        if self.exposures is not None:
            await self.exposures.stop()
        await self.reader.close()
        self.models.close()
        if self.lag is not None:
            self.lag.close()
        self._sync_redis.close()


def decision_files(config: ApiConfig) -> tuple[RuleSet, TrackPolicy, StepCatalogue, ExperimentSet]:
    """The validated files a decision is made from: segment rules, tracks, steps catalogue, experiments."""
    rules = RuleSet.load()
    policy = TrackPolicy.from_yaml(config.tracks_file, rules)
    catalogue = StepCatalogue.from_yaml(config.steps_file, policy.tracks)
    return rules, policy, catalogue, ExperimentSet.load(config.experiments_file, rules.known_segments, policy.tracks)


def build_service(config: ApiConfig) -> ApiService:
    """Every client and every validated configuration file of one server (no I/O beyond reading files)."""
    rules, policy, catalogue, experiments = decision_files(config)
    metrics = ApiMetrics()
    exposures = (ExposureLog(warehouse_writer(config.warehouse_dsn, config.warehouse_schema), metrics,
                             batch_rows=config.exposure_batch_rows, flush_ms=config.exposure_flush_ms,
                             queue_rows=config.exposure_queue_rows)
                 if config.warehouse_dsn else None)
    sync_redis = redis_client(config.redis_url, socket_timeout=10, socket_connect_timeout=config.lag_timeout_s)
    eraser = (UserEraser(sync_redis, ProfileKeys(config.key_prefix), config.warehouse_dsn, config.warehouse_schema)
              if config.warehouse_dsn else None)
    lag = (LagStatus(config.kafka_bootstrap, config.consumer_group, config.topics, config.redis_url,
                     config.key_prefix, config.lag_timeout_s) if config.kafka_bootstrap else None)
    return ApiService(
        config=config, reader=AsyncProfileReader(config.redis_url, config.key_prefix, config.redis_timeout_s),
        pseudonymizer=Pseudonymizer(config.secret) if config.secret is not None else None,
        keys=KeyRing(config.api_keys_file), limiter=RateLimiter(config.rate_per_s, config.rate_burst),
        policy=policy, catalogue=catalogue, experiments=experiments, rules=rules, metrics=metrics,
        models=ModelVersions(config.redis_url, config.key_prefix, config.lag_timeout_s),
        lag=lag, eraser=eraser, exposures=exposures, _sync_redis=sync_redis)


#: error codes of the router's own refusals (an unknown path, a method a route lacks).
_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request, exc: StarletteHTTPException) -> Response:
    """The router's own errors in the API's error shape (errors.py)."""
    return ApiError(exc.status_code, _HTTP_ERRORS.get(exc.status_code, "error"), str(exc.detail),
                    headers=getattr(exc, "headers", None)).response()


def create_app(config: ApiConfig) -> FastAPI:
    """The application for ``config`` (see the module docstring)."""
    service = build_service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if service.exposures is not None:
            service.exposures.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(title="onboardflow personalization API", version=API_VERSION, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_exception_handler(ApiError, lambda request, exc: exc.response())
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(routes.router)
    app.include_router(operator.router)

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz():
        """The process is up (no dependency checked)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, tags=["operations"],
             responses={503: {"model": Readiness, "description": "Not ready: Redis unreachable or no secret"}})
    async def readyz():
        """Ready to serve: Redis answers PING and the pseudonymization secret is loaded; 503 otherwise."""
        try:
            redis_ok = await service.reader.ping()
        except redis.RedisError:
            redis_ok = False
        secret_ok = service.pseudonymizer is not None
        body = Readiness(ready=redis_ok and secret_ok, redis=redis_ok, secret=secret_ok, keys=len(service.keys))
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    async def metrics():
        """Request counts and latency by route template and status, decision fallbacks by reason."""
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(AccessLogMiddleware, metrics=service.metrics)
    return app
