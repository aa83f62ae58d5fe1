"""The repository root is the ``onboardflow`` package.

Metadata, dependencies and extras are in pyproject.toml; this file only maps the
top-level folders (``pipelines/``, ``transforms/``, ``schemas/``, ``models/``,
``runners/``) to ``onboardflow.*``, which pyproject.toml alone cannot express
for a package whose root is the repository.
"""
from setuptools import find_packages, setup

TOP_LEVEL = ["pipelines", "transforms", "schemas", "models", "runners"]

setup(
    package_dir={"onboardflow": "."},
    packages=["onboardflow"] + [
        f"onboardflow.{p}" for p in find_packages(include=[f"{top}*" for top in TOP_LEVEL])
    ],
)
