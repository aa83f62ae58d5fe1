"""The response bodies of the personalization API (pydantic models, hence the OpenAPI document).

``Profile`` is generated from the profile contract (schemas/contract.py), so
a new contract field appears in the API and its document without an edit
here: every field with its JSON type (``str``, ``int``, ``float``, ``bool``;
``json`` fields as lists of names or maps of counts), null when the stored
profile lacks it, plus any field the store holds beyond the contract (a newer
pipeline's) as it decodes. Non-finite floats (``nan``, ``inf``) are served as
null: JSON has no such numbers.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from ...schemas.contract import PROFILE_FIELDS


def _json_type(field) -> Any:
    if field.type == "json":
        avro = field.avro or {}
        if isinstance(avro, dict) and avro.get("type") == "map":
            return dict[str, str] if avro.get("values") == "string" else dict[str, int]
        return list[str]
    return {"str": str, "int": int, "float": float, "bool": bool}[field.type]


def _profile_model() -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for f in PROFILE_FIELDS:
        if f.name in ("user_key", "version"):
            fields[f.name] = (_json_type(f), Field(description=f.doc))
        else:
            fields[f.name] = (Optional[_json_type(f)], Field(None, description=f.doc))
    return create_model("Profile", __config__=ConfigDict(extra="allow"),
                        __doc__="A user's profile as the pipeline stored it (docs/redis-contract.md); "
                                "user_key is the pseudonym, never the raw id.", **fields)


Profile = _profile_model()


def json_safe(profile: dict[str, Any]) -> dict[str, Any]:
    """``profile`` with non-finite floats as None (JSON cannot carry them)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in profile.items()}


class NextStep(BaseModel):
    id: str = Field(description="Stable step id (pipelines/onboarding_steps.yaml)")
    title: str


class Decision(BaseModel):
    user_key: Optional[str] = Field(None, description="The pseudonym the decision is for (null without a secret)")
    track: str = Field(description="Onboarding track (pipelines/onboarding_tracks.yaml)")
    track_rule: Optional[str] = Field(None, description="'profile' when the pipeline chose the track, else the "
                                                        "track policy's rule; null for a fallback")
    segments: list[str] = Field(description="Rule segments the user is in")
    segment_label: Optional[str] = Field(None, description="The online model's behaviour segment")
    next_steps: list[NextStep]
    experiments: dict[str, str] = Field(default_factory=dict,
                                        description="Experiment -> variant, for every running experiment the "
                                                    "user is eligible for (pipelines/experiments.yaml); "
                                                    "empty for a fallback")
    fallback: bool = Field(description="True: the configured default decision, not a personalized one")
    fallback_reason: Optional[str] = Field(None, description="unknown_user, stale_profile, store_unavailable or "
                                                             "secret_unavailable; null when personalized")
    profile_version: Optional[int] = None
    updated_at: Optional[int] = Field(None, description="When the store accepted the profile (epoch ms)")
    catalogue_version: str


class SegmentPage(BaseModel):
    segment: str
    members: list[str] = Field(description="Pseudonyms (user_key) in the segment; never raw ids")
    next_cursor: Optional[str] = Field(None, description="Pass as ?cursor= for the next page; null at the end")


class SegmentSize(BaseModel):
    name: str
    size: int


class SegmentSizes(BaseModel):
    segments: list[SegmentSize]
    rules_version: str


class ModelPointer(BaseModel):
    version_id: str
    version: int
    generation: int
    pinned: bool
    updated_at: str


class Lag(BaseModel):
    group: str
    total_lag: Optional[int] = Field(None, description="Records the pipeline's group has yet to read; null "
                                                       "when Kafka could not be read")
    partitions: int
    event_time_lag_s: Optional[float] = None
    kafka_error: Optional[str] = None
    redis_error: Optional[str] = None
    taken_at: float


class Status(BaseModel):
    models: dict[str, Optional[ModelPointer]] = Field(description="Kind -> serving version (null: none published)")
    models_error: Optional[str] = None
    lag: Optional[Lag] = Field(None, description="Null when the server has no Kafka configured")
    tracks_version: str
    catalogue_version: str
    rules_version: str


class ErasureReport(BaseModel):
    erasure_id: str
    user_key: str = Field(description="The erased pseudonym (the raw id is never returned)")
    removed: dict[str, int] = Field(description="Items removed, by store")
    completed_at: str
    already_audited: bool


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    redis: bool
    secret: bool
    keys: int = Field(description="Active API keys loaded")
