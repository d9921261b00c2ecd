# callrouter: `make run` and `make test` install whatever is missing, then run.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

.PHONY: run test deps venv engine lint unit integration bench bench-numbers bench-quick bench-webhooks \
	bench-cluster bench-held clean fuzz image cluster

run: deps venv engine
	$(VENV)/bin/callrouter serve $(if $(CONFIG),--config $(CONFIG))

test: deps venv engine lint
	$(VENV)/bin/pytest -q

deps:
	@bash scripts/install-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "callrouter needs Python 3.11, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

engine: venv
	PYTHON=$(PY) bash scripts/build-engine.sh --install $(SITE)

lint: venv
	$(VENV)/bin/ruff check src tests scripts bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: deps venv engine
	$(VENV)/bin/pytest -q tests/integration

bench: deps venv engine
	$(PY) bench/run.py
	$(PY) bench/number_table.py
	$(PY) bench/webhooks.py
	$(PY) bench/cluster.py

# The reject path beside INVITEs held for a slow assistant-request webhook (issue 12).
bench-webhooks: deps venv engine
	$(PY) bench/webhooks.py

# One router alone against Kamailio + two routers, on this box (docs/benchmarks.md).
bench-cluster: deps venv engine
	$(PY) bench/cluster.py

# The number table alone (issue 14): 100,000 and 1,000,000 numbers.
bench-numbers: deps venv engine
	$(PY) bench/number_table.py

bench-quick: deps venv engine
	$(PY) bench/run.py --quick

# The held-call step alone: generators alone (sipp), bare engine, router (bench/out/benchmarks-partial.md):
# `make bench-held HELD=1000,1500,2000 WINDOW=10`.
bench-held: deps venv engine
	$(PY) bench/run.py --only held $(if $(HELD),--held $(HELD)) $(if $(WINDOW),--window $(WINDOW))

# libFuzzer + ASan/UBSan over the guard's text functions and pjsip's parser (tests/fuzz/README.md).
# `make fuzz CALLROUTER_FUZZ_SECONDS=300 FUZZ_ARGS=--merge`
fuzz: deps
	bash scripts/fuzz.sh $(FUZZ_ARGS)

# The container image (Dockerfile), with podman where there is no Docker daemon
# (../shared/containers.md); tests/integration/test_image.py places a call through it.
IMAGE ?= callrouter:local
image: deps
	bash scripts/image.sh build $(IMAGE)

# PostgreSQL + Kamailio + two routers on loopback; Ctrl-C stops them (docs/scaling.md).
cluster: deps venv engine
	PY=$(PY) bash scripts/cluster.sh

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
