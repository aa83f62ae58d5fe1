"""The ``/v1`` routes of the personalization API: profiles, decisions, segments, status, erasure.

Each route takes the raw user id (``/visitors/...``: the raw device id) in its path, derives the pseudonym with the
deployment's secret (``Pseudonymizer``, as the anonymization stage does) and
never returns, logs or counts the raw id. Scopes: ``profiles:read`` for
profiles, decisions and status; ``segments:read`` for segments;
``users:erase`` for erasure (auth.py). Behaviour and examples: docs/api.md.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

import redis
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.convertors import Convertor, register_url_convertor

from ...schemas.contract import PROFILE_FIELDS
from ...transforms.erasure import ErasureRequest
from .auth import require
from .decisions import SECRET_UNAVAILABLE, STORE_UNAVAILABLE, decide, fallback_decision
from .errors import ApiError, responses
from .schemas import Decision, ErasureReport, NextStep, Profile, SegmentPage, SegmentSizes, Status, json_safe


class RawIdConvertor(Convertor):
    """A path segment run for user ids: any characters at all, slashes and line breaks included
    (Starlette's ``path`` stops at a line break, and the id would then not be found)."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("rawid", RawIdConvertor())

router = APIRouter(prefix="/v1")
UserId = Path(min_length=1, max_length=256, description="The raw user id (URL-encoded); pseudonymized by the "
                                                        "service, never stored, logged or returned")
_CONTRACT_FIELDS = tuple(f.name for f in PROFILE_FIELDS)


def _user_key(request: Request, user_id: str) -> str:
    pseudonymizer = request.app.state.service.pseudonymizer
    if pseudonymizer is None:
        raise ApiError(503, "secret_unavailable", "the service has no pseudonymization secret loaded")
    return pseudonymizer.user_key(user_id)


def etag(profile: dict) -> str:
    """The profile's entity tag: its version, and its model version (re-scoring rewrites model fields in place)."""
    return f'"{profile.get("version")}-{profile.get("model_version") or "none"}"'


def _matches(if_none_match: Optional[str], tag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in candidates or tag in candidates


VisitorId = Path(min_length=1, max_length=256, description="The raw device (anonymous) id the app knows before "
                                                           "login (URL-encoded); pseudonymized like a user id")
NOT_MODIFIED = {304: {"description": "Not modified: the profile still has the ETag sent in If-None-Match"}}
IfNoneMatch = Header(None, description="An ETag from an earlier response")


def _visitor_key(request: Request, anonymous_id: str) -> str:
    pseudonymizer = request.app.state.service.pseudonymizer
    if pseudonymizer is None:
        raise ApiError(503, "secret_unavailable", "the service has no pseudonymization secret loaded")
    return pseudonymizer.user_key(None, anonymous_id)


def _store_unavailable() -> ApiError:
    return ApiError(503, "store_unavailable", "the profile store (Redis) cannot be read right now",
                    headers={"Retry-After": "1"})


def _profile_response(profile: Optional[dict], user_key: str, if_none_match: Optional[str],
                      missing: str = "no profile for this user (never written, expired or erased)") -> Response:
    """A stored profile as the typed body with its ``ETag`` (304 for a matching ``If-None-Match``); 404 for None."""
    if profile is None:
        raise ApiError(404, "not_found", missing, user_key=user_key)
    tag = etag(profile)
    headers = {"ETag": tag, "Cache-Control": "private, no-cache"}
    if _matches(if_none_match, tag):
        return Response(status_code=304, headers=headers)
    body = {name: None for name in _CONTRACT_FIELDS}
    body.update(json_safe(profile))
    return JSONResponse(body, headers=headers)


@router.get("/profiles/{user_id:rawid}", response_model=Profile, responses={
    **NOT_MODIFIED, **responses(401, 403, 404, 429, 503)})
async def get_profile(request: Request, user_id: str = UserId, if_none_match: Optional[str] = IfNoneMatch,
                      _key=Depends(require("profiles:read"))):
    """The user's profile, typed; ``ETag`` from its version, ``If-None-Match`` answers 304 while it is unchanged."""
    user_key = _user_key(request, user_id)
    try:
        profile = await request.app.state.service.reader.profile(user_key)
    except redis.RedisError:
        raise _store_unavailable() from None
    return _profile_response(profile, user_key, if_none_match)


@router.get("/visitors/profile/{anonymous_id:rawid}", response_model=Profile, responses={
    **NOT_MODIFIED, **responses(401, 403, 404, 429, 503)})
async def get_visitor_profile(request: Request, anonymous_id: str = VisitorId,
                              if_none_match: Optional[str] = IfNoneMatch, _key=Depends(require("profiles:read"))):
    """The profile of a device before login: the visitor's own, or, once identity stitching linked the
    device to an account, the account's (its ``user_key`` then is the account's pseudonym)."""
    visitor_key = _visitor_key(request, anonymous_id)
    try:
        profile, account_key = await request.app.state.service.reader.visitor_profile(visitor_key)
    except redis.RedisError:
        raise _store_unavailable() from None
    return _profile_response(profile, account_key or visitor_key, if_none_match,
                             "no profile for this visitor, nor for an account it was stitched to "
                             "(never written, expired or erased)")


async def _decision(request: Request, user_key: Optional[str], read) -> Decision:
    """The decision for the profile ``read()`` returns as (profile, the key it is stored under), the fallback
    when there is none, it is stale, Redis cannot be read or (``user_key`` None) no secret is loaded."""
    service = request.app.state.service
    if user_key is None:
        decision = fallback_decision(SECRET_UNAVAILABLE, service.catalogue)
    else:
        try:
            profile, user_key = await read()
        except redis.RedisError:
            decision = fallback_decision(STORE_UNAVAILABLE, service.catalogue, user_key)
        else:
            now_ms = time.time_ns() // 1_000_000
            decision = decide(profile, now_ms=now_ms, stale_after_s=service.config.stale_after_s,
                              policy=service.policy, catalogue=service.catalogue, user_key=user_key,
                              experiments=service.experiments)
            if decision.experiments and service.exposures is not None:
                service.exposures.record(decision.user_key, decision.experiments, now_ms)
    if decision.fallback:
        service.metrics.fallback(decision.fallback_reason)
        request.state.fallback_reason = decision.fallback_reason
    return Decision(
        user_key=decision.user_key, track=decision.track, track_rule=decision.track_rule,
        segments=decision.segments, segment_label=decision.segment_label, experiments=decision.experiments,
        next_steps=[NextStep(id=s.id, title=s.title) for s in decision.next_steps],
        fallback=decision.fallback, fallback_reason=decision.fallback_reason,
        profile_version=decision.profile_version, updated_at=decision.updated_at,
        catalogue_version=decision.catalogue_version)


@router.get("/decisions/{user_id:rawid}", response_model=Decision, responses=responses(401, 403, 429))
async def get_decision(request: Request, user_id: str = UserId, _key=Depends(require("profiles:read"))):
    """Track, segments, next steps and experiment variants for the user; the fallback decision (``fallback:
    true``, no experiments) when the user is unknown, the profile stale or Redis unreachable, never an error for
    those. Each variant served is recorded as an exposure in the warehouse, off the request path."""
    service = request.app.state.service
    user_key = None if service.pseudonymizer is None else service.pseudonymizer.user_key(user_id)

    async def read():
        return await service.reader.profile(user_key), user_key
    return await _decision(request, user_key, read)


@router.get("/visitors/decision/{anonymous_id:rawid}", response_model=Decision,
            responses=responses(401, 403, 429))
async def get_visitor_decision(request: Request, anonymous_id: str = VisitorId,
                               _key=Depends(require("profiles:read"))):
    """The decision for a device before login, from the visitor's profile or, once stitched, its account's
    (``user_key`` says which); the fallback decision as for a user. Personalizes onboarding before sign-in."""
    service = request.app.state.service
    visitor_key = None if service.pseudonymizer is None else service.pseudonymizer.user_key(None, anonymous_id)

    async def read():
        profile, account_key = await service.reader.visitor_profile(visitor_key)
        return profile, account_key or visitor_key
    return await _decision(request, visitor_key, read)


@router.get("/segments", response_model=SegmentSizes, responses=responses(401, 403, 429, 503))
async def list_segments(request: Request, _key=Depends(require("segments:read"))):
    """Every rule segment (pipelines/segment_rules.yaml) and how many users its set holds."""
    service = request.app.state.service
    try:
        sizes = await service.reader.segment_sizes(service.segment_names)
    except redis.RedisError:
        raise _store_unavailable() from None
    return SegmentSizes(segments=[{"name": n, "size": s} for n, s in sizes.items()],
                        rules_version=service.rules.version)


@router.get("/segments/{name}/members", response_model=SegmentPage, responses=responses(401, 403, 404, 429, 503))
async def segment_members(request: Request, name: str = Path(max_length=64),
                          cursor: str = Query("0", pattern=r"^[0-9]{1,20}$",
                                              description="From the previous page's next_cursor; 0 starts"),
                          limit: int = Query(100, ge=1, le=1000, description="About this many members a page"),
                          _key=Depends(require("segments:read"))):
    """One page of the segment's members (pseudonyms), by Redis SSCAN: follow ``next_cursor`` until it is null.
    A page may hold more or fewer than ``limit`` members; a member may repeat across pages."""
    service = request.app.state.service
    if name not in service.segment_names:
        raise ApiError(404, "not_found", f"no segment named {name!r} in the rules "
                       f"(known: {', '.join(sorted(service.segment_names))})")
    position = int(cursor)
    if position >= 2 ** 64:
        raise ApiError(404, "not_found", "cursor out of range")
    try:
        following, members = await service.reader.segment_page(name, position, limit)
    except redis.RedisError:
        raise _store_unavailable() from None
    return SegmentPage(segment=name, members=members, next_cursor=str(following) if following else None)


@router.get("/status", response_model=Status, responses=responses(401, 403, 429))
async def status(request: Request, _key=Depends(require("profiles:read"))):
    """The serving model versions and the pipeline's consumer and event-time lag; an outage shows as an error
    field, never as an error status."""
    service = request.app.state.service
    models, models_error = {}, None
    try:
        models = await asyncio.wait_for(asyncio.to_thread(service.models.read), service.config.lag_timeout_s)
    except (redis.RedisError, asyncio.TimeoutError) as exc:
        models_error = f"model registry unreadable: {type(exc).__name__}"
    lag = await service.lag.read() if service.lag is not None else None
    return Status(models=models, models_error=models_error, lag=lag, tracks_version=str(service.policy.version),
                  catalogue_version=service.catalogue.version, rules_version=service.rules.version)


@router.delete("/users/{user_id:rawid}", response_model=ErasureReport, responses=responses(401, 403, 429, 503))
async def erase_user(request: Request, user_id: str = UserId, key=Depends(require("users:erase"))):
    """Erase the user everywhere (transforms/erasure.py): profile, segment memberships, pending outbox entries,
    warehouse rows; recorded in the audit table with the key's name as who asked. Idempotent."""
    service = request.app.state.service
    user_key = _user_key(request, user_id)
    if service.eraser is None:
        raise ApiError(503, "warehouse_unavailable", "this server has no warehouse configured for erasures")
    try:
        report = await asyncio.to_thread(service.eraser.erase,
                                         ErasureRequest(user_key, f"api-key:{key.name}", source="api"))
    except redis.RedisError:
        raise ApiError(503, "store_unavailable", "the profile store (Redis) cannot be written right now; "
                       "retry: an erasure is idempotent", headers={"Retry-After": "5"}) from None
    except Exception as exc:  # noqa: BLE001 - psycopg's errors: the warehouse is down or refuses
        if type(exc).__module__.startswith("psycopg"):
            raise ApiError(503, "warehouse_unavailable", f"the warehouse refused or is unreachable "
                           f"({type(exc).__name__}); retry: an erasure is idempotent",
                           headers={"Retry-After": "5"}) from None
        raise
    return ErasureReport(erasure_id=report.erasure_id, user_key=report.user_key, removed=report.removed,
                         completed_at=report.completed_at.isoformat(), already_audited=report.already_audited)
