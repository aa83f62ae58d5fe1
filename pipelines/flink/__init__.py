"""The native Flink job: the engine-free core on PyFlink's DataStream API (docs/flink.md).

``job.py`` builds and submits it; ``events.py`` (decode, normalize,
anonymize), ``users.py`` (the keyed per-user stage and its checkpoint-safe
writes) and ``learner.py`` (the online models' learning stage) are the thin
shells; ``store.py`` is the per-subtask chain after the profile machine
(enrich, rules, scoring, tracks, the sinks and the outbox relays), free of
PyFlink so unit tests drive it. Runs in the Flink virtualenv only
(runners/flink/flink.sh install).
"""
