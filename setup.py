"""onboardflow: real-time onboarding personalization on Apache Beam.

The repository root is the ``onboardflow`` package, so the top level reads as
the architecture (``pipelines/``, ``transforms/``, ``schemas/``, ``models/``,
``runners/``) while imports stay namespaced (``onboardflow.transforms...``).
"""
from setuptools import setup

PACKAGES = ["pipelines", "transforms", "schemas", "models", "runners"]

setup(
    name="onboardflow",
    version="0.1.0",
    description="Real-time personalization engine for customer onboarding (Apache Beam on Flink)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    package_dir={"onboardflow": "."},
    packages=["onboardflow"] + [f"onboardflow.{p}" for p in PACKAGES],
    package_data={
        "onboardflow.schemas": ["*.avsc", "registry.json", "warehouse/*.sql"],
        "onboardflow.pipelines": ["*.yaml"],
    },
    install_requires=[
        # Beam 2.77's Flink runner targets Flink 2.2. apache-flink itself is NOT a
        # dependency: its Python pins hold Beam at 2.61; the Flink runtime gets its
        # own virtualenv (runners/flink).
        "apache-beam>=2.77.0,<2.78",
        "kafka-python>=2.2,<4",
        # C CRC32C for kafka-python: its pure-Python fallback caps a consumer at ~14k records/s.
        "crc32c>=2.3,<3",
        "redis>=5.0,<9",
        "avro>=1.12,<1.13",
        "fastavro>=1.9,<2",
        "scikit-learn>=1.5,<2",
        # `onboardflow train` plots k against silhouette / Davies-Bouldin (PNG, Agg backend).
        "matplotlib>=3.8,<4",
        "river>=0.22,<0.27",
        "prometheus-client>=0.20,<1",
        "psycopg[binary]>=3.2,<4",
        "PyYAML>=6,<7",
        "tqdm>=4.66,<5",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "hypothesis>=6.100,<7",
            "fakeredis>=2.20,<3",
            # [avro]: the Schema Registry client and AvroSerializer used by the interop test.
            "confluent-kafka[avro]>=2.4,<3",
            # `make lint` (run by `make test`); rules in ruff.toml.
            "ruff>=0.8,<1",
        ],
    },
    entry_points={"console_scripts": ["onboardflow=onboardflow.runners.cli:main"]},
)
