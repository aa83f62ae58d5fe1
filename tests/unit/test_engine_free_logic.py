"""Decoding, privacy, enrichment, rules, tracks and the online models' stages run without Beam.

The source of each core module names no engine; the ones whose imports are
already engine-free all the way down are imported in a fresh interpreter where
``import apache_beam`` fails.
"""
import subprocess
import sys
from pathlib import Path

import pytest

import onboardflow

ROOT = Path(onboardflow.__file__).resolve().parent
#: Every module of the engine-free core (tests/integration/test_packaging.py imports them without Beam).
CORE = sorted(str(p.relative_to(ROOT)) for folder in ("transforms", "models", "schemas")
              for p in (ROOT / folder).rglob("*.py"))
IMPORTABLE = ["onboardflow.transforms.decode", "onboardflow.transforms.anonymize", "onboardflow.transforms.enrich",
              "onboardflow.transforms.segment", "onboardflow.models.tracks"]


@pytest.mark.parametrize("path", CORE)
def test_the_core_module_names_no_engine(path):
    source = (ROOT / path).read_text(encoding="utf-8")
    assert "apache_beam" not in source and "pyflink" not in source


def test_the_core_modules_import_and_work_where_beam_cannot_be_imported():
    script = (
        "import sys\n"
        "sys.modules['apache_beam'] = None  # any import of it raises ImportError\n"
        + "".join(f"import {name}\n" for name in IMPORTABLE)
        + "from onboardflow.models.tracks import TrackPolicy\n"
        "from onboardflow.transforms.segment import RuleSet, segment_profile\n"
        "rules = RuleSet.load()\n"
        "profile = segment_profile(rules, {'user_key': 'k', 'as_of': 10**12, 'last_event_at': 0}, 0)\n"
        "print(TrackPolicy.from_yaml(segment_rules=rules).choose(profile))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "simplified"  # dormant -> the simplified track
    assert "apache_beam" not in done.stderr
