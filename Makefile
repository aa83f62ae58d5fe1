# onboardflow — everything a fresh machine needs is installed by these targets.
#
#   make demo            run the main job end to end (services, events, pipeline, summary);
#                        the services stay up for the commands it suggests
#   make test            lint, then unit + integration + end-to-end tests against real services
#   make lint            ruff check (rules and exceptions in ruff.toml)
#   make bench           benchmarks (print events/s, latency, memory; never asserted), the API's
#                        under load beside Redis and event -> pipeline -> API (bench-api)
#   make bench-compare   one 200,000-event topic through the plain loop, a Quix Streams
#                        application, the Flink job (parallelism 1 and 2) and the Beam
#                        pipeline on Prism, side by side
#   make fuzz            coverage-guided fuzzing of decoding and anonymization
#                        (FUZZ_RUNS inputs, default 100,000; exits non-zero on a crash)
#   make services-up     Kafka (KRaft), Redis, PostgreSQL; idempotent, health-checked
#   make services-down   stop what services-up started
#   make services-up-secure  services-up, plus Kafka (SASL_SSL), Redis and PostgreSQL with TLS and
#                        authentication on ports 9094/6380/5433 (endpoints in .run/services.secure.env; docs/security.md)
#
# Settings (override on the command line or in the environment): PYTHON,
# KAFKA_PORT, REDIS_PORT, PG_PORT, OBF_RUN_DIR, OBF_CACHE_DIR — see
# runners/services/env.sh; OBF_DEPLOYMENT and the other OBF_* variables of
# the `onboardflow` commands — see runners/settings.py.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON        ?= python3.11
BEAM_VERSION  ?= 2.77.0
VENV          := .venv
PY            := $(VENV)/bin/python
OBF_CACHE_DIR ?= $(CURDIR)/.cache
export OBF_CACHE_DIR
PRISM         := $(OBF_CACHE_DIR)/bin/prism
PRISM_STAMP   := $(OBF_CACHE_DIR)/bin/.prism-$(BEAM_VERSION)
VENV_STAMP    := $(VENV)/.installed
SERVICES      := runners/services/services.sh
PYTEST        := $(PY) -m pytest

.PHONY: help install venv prism jars services-up services-up-secure services-down services-status \
        test test-unit test-integration test-e2e lint demo bench bench-compare bench-quix-install \
        clean distclean
.PHONY: promtool check-alerts lag-exporter
.PHONY: train evaluate
.PHONY: fuzz
.PHONY: openapi
.PHONY: bench-api vegeta browser
.PHONY: flink-install flink-up flink-down flink-status flink-jobserver-jar flink-worker-pool-up \
        flink-worker-pool-down flink-demo test-flink

help:
	@sed -n '2,20p' Makefile | sed 's/^# \{0,1\}//'

# ---- install ---------------------------------------------------------------

install: venv prism jars

venv: $(VENV_STAMP)
$(VENV_STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[worker,cli,api,test,dev]'
	@touch $@

# Prism, Beam's local portable runner, built from the Go module proxy at the
# pinned Beam version (Beam's Python SDK would otherwise try to download it).
prism: $(PRISM_STAMP)
$(PRISM_STAMP):
	@command -v go >/dev/null || { source runners/services/env.sh; apt_install golang-go; }
	@mkdir -p $(OBF_CACHE_DIR)/bin
	GOBIN=$(OBF_CACHE_DIR)/bin GOFLAGS=-mod=mod go install github.com/apache/beam/sdks/v2/go/cmd/prism@v$(BEAM_VERSION)
	@# Also seed Beam's own Prism cache with it, so code that runs on Beam's
	@# default runner (which delegates to Prism) never tries to download one.
	python3 runners/seed_prism_cache.py $(PRISM) $(BEAM_VERSION)
	@touch $@

jars:
	runners/services/kafka.sh fetch

# ---- services --------------------------------------------------------------

services-up:
	$(SERVICES) up

services-up-secure:
	OBF_SECURITY=tls $(SERVICES) up

services-down:
	$(SERVICES) down

services-status:
	$(SERVICES) status

# ---- tests -----------------------------------------------------------------

# Lint (ruff.toml), then unit tests (fast, no services), then integration and
# end-to-end tests against the real Kafka, Redis and PostgreSQL started by services-up.
test: install services-up browser lint
	$(PYTEST) tests/unit
	$(PYTEST) tests/integration

test-unit: venv prism
	$(PYTEST) tests/unit

test-integration: install services-up browser
	$(PYTEST) tests/integration -m "not e2e"

test-e2e: install services-up browser
	$(PYTEST) tests/integration -m e2e

# Debian's chromium and its driver, for the operator page's browser test
# (tests/integration/test_operator_page.py; selenium is in the [test] extras).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { source runners/services/env.sh; apt_install chromium chromium-driver; }

# Ruff (installed by the [test] extras); lint only, never reformats.
lint: venv
	$(VENV)/bin/ruff check .

# ---- the personalization API (docs/api.md) -----------------------------------

# Regenerate the committed OpenAPI document from the app (a unit test fails
# while docs/api/openapi.json differs from it).
openapi: venv
	$(VENV)/bin/onboardflow serve --write-openapi docs/api/openapi.json

# ---- fuzzing (docs/security.md "Fuzzing") -------------------------------------

# atheris (the [fuzz] extra) on decode -> normalize -> anonymize -> dead letter
# (tests/fuzz/fuzz_decode.py): FUZZ_RUNS inputs, about a minute on 2 cores at
# the default; work corpus and crashing inputs in .run/fuzz. Prints executions,
# coverage, outcomes and crashes; exits non-zero on a crash. FUZZ_ARGS adds
# flags, e.g. FUZZ_ARGS="--seed 7 -- -max_total_time=300". `make test` does not
# fuzz: it replays the regression corpus tests/fuzz/corpus (test_fuzz_corpus.py).
FUZZ_RUNS ?= 100000
FUZZ_ARGS ?=
FUZZ_STAMP := $(VENV)/.fuzz-installed

fuzz: $(FUZZ_STAMP)
	$(PY) tests/fuzz/fuzz_decode.py --runs $(FUZZ_RUNS) --workdir .run/fuzz $(FUZZ_ARGS)

$(FUZZ_STAMP): $(VENV_STAMP)
	$(PY) -m pip install -q -e '.[fuzz]'
	@touch $@

# ---- observability (docs/observability.md) ---------------------------------

# promtool, Prometheus' own checker, built from the Go module proxy at the
# version of the prom/prometheus image in docker/docker-compose.yml
# (Go module v0.316.0 is Prometheus 3.16.0). The first build takes several minutes.
PROMETHEUS_VERSION ?= 3.16.0
PROMTOOL_MODULE_VERSION ?= v0.316.0
PROMTOOL      := $(OBF_CACHE_DIR)/bin/promtool
PROMTOOL_STAMP := $(OBF_CACHE_DIR)/bin/.promtool-$(PROMETHEUS_VERSION)

promtool: $(PROMTOOL_STAMP)
$(PROMTOOL_STAMP):
	@command -v go >/dev/null || { source runners/services/env.sh; apt_install golang-go; }
	@mkdir -p $(OBF_CACHE_DIR)/bin
	GOBIN=$(OBF_CACHE_DIR)/bin GOFLAGS=-mod=mod go install \
	  github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_MODULE_VERSION)
	@touch $@

# Scrape config and alert rules as Prometheus reads them, and the rules'
# unit tests (docker/prometheus/alerts_test.yml). Not part of `make test`:
# the first promtool build takes ~10 minutes on 2 cores.
check-alerts: promtool
	@# check config also checks the rule files it names (the file_sd warning is
	@# about the path inside the Prometheus container).
	$(PROMTOOL) check config docker/prometheus/prometheus.yml
	$(PROMTOOL) test rules docker/prometheus/alerts_test.yml

# The lag exporter for the local services (Prometheus scrapes :9308).
lag-exporter: venv
	$(VENV)/bin/onboardflow lag-exporter --port 9308

# ---- models (docs/models-registry.md) ---------------------------------------

# Bootstrap the online segmenter from the warehouse history (fill it first,
# e.g. with `make demo`): report and plot in .run/train, model published to
# the registry. TRAIN_ARGS adds flags, e.g. TRAIN_ARGS="--k-max 8 --no-publish".
TRAIN_ARGS ?=
train: install services-up
	$(VENV)/bin/onboardflow warehouse migrate
	$(VENV)/bin/onboardflow train --out .run/train $(TRAIN_ARGS)

# The online models against the generator's ground truth (docs/models.md): the
# default generator settings (10,000 users, seed 42), no services needed, about
# 1.5 minutes on 2 cores; table on stdout, report.json and evaluation.png in
# .run/evaluate. EVALUATE_ARGS adds flags, e.g. EVALUATE_ARGS="--users 2000".
EVALUATE_ARGS ?=
evaluate: $(VENV_STAMP)
	$(VENV)/bin/onboardflow evaluate --out .run/evaluate $(EVALUATE_ARGS)

# ---- Flink (docs/flink.md) ---------------------------------------------------

# A Flink 2.2 session cluster (JobManager + TaskManager, REST on FLINK_REST_PORT,
# default 8081) from PyPI's apache-flink in its own virtualenv under .cache;
# settings in runners/flink/env.sh. Idempotent and health-checked via REST.
FLINK := runners/flink/flink.sh

flink-install:
	$(FLINK) install

flink-up:
	$(FLINK) up

flink-down:
	$(FLINK) down

flink-status:
	$(FLINK) status

# Beam's Flink job server jar (beam-runners-flink-2.2-job-server:$(BEAM_VERSION))
# resolved with Maven into .cache/beam-flink-jobserver. Fails, saying why, where
# the Maven registry does not serve it; FLINK_JOB_SERVER_JAR=/path uses a given jar.
flink-jobserver-jar:
	BEAM_VERSION=$(BEAM_VERSION) runners/flink/jobserver.sh fetch

# The Beam Python SDK worker pool (EXTERNAL environment) on BEAM_WORKER_POOL_PORT.
flink-worker-pool-up: venv
	$(FLINK) worker-pool-up

flink-worker-pool-down:
	$(FLINK) worker-pool-down

# The demo through the native Flink job (pipelines/flink/) on the local
# cluster: same summary as `make demo`, plus the job id and the web UI;
# starts what is not running and stops what it started. FLINK_DEMO_ENGINE=beam
# runs the Beam pipeline on Beam's Flink runner instead (needs the job server
# jar, unavailable here: docs/flink.md).
flink-demo: install
	BEAM_VERSION=$(BEAM_VERSION) runners/flink/demo.sh

# The cluster's own checks (a PyFlink job: parallelism, checkpoints, savepoint
# stop/resume) and the native job held to the Beam pipeline (equivalence,
# TaskManager kill, savepoint); also part of `make test` through tests/integration.
test-flink: install services-up
	$(PYTEST) tests/integration/test_flink_cluster.py tests/integration/test_flink_job.py

# ---- demo and benchmarks ---------------------------------------------------

demo: install
	PY=$(PY) runners/demo.sh

# bench_engines.py is bench-compare's: it needs the Flink install and runs
# for ~45 minutes at its defaults (3 runs of 4 contenders, 6 latency runs).
bench: install services-up vegeta
	@for b in tests/benchmarks/bench_*.py; do \
	  case "$$b" in */bench_engines.py) continue ;; esac; \
	  echo "== $$b"; $(PY) $$b || exit 1; \
	done

# The API alone (tests/benchmarks/bench_api.py, bench_api_e2e.py; both are also
# part of `make bench`): latency under load at 500-2,000 req/s beside Redis, and
# event -> pipeline -> API. BENCH_API_ARGS, e.g. BENCH_API_ARGS="--seconds 5 --repeat 1".
BENCH_API_ARGS ?=
bench-api: install services-up vegeta
	$(PY) tests/benchmarks/bench_api.py $(BENCH_API_ARGS)
	$(PY) tests/benchmarks/bench_api_e2e.py

# vegeta, the HTTP load generator of bench_api.py (constant rate, open loop),
# built from the Go module proxy at a pinned version, as Prism and promtool are.
VEGETA_VERSION ?= v12.13.0
VEGETA        := $(OBF_CACHE_DIR)/bin/vegeta
VEGETA_STAMP  := $(OBF_CACHE_DIR)/bin/.vegeta-$(VEGETA_VERSION)

vegeta: $(VEGETA_STAMP)
$(VEGETA_STAMP):
	@command -v go >/dev/null || { source runners/services/env.sh; apt_install golang-go; }
	@mkdir -p $(OBF_CACHE_DIR)/bin
	GOBIN=$(OBF_CACHE_DIR)/bin GOFLAGS=-mod=mod go install github.com/tsenart/vegeta/v12@$(VEGETA_VERSION)
	@touch $@

# The engines side by side (tests/benchmarks/bench_engines.py: its own Flink
# cluster on REST port 18081, restarted per layout). BENCH_ARGS, e.g.
# BENCH_ARGS="--events 20000 --repeat 1 --skip-latency".
bench-compare: install services-up flink-install bench-quix-install
	$(PY) tests/benchmarks/bench_engines.py $(BENCH_ARGS)

# The peer of bench-compare (tests/benchmarks/quix_app.py): Quix Streams and
# onboardflow in a virtualenv of their own ($(OBF_CACHE_DIR)/bench-quix-venv).
bench-quix-install:
	tests/benchmarks/quix_venv.sh install

clean:
	rm -rf .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: services-down clean
	rm -rf $(VENV) .run
