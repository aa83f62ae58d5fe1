"""Every typed option of the onboarding pipeline beyond Beam's own.

In: command-line flags. Out: ``PipelineOptions`` views: ``OnboardingOptions``
(sinks, secrets, rules, event-time settings, online models),
``KafkaReadOptions`` (``--kafka_*``: where and how the source reads, its
watermark policy) and ``MetricsOptions`` (``--metrics_*``: the worker
Prometheus endpoints), plus ``watermark_alignment(options)``. Each option reads
like a Flink operator setting: a name, a default, and the trade-off in one
sentence (docs/observability.md, docs/local-runner.md).
"""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_WAREHOUSE_DSN = "postgresql://onboardflow:onboardflow@127.0.0.1:5432/onboardflow"


class OnboardingOptions(PipelineOptions):
    """Sinks, secrets, rules and event-time settings of the onboarding pipeline."""

    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("onboardflow")
        g.add_argument("--registry_url", default=None,
                       help="Schema registry: a file path / file:// URL (default: the registry shipped in "
                            "schemas/registry.json) or the http(s):// URL of a Confluent-compatible registry.")
        g.add_argument("--dead_letter_topic", default="onboarding.events.dlq",
                       help="Kafka topic for records that cannot be decoded or validated (raw bytes + reason).")
        g.add_argument("--segment_changes_topic", default="onboarding.segment-changes",
                       help="Kafka topic for SegmentChange records (entered/exited), for downstream triggers.")
        g.add_argument("--redis_url", default=DEFAULT_REDIS_URL,
                       help="Redis profile store. TLS and a user: rediss://USER@HOST:PORT/0?ssl_ca_certs=CA"
                            "&password_file=PATH (or password_env=VAR); never the password itself "
                            "(transforms/connections.py, docs/security.md).")
        g.add_argument("--redis_key_prefix", default="obf",
                       help="Prefix of every Redis key the pipeline writes (see docs/redis-contract.md).")
        g.add_argument("--profile_ttl_days", type=float, default=90.0,
                       help="A profile hash expires this long after its last accepted write; longer keeps "
                            "returning users' history, shorter bounds Redis memory.")
        g.add_argument("--warehouse_dsn", default=DEFAULT_WAREHOUSE_DSN,
                       help="PostgreSQL warehouse (libpq URL), as the pipeline's role. TLS and a password file: "
                            "...?sslmode=verify-full&sslrootcert=CA&passfile=PGPASS (docs/security.md).")
        g.add_argument("--warehouse_schema", default="public", help="PostgreSQL schema of the warehouse tables.")
        g.add_argument("--rules_file", default=None,
                       help="Segment rules YAML (default: pipelines/segment_rules.yaml).")
        g.add_argument("--experiments_file", default=None,
                       help="Experiments YAML whose variants the profiles carry (default: "
                            "pipelines/experiments.yaml; docs/experiments.md).")
        g.add_argument("--secret_file", default=None,
                       help="File holding the pseudonymization key (HMAC-SHA256, >= 16 bytes). Required "
                            "unless --secret_env or --demo_mode.")
        g.add_argument("--secret_env", default=None,
                       help="Name of an environment variable holding the key, read once at launch.")
        g.add_argument("--demo_mode", action="store_true", default=False,
                       help="Generate a throw-away pseudonymization key when none is given (says so). "
                            "Never in production: keys then change between runs.")
        g.add_argument("--session_gap_minutes", type=float, default=30.0,
                       help="Inactivity gap that closes a session, in event time.")
        g.add_argument("--allowed_lateness_hours", type=float, default=24.0,
                       help="Events later than the watermark minus this still update profiles; later ones "
                            "are counted and written to the late-events table instead. Longer tolerates "
                            "slower producers, at the cost of larger dedup state.")
        g.add_argument("--dedup_horizon_hours", type=float, default=48.0,
                       help="Duplicate event ids are recognised within this much event time (>= lateness).")
        g.add_argument("--new_user_window_days", type=float, default=7.0,
                       help="How long after signup a user counts as new (re-evaluated by timer when it ends).")
        g.add_argument("--dormancy_days", type=float, default=30.0,
                       help="No activity for this long makes a user dormant (an event-time timer, fires "
                            "without new events).")
        g.add_argument("--profile_refresh_hours", type=float, default=24.0,
                       help="Re-emit a quiet user's profile this long after their newest event or refresh, "
                            "so rolling 7-day counts, recency and segments stay current without new events "
                            "(an event-time timer; 0: never).")
        g.add_argument("--profile_refresh_window_days", type=float, default=7.0,
                       help="Daily refreshes stop this long after a user's newest event (then the 7-day counts "
                            "are 0; rule time marks and dormancy still fire).")
        g.add_argument("--profile_slow_refresh_days", type=float, default=7.0,
                       help="After the refresh window, keep re-emitting a quiet user's profile this often until "
                            "dormancy, so recency, 30-day counts and the cluster stay current and the online "
                            "segmenter keeps seeing users who went quiet (0: never).")
        g.add_argument("--backfill_horizon", default="data",
                       help="Bounded runs (--kafka_bounded): the event time profiles end at; no timer fires "
                            "later. 'data': the newest event in the offset ranges read, capped at the wall clock "
                            "(found by a pre-scan of those ranges; the same input gives the same profiles at any "
                            "later date); 'now': the wall clock at launch (every timer due by now fires, no "
                            "pre-scan, not reproducible); or epoch milliseconds. Streaming runs ignore it.")
        g.add_argument("--future_tolerance_seconds", type=float, default=600.0,
                       help="How far after the wall clock a profile may be as of: later events are dead letters, "
                            "later timers do not emit, and the Redis writer refuses later versions. Larger "
                            "tolerates producer clocks that run ahead; smaller keeps one skewed clock from "
                            "parking a profile in the future, where Redis would refuse every honest update.")
        g.add_argument("--state_ttl_days", type=float, default=90.0,
                       help="Per-user pipeline state is cleared this long after the last activity.")
        g.add_argument("--accounts_refresh_seconds", type=float, default=300.0,
                       help="Streaming: re-read the accounts reference table this often (0: read once).")
        i = parser.add_argument_group("onboardflow identity stitching (docs/identity.md)")
        i.add_argument("--disable_identity_stitching", action="store_true", default=False,
                       help="Keep a visitor's anonymous activity on its own profile even after the device "
                            "identifies as an account.")
        i.add_argument("--identity_max_pending", type=int, default=1000,
                       help="Anonymous events held per device until it identifies (moved to the account then); "
                            "later ones stay on the visitor's profile only, counted identity_pending_overflow.")
        m = parser.add_argument_group("onboardflow online models (docs/models.md)")
        m.add_argument("--disable_online_models", action="store_true", default=False,
                       help="Write profiles without cluster, propensity and track, and learn nothing.")
        m.add_argument("--model_refresh_seconds", type=float, default=60.0,
                       help="Workers re-check the registry's serving model versions this often.")
        m.add_argument("--model_refit_hours", type=float, default=24.0,
                       help="Event time between refits of the segmenter on the profile store; each refit "
                            "publishes both models and re-scores every profile (also when a bounded input "
                            "ends). Marks are multiples of this since the epoch.")
        m.add_argument("--segment_clusters", type=int, default=6,
                       help="Behaviour segments (k of the segmenter; at most the catalogue's 10 labels).")
        m.add_argument("--segment_min_users", type=int, default=50,
                       help="The segmenter is first fitted once the store holds this many identified users.")
        m.add_argument("--model_keep_versions", type=int, default=50,
                       help="After each publish, drop the payloads of a kind's versions older than the newest "
                            "this many (never the serving or a pinned one; 0: keep all). "
                            "`onboardflow models prune` does it by hand.")
        m.add_argument("--model_keep_days", type=float, default=0.0,
                       help="With --model_keep_versions, also keep every version published or served within "
                            "this many days (0: by count only; daily marks publish one version of each kind a day).")
        m.add_argument("--model_batch_size", type=int, default=500,
                       help="Profile updates the learner folds in per state read/write.")
        m.add_argument("--tracks_file", default=None,
                       help="Onboarding tracks policy (YAML); default pipelines/onboarding_tracks.yaml.")
        m.add_argument("--model_events_topic", default="onboarding.model-events",
                       help="Kafka topic of drift events (schemas/drift_event.avsc).")


#: Values of ``--kafka_watermark_alignment``.
WATERMARK_ALIGNMENTS = ("auto", "process", "off")


class KafkaReadOptions(PipelineOptions):
    """Where and how ReadFromKafka reads (``--kafka_*`` flags).

    The watermark of each partition is the largest event time seen on it minus
    ``--kafka_max_out_of_orderness``; a partition without new records for
    ``--kafka_idle_timeout`` stops holding the watermark back. Build the source
    with ``ReadFromKafka.from_options(options, decoder=...)`` (pipelines/beam/kafka_source.py).
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--kafka_bootstrap_servers",
            default="127.0.0.1:9092",
            help="Comma-separated host:port list of Kafka brokers to bootstrap from.",
        )
        parser.add_argument(
            "--kafka_topics",
            default="onboarding.events",
            help="Comma-separated topics to read; every partition of each is read.",
        )
        parser.add_argument(
            "--kafka_consumer_group",
            default="onboardflow",
            help=(
                "Consumer group whose offsets are committed once a bundle's outputs are "
                "durable, and read back by --kafka_start_position=committed. The pipeline "
                "assigns partitions itself and never joins the group, so do not share it "
                "with subscribing consumers."
            ),
        )
        parser.add_argument(
            "--kafka_start_position",
            default="committed",
            help=(
                "Where each partition starts: 'committed' (the group's committed offset, "
                "else the earliest), 'earliest', 'latest', or 'timestamp:<epoch ms>' (first "
                "record at or after that time, else the end)."
            ),
        )
        parser.add_argument(
            "--kafka_max_out_of_orderness",
            type=float,
            default=60.0,
            help=(
                "Seconds. The watermark trails the largest event time seen on a partition by "
                "this much; events older than that when they arrive are late. Larger values "
                "tolerate more disorder but delay every event-time result by as much."
            ),
        )
        parser.add_argument(
            "--kafka_idle_timeout",
            type=float,
            default=30.0,
            help=(
                "Seconds. A partition with no new records for this long is idle: its watermark "
                "follows the wall clock (minus the out-of-orderness) so it stops holding back "
                "windows. Events that arrive on it later and older than that are late."
            ),
        )
        parser.add_argument(
            "--kafka_watermark_alignment",
            choices=WATERMARK_ALIGNMENTS,
            default="auto",
            help=(
                "'process': every partition reports the minimum watermark over all partitions of "
                "the read, kept per SDK process (needed on Prism, which takes an SDF's watermark "
                "from its latest bundle only; see PartitionWatermarks). 'off': each partition "
                "reports its own (distributed runners, e.g. Flink, hold the minimum themselves). "
                "'auto': 'process' on the local runners (Prism, Direct), else 'off'."
            ),
        )
        parser.add_argument(
            "--kafka_poll_batch_size",
            type=int,
            default=500,
            help="Max records per kafka-python poll (max_poll_records).",
        )
        parser.add_argument(
            "--kafka_max_read_seconds",
            type=float,
            default=0.25,
            help=(
                "Longest stretch a partition is read in one bundle before the source checkpoints: "
                "records reach the next stages only when their bundle ends, so this bounds the "
                "latency a steady input adds at the source."
            ),
        )
        parser.add_argument(
            "--kafka_bounded",
            action="store_true",
            default=False,
            help=(
                "Batch / replay mode: stop every partition at its end offset taken when the "
                "pipeline starts, instead of reading forever."
            ),
        )


#: Runners that execute every SDK worker of a job in one process (lower-cased,
#: without a "runner" suffix): Prism starts one worker per environment.
_SINGLE_PROCESS_RUNNERS = {"", "prism", "direct", "switchingdirect", "bundlebaseddirect"}


def watermark_alignment(options: PipelineOptions) -> bool:
    """Whether ``--kafka_watermark_alignment`` (and, for ``auto``, the runner) asks for alignment."""
    mode = options.view_as(KafkaReadOptions).kafka_watermark_alignment
    if mode != "auto":
        return mode == "process"
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__ if runner is not None else ""
    name = name.lower().rsplit(".", 1)[-1]
    return (name[: -len("runner")] if name.endswith("runner") else name) in _SINGLE_PROCESS_RUNNERS


class MetricsOptions(PipelineOptions):
    """Where worker processes serve their Prometheus metrics (``--metrics_*``).

    Each SDK worker process binds the first free port of
    ``[--metrics_port, --metrics_port + --metrics_port_attempts)``; with
    ``--metrics_sd_dir`` it also registers itself there for Prometheus'
    ``file_sd_configs``. ``--metrics_port=-1`` records Beam metrics only: no
    endpoint and no Prometheus bookkeeping.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("metrics")
        g.add_argument("--metrics_port", type=int, default=9310,
                       help="First port a worker process tries for /metrics; 0: any free port; -1: no endpoint "
                            "(Beam metrics only).")
        g.add_argument("--metrics_port_attempts", type=int, default=16,
                       help="How many consecutive ports are tried: the most worker processes per machine.")
        g.add_argument("--metrics_bind_address", default="0.0.0.0",
                       help="Interface the worker endpoints listen on (127.0.0.1 keeps them local).")
        g.add_argument("--metrics_sd_dir", default=None,
                       help="Directory where each worker writes a Prometheus file_sd target file "
                            "(shared with Prometheus; stale files of killed workers show as down targets).")
        g.add_argument("--metrics_advertise_host", default=None,
                       help="Host name written to the file_sd target (default: the bind address, or the "
                            "machine's name when bound to every interface).")
        g.add_argument("--metrics_tls_cert", default=None,
                       help="PEM certificate (chain) of the worker endpoints: they then speak HTTPS only, and "
                            "their file_sd targets say so (__scheme__ https). With --metrics_tls_key.")
        g.add_argument("--metrics_tls_key", default=None, help="PEM private key of --metrics_tls_cert.")
        g.add_argument("--metrics_tls_client_ca", default=None,
                       help="PEM CA bundle: only scrapers presenting a certificate it signed are answered "
                            "(mutual TLS; Prometheus' tls_config cert_file/key_file).")


#: The checkpoint interval onboardflow runs Flink jobs with (runners/flink_runner.py ``flink_argv``).
DEFAULT_CHECKPOINTING_INTERVAL_MS = 10_000


class FlinkCheckpointOptions(PipelineOptions):
    """Checkpoint, state and savepoint settings of Beam's Flink runner.

    Names and meanings are those of Beam's FlinkPipelineOptions; defaults of
    None leave the job server's (and then the cluster's) default in place.
    ``flink_argv`` fills in the values onboardflow runs with.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("Flink checkpoints")
        g.add_argument("--checkpointing_interval", type=int, default=None,
                       help="Milliseconds between checkpoints (Beam default: none). Shorter means less "
                            "to replay after a failure, at the cost of more checkpoint I/O; "
                            f"onboardflow runs with {DEFAULT_CHECKPOINTING_INTERVAL_MS}.")
        g.add_argument("--checkpointing_mode", choices=("EXACTLY_ONCE", "AT_LEAST_ONCE"), default=None,
                       help="EXACTLY_ONCE aligns checkpoint barriers so state counts each record once; "
                            "AT_LEAST_ONCE skips alignment (lower latency under backpressure) and may "
                            "count records twice after a restore.")
        g.add_argument("--checkpoint_timeout_millis", type=int, default=None,
                       help="A checkpoint not done in this time is discarded (Beam default: Flink's, 10 min).")
        g.add_argument("--min_pause_between_checkpoints", type=int, default=None,
                       help="Milliseconds of processing guaranteed between two checkpoints.")
        g.add_argument("--state_backend", choices=("rocksdb", "hashmap", "filesystem"), default=None,
                       help="Where keyed state lives: rocksdb (off-heap, on local disk; state larger than "
                            "memory, incremental checkpoints) or hashmap (alias filesystem: on the JVM heap; "
                            "faster, bounded by heap). Default: the cluster's state.backend.type.")
        g.add_argument("--state_backend_storage_path", default=None,
                       help="Checkpoint directory URI (file://, s3://, gs://); required with --state_backend.")
        g.add_argument("--externalized_checkpoints_enabled", action="store_true", default=False,
                       help="Keep checkpoints after the job ends, so it can be resumed from one.")
        g.add_argument("--retain_externalized_checkpoints_on_cancellation", action="store_true", default=False,
                       help="With externalized checkpoints: keep them when the job is cancelled too.")
        g.add_argument("--finish_bundle_before_checkpointing", action="store_true", default=False,
                       help="Finish the open bundle (and so flush the Redis and warehouse writes made in "
                            "finish_bundle) before a checkpoint, instead of buffering its output in the "
                            "checkpoint: a completed checkpoint then implies those writes happened.")
        g.add_argument("--shutdown_sources_after_idle_ms", type=int, default=None,
                       help="Stop sources idle this long (0: as soon as they are done). Beam's default with "
                            "checkpointing is never, which keeps a bounded run from finishing.")
        g.add_argument("--savepoint_path", default=None,
                       help="Start the job from this savepoint (or retained checkpoint) instead of empty state.")
        g.add_argument("--allow_non_restored_state", action="store_true", default=False,
                       help="Start from a savepoint even if it holds state of steps the pipeline no longer has.")


#: The Flink user stage's flush tick (--flink_flush_interval_ms) by run kind: a
#: flush's fixed cost (a Redis script call, a warehouse transaction per table,
#: the outbox relays) is paid per tick, so a backfill flushes less often
#: (docs/performance.md).
STREAMING_FLUSH_INTERVAL_MS = 100
BOUNDED_FLUSH_INTERVAL_MS = 1000


class FlinkJobOptions(PipelineOptions):
    """Settings of the native Flink job (``onboardflow run --engine flink``, pipelines/flink/, docs/flink.md).

    The checkpoint and state settings it shares with Beam's Flink runner are
    ``FlinkCheckpointOptions``' (``--checkpointing_interval``,
    ``--state_backend``, ``--savepoint_path``, ...).
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("native Flink job (--engine flink)")
        g.add_argument("--flink_job_name", default="onboardflow-onboarding",
                       help="The job's name in Flink (web UI, REST API, `flink list`).")
        g.add_argument("--flink_parallelism", type=int, default=1,
                       help="Parallelism of the keyed user stage (the learner runs at 1). "
                            "Python runs in the TaskManager's JVM (thread mode): one TaskManager is one "
                            "GIL, so parallelism needs TaskManagers (docs/flink.md).")
        g.add_argument("--flink_source_parallelism", type=int, default=0,
                       help="Parallelism of the Kafka source and decoding; 0 (default): one per partition, so "
                            "each partition keeps its own watermark as on the Beam source. Needs that many slots.")
        g.add_argument("--flink_restart_strategy", choices=("fixed-delay", "exponential-delay", "none"),
                       default="fixed-delay", help="What Flink does when a task fails.")
        g.add_argument("--flink_restart_attempts", type=int, default=10,
                       help="fixed-delay: restarts before the job fails for good.")
        g.add_argument("--flink_restart_delay_ms", type=int, default=2000,
                       help="fixed-delay: milliseconds between a failure and the restart.")
        g.add_argument("--flink_flush_size", type=int, default=5000,
                       help="Pending writes (profiles and rows) at which a user-stage subtask flushes.")
        g.add_argument("--flink_flush_interval_ms", type=int, default=None,
                       help="A subtask flushes what is pending at least this often (processing time). Default: "
                            f"{STREAMING_FLUSH_INTERVAL_MS} ms streaming (profiles fresh within the seeds' 200 ms), "
                            f"{BOUNDED_FLUSH_INTERVAL_MS} ms bounded (a backfill: fewer, larger flushes).")
        g.add_argument("--flink_relay_interval_ms", type=int, default=1000,
                       help="The outbox relays (segment changes and dead letters to Kafka, profile snapshots "
                            "to the warehouse) run at most this often; profiles reach Redis at every flush "
                            "regardless. A round's fixed cost is paid under the TaskManager's one GIL.")
        g.add_argument("--flink_config", action="append", default=None, metavar="KEY=VALUE",
                       help="Any Flink configuration for the job, applied last (repeat it): e.g. "
                            "--flink_config execution.buffer-timeout.interval=10ms. The job's own settings "
                            "(checkpoints, state backend, restarts) are its other flags; docs/flink.md.")
        g.add_argument("--flink_rest_url", default=None,
                       help="The cluster's REST API (default $OBF_FLINK_REST_URL or http://127.0.0.1:8081).")
        g.add_argument("--flink_detach", action="store_true", default=False,
                       help="Return once the job is submitted instead of following it to its end.")
