# TEI Manager: `make run` runs the whole stack, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export TEI_MANAGER_STATE_FILE ?= $(CURDIR)/var/state.sqlite3
export TEI_MANAGER_LOG_DIR ?= $(CURDIR)/var/logs
export TEI_MANAGER_CONFIG ?= $(CURDIR)/teimanager/default_config.toml
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export CELERY_BROKER_URL ?= redis://127.0.0.1:6379/0
# make test's second pass runs the tests marked `postgres` on this server, where it answers
# (and tests/test_two_nodes.py uses it in the first).
export POSTGRES_TEST_URL ?= postgresql://postgres@127.0.0.1:5432/test
POSTGRES_PING = $(BIN)/python -c "import sys, psycopg; psycopg.connect(sys.argv[1], connect_timeout=2).close()" '$(POSTGRES_TEST_URL)' 2>/dev/null
REDIS_PING = $(BIN)/python -c "import os, redis; redis.Redis.from_url(os.environ['CELERY_BROKER_URL'], socket_connect_timeout=1).ping()" 2>/dev/null

.PHONY: run test lint typecheck pytest pytest-postgres bench proto redis chromium migrate superuser clean

# Foreground: web, worker, beat, multiplexer (and Redis when none answers) under honcho.
# Ctrl-C stops all of them; the worker stops the instances it runs on its way out.
run: $(VENV)/.installed migrate superuser
	$(BIN)/python manage.py seed_instances
	rm -rf var/prometheus && mkdir -p var/prometheus
	cp Procfile var/Procfile.run
	@$(REDIS_PING) || { command -v redis-server >/dev/null && \
		echo 'redis: redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no' >> var/Procfile.run; } || \
		{ echo "Redis is not answering at $(CELERY_BROKER_URL) and redis-server is not installed (apt-get install redis-server)."; exit 1; }
	PROMETHEUS_MULTIPROC_DIR=$(CURDIR)/var/prometheus $(BIN)/honcho -f var/Procfile.run -d $(CURDIR) start

test: $(VENV)/.installed redis chromium lint typecheck pytest pytest-postgres

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	# The generated protobuf modules import each other as `tei.v1` / `tei_multiplexer.v1`.
	echo "$(CURDIR)/proto" > $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tei_manager_proto.pth
	touch $@

proto: $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
		proto/tei/v1/tei.proto proto/tei_multiplexer/v1/multiplexer.proto

# Redis is the Celery broker: start a local one if none answers.
redis:
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
		if command -v redis-server >/dev/null; then \
			redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null && sleep 1; \
		else echo "Redis is not answering on 127.0.0.1:6379 and redis-server is not installed (apt-get install redis-server)."; exit 1; fi; }

# The browser test drives Debian's chromium; Playwright cannot download one here.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium could not be installed; the browser test will be skipped."

migrate: $(VENV)/.installed
	mkdir -p $(dir $(TEI_MANAGER_STATE_FILE)) $(TEI_MANAGER_LOG_DIR)
	$(BIN)/python manage.py migrate --noinput

superuser: $(VENV)/.installed
	$(BIN)/python manage.py ensure_superuser

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# pytest exits 5 when it collects no test; that is not a failure.
pytest: $(VENV)/.installed
	$(BIN)/python -m pytest; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# The database-bound tests (races, migrations, the API, nodes and placement) once more on
# PostgreSQL; skipped, with a line that says so, where no PostgreSQL answers.
pytest-postgres: $(VENV)/.installed
	@if $(POSTGRES_PING); then \
		DATABASE_URL='$(POSTGRES_TEST_URL)' $(BIN)/python -m pytest -m postgres; rc=$$?; \
		[ $$rc -eq 5 ] && exit 0; exit $$rc; \
	else echo "PostgreSQL does not answer at $(POSTGRES_TEST_URL): the PostgreSQL pass is skipped."; fi

bench: $(VENV)/.installed redis
	mkdir -p benchmarks/results
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) var
