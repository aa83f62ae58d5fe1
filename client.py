"""``onboardflow.client``: a typed Python client of the personalization API (`onboardflow serve`, docs/api.md).

    from onboardflow.client import OnboardflowClient, NotFound

    with OnboardflowClient("http://127.0.0.1:8080", api_key) as api:
        decision = api.decision("user-42")           # Decision: track, next_steps, fallback, ...
        if not decision.fallback:
            print(decision.track, [step.id for step in decision.next_steps])
        current = api.profile("user-42")              # VersionedProfile: .profile (a Profile dict), .etag
        again = api.profile("user-42", if_none_match=current.etag)   # None: unchanged (304)
        for user_key in api.iter_segment_members("dormant"):
            ...

Each method is one HTTP request (``iter_segment_members`` follows the
cursor). Raw user ids go to the service, which pseudonymizes them; what comes
back carries pseudonyms (``user_key``) only. Refusals raise ``ApiError``
subclasses: ``Unauthorized`` (401), ``Forbidden`` (403, ``missing_scope``),
``NotFound`` (404), ``RateLimited`` (429, ``retry_after_s``), ``Unavailable``
(503). Needs httpx (the ``[api]`` extra); the client keeps one connection
pool, so reuse it (and close it, or use it as a context manager).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Optional, TypedDict
from urllib.parse import quote

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("onboardflow.client needs httpx: pip install 'onboardflow[api]'") from exc


class Profile(TypedDict, total=False):
    """A profile as the pipeline stored it (docs/redis-contract.md); every contract field, null when absent.
    A newer pipeline's extra fields are in the dict too."""

    user_key: str
    version: int
    as_of: Optional[int]
    updated_at: Optional[int]
    engagement_score: Optional[float]
    intent_score: Optional[float]
    feature_usage_score: Optional[float]
    first_event_at: Optional[int]
    last_event_at: Optional[int]
    signup_at: Optional[int]
    recency_ms: Optional[int]
    events_total: Optional[int]
    events_7d: Optional[int]
    events_30d: Optional[int]
    active_days_7d: Optional[int]
    active_days_30d: Optional[int]
    event_counts: Optional[dict[str, int]]
    features_used: Optional[dict[str, int]]
    distinct_features: Optional[int]
    milestones: Optional[list[str]]
    tutorial_steps_done: Optional[int]
    tutorial_step_total: Optional[int]
    onboarding_progress: Optional[float]
    days_since_signup: Optional[float]
    purchased_plan: Optional[str]
    session_count: Optional[int]
    sessions_7d: Optional[int]
    sessions_30d: Optional[int]
    avg_session_duration_s: Optional[float]
    last_session_duration_s: Optional[float]
    avg_events_per_session: Optional[float]
    visits: Optional[int]
    median_visit_events: Optional[float]
    median_visit_duration_s: Optional[float]
    account_id: Optional[str]
    signup_plan: Optional[str]
    email_domain: Optional[str]
    device_class: Optional[str]
    country: Optional[str]
    os: Optional[str]
    rfm_last_purchase_at: Optional[int]
    rfm_recency_days: Optional[float]
    rfm_frequency: Optional[int]
    rfm_monetary: Optional[float]
    rfm_amounts_ignored: Optional[int]
    rfm_r: Optional[int]
    rfm_f: Optional[int]
    rfm_m: Optional[int]
    rfm_reference: Optional[str]
    plan: Optional[str]
    account_tier: Optional[str]
    industry: Optional[str]
    company_size: Optional[int]
    segments: Optional[list[str]]
    cluster_id: Optional[int]
    segment_label: Optional[str]
    propensity: Optional[float]
    model_version: Optional[str]
    onboarding_track: Optional[str]
    experiments: Optional[dict[str, str]]


@dataclass(frozen=True)
class VersionedProfile:
    profile: Profile
    etag: str


@dataclass(frozen=True)
class NextStep:
    id: str
    title: str


@dataclass(frozen=True)
class Decision:
    track: str
    next_steps: list[NextStep]
    fallback: bool
    catalogue_version: str
    fallback_reason: Optional[str] = None
    user_key: Optional[str] = None
    track_rule: Optional[str] = None
    segments: list[str] = field(default_factory=list)
    segment_label: Optional[str] = None
    experiments: dict[str, str] = field(default_factory=dict)
    profile_version: Optional[int] = None
    updated_at: Optional[int] = None


@dataclass(frozen=True)
class SegmentPage:
    segment: str
    members: list[str]
    next_cursor: Optional[str]


@dataclass(frozen=True)
class ModelPointer:
    version_id: str
    version: int
    generation: int
    pinned: bool
    updated_at: str


@dataclass(frozen=True)
class Lag:
    group: str
    total_lag: Optional[int]
    partitions: int
    event_time_lag_s: Optional[float]
    kafka_error: Optional[str]
    redis_error: Optional[str]
    taken_at: float


@dataclass(frozen=True)
class Status:
    models: dict[str, Optional[ModelPointer]]
    models_error: Optional[str]
    lag: Optional[Lag]
    tracks_version: str
    catalogue_version: str
    rules_version: str


@dataclass(frozen=True)
class ErasureReport:
    erasure_id: str
    user_key: str
    removed: dict[str, int]
    completed_at: str
    already_audited: bool


class ApiError(Exception):
    """A refused request: ``status``, the body's ``error`` code and ``detail`` sentence."""

    def __init__(self, status: int, error: str, detail: str, body: Optional[dict] = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.body = status, error, detail, body or {}


class Unauthorized(ApiError):
    """401: no key, or a key that is unknown, revoked or malformed."""


class Forbidden(ApiError):
    """403: the key lacks the route's scope (``missing_scope``)."""

    @property
    def missing_scope(self) -> Optional[str]:
        return self.body.get("missing_scope")


class NotFound(ApiError):
    """404: no profile for the user, or no such segment."""


class RateLimited(ApiError):
    """429: over the key's rate limit; retry after ``retry_after_s``."""

    @property
    def retry_after_s(self) -> Optional[int]:
        return self.body.get("retry_after_s")


class Unavailable(ApiError):
    """503: a store the route needs (Redis, the warehouse) or the secret is unavailable."""


def _known(cls, body: dict) -> dict:
    """The fields of ``body`` that ``cls`` has: a newer server's added fields do not break this client."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in body.items() if k in names}


_ERRORS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 429: RateLimited, 503: Unavailable}


class OnboardflowClient:
    """The API at ``base_url`` with ``api_key``; ``timeout`` seconds per request."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 2.0) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "OnboardflowClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # never the key
        return f"OnboardflowClient({str(self._http.base_url)!r})"

    def _get(self, path: str, **kwargs) -> httpx.Response:
        return self._check(self._http.get(path, **kwargs))

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        error_class = _ERRORS.get(response.status_code, ApiError)
        raise error_class(response.status_code, str(body.get("error", "error")),
                          str(body.get("detail", response.reason_phrase)), body)

    @staticmethod
    def _user(user_id: str) -> str:
        if not isinstance(user_id, str) or not user_id:
            raise ValueError("user_id must be a non-empty string")
        return quote(user_id, safe="")

    def profile(self, user_id: str, if_none_match: Optional[str] = None) -> Optional[VersionedProfile]:
        """The user's profile and its ETag; None when ``if_none_match`` is still its ETag (304)."""
        return self._profile(f"/v1/profiles/{self._user(user_id)}", if_none_match)

    def visitor_profile(self, anonymous_id: str, if_none_match: Optional[str] = None) -> Optional[VersionedProfile]:
        """A device's profile before login (its account's once stitched: ``user_key`` says which) and its ETag;
        None when ``if_none_match`` is still its ETag (304)."""
        return self._profile(f"/v1/visitors/profile/{self._user(anonymous_id)}", if_none_match)

    def _profile(self, path: str, if_none_match: Optional[str]) -> Optional[VersionedProfile]:
        headers = {"If-None-Match": if_none_match} if if_none_match else {}
        response = self._get(path, headers=headers)
        if response.status_code == 304:
            return None
        return VersionedProfile(response.json(), response.headers["ETag"])

    def decision(self, user_id: str) -> Decision:
        """Track, segments and next steps (or the fallback, ``fallback=True`` with its reason)."""
        return self._decision(f"/v1/decisions/{self._user(user_id)}")

    def visitor_decision(self, anonymous_id: str) -> Decision:
        """The decision for a device before login (from its account's profile once stitched)."""
        return self._decision(f"/v1/visitors/decision/{self._user(anonymous_id)}")

    def _decision(self, path: str) -> Decision:
        body = self._get(path).json()
        steps = [NextStep(s["id"], s["title"]) for s in body.pop("next_steps")]
        return Decision(next_steps=steps, **_known(Decision, body))

    def segment_sizes(self) -> dict[str, int]:
        return {s["name"]: s["size"] for s in self._get("/v1/segments").json()["segments"]}

    def segment_members(self, segment: str, cursor: str = "0", limit: int = 100) -> SegmentPage:
        """One page (about ``limit`` pseudonyms) and the cursor of the next (None at the end)."""
        body = self._get(f"/v1/segments/{quote(segment, safe='')}/members",
                         params={"cursor": cursor, "limit": limit}).json()
        return SegmentPage(**_known(SegmentPage, body))

    def iter_segment_members(self, segment: str, limit: int = 500) -> Iterator[str]:
        """Every pseudonym in the segment, each once, following the cursor to the end."""
        seen: set[str] = set()
        cursor: Optional[str] = "0"
        while cursor is not None:
            page = self.segment_members(segment, cursor, limit)
            for member in page.members:
                if member not in seen:
                    seen.add(member)
                    yield member
            cursor = page.next_cursor

    def status(self) -> Status:
        body = self._get("/v1/status").json()
        models = {k: (ModelPointer(**_known(ModelPointer, v)) if v else None) for k, v in body.pop("models").items()}
        lag = body.pop("lag")
        return Status(models=models, lag=Lag(**_known(Lag, lag)) if lag else None, **_known(Status, body))

    def erase_user(self, user_id: str) -> ErasureReport:
        """Erase the user everywhere (needs the users:erase scope); idempotent."""
        body = self._check(self._http.delete(f"/v1/users/{self._user(user_id)}")).json()
        return ErasureReport(**_known(ErasureReport, body))

    def ready(self) -> bool:
        """Whether the service is ready (Redis reachable, secret loaded)."""
        return self._http.get("/readyz").status_code == 200


__all__ = [
    "ApiError", "Decision", "ErasureReport", "Forbidden", "Lag", "ModelPointer", "NextStep", "NotFound",
    "OnboardflowClient", "Profile", "RateLimited", "SegmentPage", "Status", "Unauthorized", "Unavailable",
    "VersionedProfile",
]
