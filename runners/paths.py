"""Where onboardflow keeps downloads and run-time files, decided in one place.

Two directories, each one setting:

* ``OBF_CACHE_DIR``: what is fetched or built once and reused (Prism, the Kafka
  and Flink distributions, connector jars).
* ``OBF_RUN_DIR``: what a run writes (service logs and data, demo output,
  Flink checkpoints).

When unset, a source checkout (the folder with ``Makefile`` and ``setup.py``
above this package) keeps both inside itself (``.cache/``, ``.run/``), which is
what the Makefile and ``runners/services/env.sh`` use too. An installed wheel has
no checkout, so it falls back to the XDG base directories
(``~/.cache/onboardflow``, ``~/.local/state/onboardflow``) instead of writing
into site-packages.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def checkout_root() -> Optional[Path]:
    """The source checkout this package runs from, or None for an installed wheel."""
    if (PACKAGE_DIR / "Makefile").is_file() and (PACKAGE_DIR / "setup.py").is_file():
        return PACKAGE_DIR
    return None


def _xdg(variable: str, default: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / default) / "onboardflow"


def cache_dir() -> Path:
    """``OBF_CACHE_DIR``, else ``<checkout>/.cache``, else ``$XDG_CACHE_HOME/onboardflow``."""
    if os.environ.get("OBF_CACHE_DIR"):
        return Path(os.environ["OBF_CACHE_DIR"])
    root = checkout_root()
    return root / ".cache" if root else _xdg("XDG_CACHE_HOME", ".cache")


def run_dir() -> Path:
    """``OBF_RUN_DIR``, else ``<checkout>/.run``, else ``$XDG_STATE_HOME/onboardflow``."""
    if os.environ.get("OBF_RUN_DIR"):
        return Path(os.environ["OBF_RUN_DIR"])
    root = checkout_root()
    return root / ".run" if root else _xdg("XDG_STATE_HOME", ".local/state")
