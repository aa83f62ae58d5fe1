"""onboardflow: real-time personalization for customer onboarding.

Apache Beam pipelines read Avro-schematized onboarding events from Kafka,
anonymize, enrich, sessionize and score them, keep user segments up to date
with rules and online learning, and write profiles to Redis and history to a
PostgreSQL warehouse.

The repository root is the ``onboardflow`` package (see ``setup.py``):
``onboardflow.schemas`` is the event contract, ``onboardflow.transforms`` the
Beam transforms, ``onboardflow.pipelines`` their composition,
``onboardflow.models`` the online models and ``onboardflow.runners`` the
command line, local runner and services.
"""

__version__ = "0.1.0"
