"""The model registry: versioned model snapshots, served from Redis, kept in the warehouse.

Online models (``models.segmentation.Segmenter``, ``models.propensity.PropensityModel``)
and the offline bootstrap (``onboardflow train``) publish serialized snapshots
here; scoring stages load the *current* snapshot of each kind; an operator
rolls a bad model back with one command (``onboardflow models rollback``).

Two stores, two jobs:

* the **warehouse** (``model_versions``, ``model_pointers``, ``model_events``
  from ``schemas/warehouse/V003__models.sql`` and ``V005__model_retention.sql``)
  is the authority: it numbers versions, keeps every version ever published
  (its payload until retention prunes it), where each kind's serving pointer
  is, and every move of that pointer;
* **Redis** is the serving copy (``ModelStore``, key layout below and in
  docs/redis-contract.md): what a scoring worker reads, in one round trip,
  without touching PostgreSQL.

Every change is decided in one PostgreSQL transaction (serialized per kind by
an advisory lock) and then mirrored to Redis by one Lua script that writes the
version hash and moves the pointer atomically, *only if* the pointer's
``generation`` is newer than the one Redis holds. So a reader never sees a
pointer to a missing version, and a slow writer never puts an older pointer
back. If the mirror step fails (Redis down), the warehouse already holds the
decision: retrying the same call, or ``sync``, finishes it.

Idempotence: a version is identified by the SHA-256 of its payload, unique per
kind. Publishing a payload the registry already has returns the existing
version and creates nothing, so a publish retried after a lost reply (or a
batch job retried after a crash, with seeded training) never makes two
versions of one model.

Pointer rules: ``publish`` of a new payload makes it current, unless the kind
is *pinned*. ``rollback`` moves the pointer back (to the newest version older
than the current one, or to ``to_version``) and pins it, so the next
scheduled snapshot of the model that was just rolled back does not silently
undo the rollback; new versions are still recorded while pinned.
``promote`` moves the pointer to any version (default: the newest) and
unpins. Every move is a row in ``model_events``.

Retention: ``prune(kind, keep_last, keep_days)`` drops the payload of old
versions from both stores and keeps their warehouse row (id, SHA-256, counts,
metrics, ``pruned_at``), so the pointer's history stays readable. It never
prunes the version either store serves, the newest ``keep_last`` versions, the
versions the newest ``keep_last`` pointer moves served, nor, with
``keep_days``, versions published or served in the last ``keep_days`` days.
A pruned version cannot be served again (``rollback`` and ``promote`` refuse
it by name, and ``rollback`` without a target steps over it) until its exact
bytes are published again, which restores its payload under the same version.
Pruning takes the same per-kind lock as publish, and is idempotent; the
learner may call it after every publish (docs/models-registry.md#retention).

Redis layout (prefix ``obf`` by default; ``{kind}`` is ``segmentation`` or
``propensity``, ``{n}`` the version number in decimal)::

    obf:model:{kind}:current   hash: version, version_id, generation, pinned (0/1),
                               payload_sha256, updated_at (epoch ms)
    obf:model:{kind}:v:{n}     hash: payload (bytes), payload_sha256, version_id, source,
                               counts (json), metrics (json), created_at (epoch ms)
    obf:model:{kind}:versions  sorted set of the version numbers mirrored (score = n)

Nothing here expires: a model must not vanish from under a scoring worker.
``prune`` deletes the ``v:{n}`` hashes (and zset members) of pruned versions,
never the one ``current`` names, checked inside the same Lua script.
Version ids read ``seg-000012`` / ``prop-000003`` (``ModelVersion.id``).

Example (needs Redis and PostgreSQL with the migrations applied)::

    registry = ModelRegistry(redis_url, warehouse_dsn)
    result = registry.publish("segmentation", segmenter.to_bytes(),
                              counts={"users": 5000}, metrics={"silhouette": 0.52})
    result.version.id                        # 'seg-000001'
    registry.current("segmentation").payload # the bytes scoring workers load
    registry.rollback("segmentation")        # back to the previous version, pinned
"""

from .registry import ModelRegistry
from .retention import check_retention, prunable_versions, retention_cutoff
from .store import ModelStore
from .versions import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_SCHEMA,
    KINDS,
    ModelVersion,
    Pointer,
    PointerEvent,
    PublishResult,
    RegistryError,
    check_kind,
    parse_version,
    version_id,
)

__all__ = [
    "DEFAULT_KEY_PREFIX", "DEFAULT_SCHEMA", "KINDS", "ModelRegistry", "ModelStore", "ModelVersion", "Pointer",
    "PointerEvent", "PublishResult", "RegistryError", "check_kind", "check_retention", "parse_version",
    "prunable_versions", "retention_cutoff", "version_id",
]
