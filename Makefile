# The targets a newcomer needs. `make run` and `make test` are the front door.
PORT ?= 8000
DATA_DIR ?= /var/lib/watasu
PYTEST_ARGS ?=
# Tests default to the PostgreSQL and Redis these machines run; override to
# use others (DATABASE_URL= runs on SQLite, where the postgres-marked tests
# must be deselected with PYTEST_ARGS='-m "not postgres"').
DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/watasu
REDIS_URL ?= redis://127.0.0.1:6379/15
TEST_DATA_DIR ?= /tmp/watasu-test-data
# `make test-stress`: the VM tests STRESS_RUNS times beside a CPU hog.
STRESS_RUNS ?= 3
STRESS_ARGS ?= -m vm

.PHONY: help setup run host test test-stress lint fmt check schema image bench bench-volumes bench-checkpoints bench-network bench-billing bench-dashboard bench-code bench-starts bench-hosts clean

help:
	@echo "make run     start web + worker + beat on the embedded defaults (PORT=$(PORT) DATA_DIR=$(DATA_DIR))"
	@echo "make test    run the test suite (against PostgreSQL + Redis by default)"
	@echo "make test-stress  the VM tests STRESS_RUNS=$(STRESS_RUNS) times beside a CPU hog"
	@echo "make lint    ruff check + ruff format --check + mypy + manage.py check + makemigrations --check"
	@echo "make schema  regenerate docs/openapi.yaml"

setup:
	@scripts/setup-host
	@scripts/bootstrap

run: setup
	PORT=$(PORT) WATASU_DATA_DIR=$(DATA_DIR) scripts/run-embedded

# A VM host's own worker, for a deployment on many machines (docs/hosts.md).
host: setup
	WATASU_DATA_DIR=$(DATA_DIR) scripts/run-host

test: setup
	@scripts/setup-test-tools
	DATABASE_URL=$(DATABASE_URL) REDIS_URL=$(REDIS_URL) WATASU_DATA_DIR=$(TEST_DATA_DIR) \
		.venv/bin/pytest $(PYTEST_ARGS)

test-stress: setup
	DATABASE_URL=$(DATABASE_URL) REDIS_URL=$(REDIS_URL) WATASU_DATA_DIR=$(TEST_DATA_DIR) \
		scripts/test-stress $(STRESS_RUNS) $(STRESS_ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	WATASU_DATA_DIR=$(TEST_DATA_DIR) PYTHONPATH=. .venv/bin/mypy
	WATASU_DATA_DIR=$(TEST_DATA_DIR) .venv/bin/python manage.py check
	WATASU_DATA_DIR=$(TEST_DATA_DIR) .venv/bin/python manage.py makemigrations --check --dry-run

fmt: setup
	.venv/bin/ruff check --fix .

schema: setup
	WATASU_DATA_DIR=$(TEST_DATA_DIR) .venv/bin/python manage.py spectacular --validate \
		--fail-on-warn --file docs/openapi.yaml

image: setup
	WATASU_DATA_DIR=$(DATA_DIR) .venv/bin/python manage.py migrate --noinput -v0
	WATASU_DATA_DIR=$(DATA_DIR) .venv/bin/python manage.py build_base_image

bench: setup
	.venv/bin/python bench/runtime.py
	.venv/bin/python bench/api.py
	.venv/bin/python bench/dataplane.py
	.venv/bin/python bench/templates.py
	.venv/bin/python bench/sweeps.py
	.venv/bin/python bench/volumes.py
	.venv/bin/python bench/volume_engine.py

bench-volumes: setup
	.venv/bin/python bench/volumes.py
	.venv/bin/python bench/volume_engine.py

bench-checkpoints: setup
	.venv/bin/python bench/checkpoints.py

bench-network: setup
	.venv/bin/python bench/network.py

bench-billing: setup
	.venv/bin/python bench/billing.py

bench-dashboard: setup
	.venv/bin/python bench/dashboard.py

bench-code: setup
	.venv/bin/python bench/code.py

bench-starts: setup
	.venv/bin/python bench/api.py --fast-starts

bench-hosts: setup
	.venv/bin/python bench/hosts.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache
