# onboardflow — everything a fresh machine needs is installed by these targets.
#
#   make demo            run the main job end to end (services, events, pipeline, summary)
#   make test            unit + integration + end-to-end tests against real services
#   make bench           benchmarks (print events/s, latency, memory; never asserted)
#   make services-up     Kafka (KRaft), Redis, PostgreSQL; idempotent, health-checked
#   make services-down   stop what services-up started
#
# Settings (override on the command line or in the environment): PYTHON,
# KAFKA_PORT, REDIS_PORT, PG_PORT, OBF_RUN_DIR, OBF_CACHE_DIR — see
# runners/services/env.sh.

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

.PHONY: help install venv prism jars services-up services-down services-status \
        test test-unit test-integration test-e2e demo bench clean distclean

help:
	@sed -n '2,13p' Makefile | sed 's/^# \{0,1\}//'

# ---- install ---------------------------------------------------------------

install: venv prism jars

venv: $(VENV_STAMP)
$(VENV_STAMP): setup.py
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
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

services-down:
	$(SERVICES) down

services-status:
	$(SERVICES) status

# ---- tests -----------------------------------------------------------------

# Unit tests first (fast, no services), then integration and end-to-end tests
# against the real Kafka, Redis and PostgreSQL started by services-up.
test: install services-up
	$(PYTEST) tests/unit
	$(PYTEST) tests/integration

test-unit: venv prism
	$(PYTEST) tests/unit

test-integration: install services-up
	$(PYTEST) tests/integration -m "not e2e"

test-e2e: install services-up
	$(PYTEST) tests/integration -m e2e

# ---- demo and benchmarks ---------------------------------------------------

demo: install
	runners/demo.sh

bench: install services-up
	@for b in tests/benchmarks/bench_*.py; do \
	  echo "== $$b"; $(PY) $$b || exit 1; \
	done

clean:
	rm -rf .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: services-down clean
	rm -rf $(VENV) .run
