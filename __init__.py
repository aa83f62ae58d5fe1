"""onboardflow: real-time personalization for customer onboarding.

Apache Beam pipelines read Avro-schematized onboarding events from Kafka,
anonymize, enrich, sessionize and score them, keep user segments up to date
with rules and online learning, and write profiles to Redis and history to a
PostgreSQL warehouse.

The repository root is the ``onboardflow`` package (see ``setup.py``):
``schemas`` is the contract, ``transforms`` the engine-free core,
``models`` the online models, ``pipelines`` the engine shells and jobs
(``pipelines/beam/``) and ``runners`` the settings, runners and command line
(docs/architecture.md "Code layout").
"""

__version__ = "0.1.0"
