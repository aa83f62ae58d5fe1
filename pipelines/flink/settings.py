"""``JobSettings``: what the launcher hands the Flink job, as one JSON file.

The launcher (runners/flink_job.py, ``onboardflow run --engine flink``)
parses the same flags as the Beam pipeline (pipelines/options.py) over the
deployment's settings, adds what it resolved (the bounded read's offset
ranges, its horizon, the job's parallelism), and writes them here; the job,
in the Flink virtualenv where Beam's option classes are not used, reads them
back. Attribute access by option name (``settings.redis_url``), so
pipelines/configuration.py builds the same core objects from it as from
Beam's options. The secret itself never travels: only ``secret_file`` or
``secret_env``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

#: Settings the launcher adds to the options (the job's own).
JOB_FIELDS = {
    "job_name": "onboardflow",
    "parallelism": 1,
    "learner_parallelism": 1,
    # {"topic": str, "start": {partition: offset}, "stop": {partition: offset}} per topic, or None (streaming)
    "bounded_ranges": None,
    "horizon_ms": None,
    "flush_size": 500,
    "flush_interval_ms": 200,
    "connector_jars": [],
    "checkpoint_dir": None,
}


class JobSettings:
    """Read-only options by attribute; ``to_json`` / ``from_file`` round-trip them."""

    def __init__(self, values: Mapping[str, Any]):
        merged = dict(JOB_FIELDS)
        merged.update(values)
        object.__setattr__(self, "_values", merged)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_values":
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no job setting {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("JobSettings are read-only")

    def __reduce__(self):
        return JobSettings, (self._values,)

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def replace(self, **changes: Any) -> "JobSettings":
        return JobSettings({**self._values, **changes})

    def to_json(self) -> str:
        return json.dumps(self._values, sort_keys=True, indent=1, default=str)

    @classmethod
    def from_file(cls, path: str | Path) -> "JobSettings":
        return cls(json.loads(Path(path).read_text()))

    def topics(self) -> list[str]:
        return [t.strip() for t in str(self.kafka_topics).split(",") if t.strip()]

    def streaming(self) -> bool:
        return self.bounded_ranges is None

    def __repr__(self) -> str:
        return f"JobSettings(job_name={self.job_name!r}, parallelism={self.parallelism})"


def horizon(settings: JobSettings) -> Optional[int]:
    value = settings.horizon_ms
    return None if value is None else int(value)
