"""The Redis profile store: the latest profile per pseudonymous user, for downstream apps (no engine).

Layout, encoding and write semantics are a contract other services rely on;
its reference is docs/redis-contract.md. Modules: ``keys`` (key names),
``encoding`` (profile dict <-> hash fields), ``writer`` (the monotonic upsert
script and its client), ``sink`` (the writer as a ``BatchingSink``),
``store`` (reads and segment sweeps for apps and the CLI). The Beam shell is
``pipelines/beam/profile_store.py``.
"""
