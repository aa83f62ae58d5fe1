"""Propensity snapshots cross between the two dependency sets the core runs under.

The Beam worker's environment (this interpreter: numpy 2, River 0.26) and the
Flink job's virtualenv (numpy < 2.2, River <= 0.23, pinned by apache-flink)
publish and load each other's model snapshots through the registry. Here one
side dumps, the other loads, scores and keeps learning, and the results are
compared with the same steps done on this side: probabilities equal to 1e-12
(in practice bit for bit), and the same outcomes while learning on.

The other interpreter is ``OBF_FLINK_PYTHON``, by default the Flink
virtualenv's ``<cache>/flink-venv/bin/python`` (runners/paths.py
``cache_dir``); it needs onboardflow importable (installed, or on the
inherited PYTHONPATH). A missing interpreter fails the test: the portability
it pins is what the Flink job relies on.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onboardflow.models.propensity import PropensityModel
from onboardflow.runners.paths import cache_dir

pytestmark = pytest.mark.integration

#: Run in both interpreters: the same training stream, probes and continuation.
SIDE = r'''
import base64, json, random, sys
import numpy, river
from onboardflow.models.propensity import DAY_MS, PropensityModel

T0 = 1_767_571_200_000
NAMES = ("progress", "activity", "sessions")


def _x(rng, completes):
    return {"progress": (0.7 if completes else 0.2) + rng.gauss(0, 0.15),
            "activity": (3.0 if completes else 1.0) + rng.gauss(0, 0.8), "sessions": rng.randint(0, 9)}


def feed(model, seed, users, start, prefix):
    rng, outcomes = random.Random(seed), []
    for i in range(users):
        completes = rng.random() < 0.45
        first = start + i * 600_000
        for age_days in (0, 1.2, 2.5):
            model.predict(f"{prefix}{i}", _x(rng, completes), first + int(age_days * DAY_MS))
        if completes and rng.random() < 0.8:
            outcomes += model.label(f"{prefix}{i}", 1, first + int(2.6 * DAY_MS))
        outcomes += model.expire(first)
    return [list(o) for o in outcomes]


def train():
    model = PropensityModel(feature_names=NAMES, min_per_class=20, max_pending=150, max_resolved=120)
    feed(model, 7, 400, T0, "u")
    return model


def probe(model):
    rng = random.Random(3)
    return [model.score(_x(rng, i % 2 == 0)) for i in range(100)]


def carry_on(model):
    outcomes = feed(model, 99, 150, T0 + 40 * DAY_MS, "v")
    outcomes += [list(o) for o in model.expire(T0 + 60 * DAY_MS)]
    return {"outcomes": outcomes, "probe": probe(model)}


def answer(request):
    """What this side reports: its versions, a model it trained, and what it makes of the snapshot sent."""
    trained = train()
    out = {"python": sys.executable, "river": river.__version__, "numpy": numpy.__version__,
           "trained": base64.b64encode(trained.to_bytes()).decode(),
           "served": base64.b64encode(trained.to_bytes(include_pending=False)).decode(),
           "trained_probe": probe(trained)}
    if request.get("snapshot"):
        loaded = PropensityModel.from_bytes(base64.b64decode(request["snapshot"]))
        out["loaded_probe"] = probe(loaded)
        out["continued"] = carry_on(loaded)
        out["continued_snapshot"] = base64.b64encode(loaded.to_bytes()).decode()
    return out


if __name__ == "__main__":
    print(json.dumps(answer(json.load(sys.stdin))))
'''


def _here() -> dict:
    namespace: dict = {"__name__": "portable_side"}
    exec(compile(SIDE, "portable_side", "exec"), namespace)  # noqa: S102 - the constant above
    return namespace


def _flink_python() -> Path:
    return Path(os.environ.get("OBF_FLINK_PYTHON") or cache_dir() / "flink-venv" / "bin" / "python")


def _there(snapshot: bytes | None) -> dict:
    python = _flink_python()
    if not python.exists():
        pytest.fail(f"no Flink-side interpreter at {python}: set OBF_FLINK_PYTHON or build the Flink "
                    "virtualenv (docs/flink.md)")
    request = {"snapshot": base64.b64encode(snapshot).decode() if snapshot else None}
    done = subprocess.run([str(python), "-c", SIDE], input=json.dumps(request), capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert done.returncode == 0, f"{python} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def _close(a, b, what: str, versions: str) -> None:
    """Nested lists of numbers and strings equal, numbers to 1e-12."""
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{what}: different lengths ({versions})"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{what}[{i}]", versions)
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-12, f"{what}: {a!r} != {b!r} ({versions})"
    else:
        assert a == b, f"{what}: {a!r} != {b!r} ({versions})"


def _versions(there: dict) -> str:
    import numpy
    import river
    return (f"here {sys.executable} river {river.__version__} numpy {numpy.__version__}; "
            f"there {there['python']} river {there['river']} numpy {there['numpy']}")


def test_a_snapshot_written_here_is_loaded_there_and_learns_on_alike():
    side = _here()
    model = side["train"]()
    there = _there(model.to_bytes())
    versions = _versions(there)
    _close(there["loaded_probe"], side["probe"](model), "probabilities after loading there", versions)
    here_continued = side["carry_on"](model)
    _close(there["continued"], here_continued, "learning on there", versions)
    # ...and what it wrote after learning on comes back here as the same model.
    back = PropensityModel.from_bytes(base64.b64decode(there["continued_snapshot"]))
    _close(side["probe"](back), here_continued["probe"], "the continued model back here", versions)
    assert back.to_bytes() == model.to_bytes(), versions


def test_a_snapshot_written_there_is_loaded_here_and_learns_on_alike():
    side = _here()
    there = _there(None)
    versions = _versions(there)
    loaded = PropensityModel.from_bytes(base64.b64decode(there["trained"]))
    served = PropensityModel.from_bytes(base64.b64decode(there["served"]))
    _close(side["probe"](loaded), there["trained_probe"], "probabilities after loading here", versions)
    _close(side["probe"](served), there["trained_probe"], "the serving snapshot here", versions)
    # Both sides trained on the same stream: the same model, whichever River did it.
    mine = side["train"]()
    _close(side["probe"](mine), there["trained_probe"], "training here and there", versions)
    _close(side["carry_on"](loaded), side["carry_on"](mine), "learning on here", versions)
