"""``ApiConfig``: everything one personalization API server needs, built once by `onboardflow serve` (or a test).

The deployment's settings (runners/settings.py) give the defaults: Redis and
its key prefix, the warehouse (for erasures and experiment exposures), Kafka and the consumer group
(for the lag in ``/v1/status``), the API keys file. The pseudonymization
secret is passed in as bytes, loaded by the CLI from the deployment's key
file or the flags (runners/cli/secret.py); None leaves the server up but not
ready (``/readyz`` 503, profiles 503, decisions fall back). Without a
warehouse the decisions still serve experiments but record no exposures. Options with a
trade-off are explained in docs/api.md.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ...models.tracks import DEFAULT_TRACKS_PATH
from ...transforms.experiments import DEFAULT_EXPERIMENTS_PATH
from ..settings import Settings
from .catalogue import DEFAULT_STEPS_PATH

#: 14 days: the pipeline re-emits a silent user's profile at least weekly until dormancy
#: (docs/redis-contract.md "Freshness"), so a profile older than two refreshes is suspect.
DEFAULT_STALE_AFTER_S = 14 * 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    redis_url: str
    key_prefix: str
    api_keys_file: Path
    secret: Optional[bytes] = dataclasses.field(default=None, repr=False)
    warehouse_dsn: Optional[str] = None
    """The warehouse for erasures and experiment exposures, as the schema owner's role where the deployment
    has one; None: no erasures, no exposures recorded."""
    warehouse_schema: str = "warehouse"
    kafka_bootstrap: Optional[str] = None
    """Kafka for the consumer lag of ``/v1/status``; None leaves the lag out."""
    consumer_group: str = "onboardflow"
    topics: tuple[str, ...] = ("onboarding.events",)
    stale_after_s: Optional[float] = DEFAULT_STALE_AFTER_S
    """A profile whose last accepted write is older than this gets the fallback decision; None: never."""
    rate_per_s: float = 100.0
    """Requests a second each API key may make on average (token bucket refill)."""
    rate_burst: int = 200
    """Requests a key may make at once after being idle (token bucket size)."""
    redis_timeout_s: float = 0.25
    """Per Redis command: a slower Redis is answered as unreachable (decisions fall back)."""
    lag_timeout_s: float = 3.0
    """The consumer-lag reading of ``/v1/status`` gives up after this long (then ``kafka_error`` says so)."""
    tracks_file: Path = DEFAULT_TRACKS_PATH
    steps_file: Path = DEFAULT_STEPS_PATH
    experiments_file: Path = DEFAULT_EXPERIMENTS_PATH
    """The experiments the decisions serve (transforms/experiments.py)."""
    exposure_flush_ms: float = 200.0
    """Exposures wait at most this long in the server before their batch goes to the warehouse."""
    exposure_batch_rows: int = 500
    """A batch of exposures goes as soon as it holds this many."""
    exposure_queue_rows: int = 20_000
    """Exposures a server holds while the warehouse is slow or away; beyond, new ones are dropped (counted)."""

    @classmethod
    def from_settings(cls, settings: Settings, secret: Optional[bytes], **overrides) -> "ApiConfig":
        """The deployment's values, then ``overrides`` (field name -> value)."""
        values = dict(
            redis_url=settings.redis_url, key_prefix=settings.redis_key_prefix,
            api_keys_file=settings.api_keys_path, secret=secret,
            warehouse_dsn=settings.warehouse_owner_dsn or settings.warehouse_dsn,
            warehouse_schema=settings.warehouse_schema, kafka_bootstrap=settings.kafka_bootstrap,
            consumer_group=settings.consumer_group, topics=(settings.events_topic,),
        )
        values.update(overrides)
        return cls(**values)
