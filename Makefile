# tickguard's front door: `make run`, `make test`, `make check` (what CI runs).
# GNU make. Everything goes into the virtualenv at .venv, created with $(PYTHON) (3.11+).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when what the install reads has changed (quick and idempotent otherwise).
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# The React client package, its demo dashboard and their tests (Node 20 and npm).
REACT := clients/react
NPM_STAMP := $(REACT)/node_modules/.installed
CHROMIUM ?= /usr/bin/chromium

.DEFAULT_GOAL := help
.PHONY: help venv install run scaled sim demo demo-build test lint typecheck format check test-browser test-binary binary clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "tickguard needs Python 3.11+, $(PYTHON) is " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

venv: $(STAMP) ## create .venv and install tickguard with its test tools (pinned by constraints.txt)

install: $(STAMP) ## same as venv

run: $(STAMP) ## start tickguard on http://127.0.0.1:8080 (embedded PostgreSQL unless DATABASE_URL is set)
	$(BIN)/tickguard serve

# The roles as separate processes on one machine (README "Scaling out"): needs DATABASE_URL
# and REDIS_URL. Ctrl-C (or the end of any one of them) stops all three.
scaled: SHELL := /bin/bash
scaled: $(STAMP) ## api+gateway (2 workers, :8080) and two engines (:8091, :8092) on DATABASE_URL and REDIS_URL
	@test -n "$$DATABASE_URL" -a -n "$$REDIS_URL" || { echo "make scaled: set DATABASE_URL and REDIS_URL" >&2; exit 2; }
	@trap 'exit 0' INT TERM; trap 'kill $$(jobs -p) 2>/dev/null; wait' EXIT; \
	PORT=8091 ENGINE_ID=engine-1 $(BIN)/tickguard serve --role engine & \
	PORT=8092 ENGINE_ID=engine-2 $(BIN)/tickguard serve --role engine & \
	$(BIN)/tickguard serve --role api,gateway --workers 2 & \
	wait -n

sim: $(STAMP) ## start the Coinbase-protocol simulator on ws://127.0.0.1:8765
	$(BIN)/tickguard sim

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: $(STAMP) ## the whole Python suite (soak variants excluded)
	@$(BIN)/pytest -m "not soak and not binary" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing" >&2; fi; \
	exit $$rc

# lint-imports reads the package of THIS checkout through a `tickguard` symlink (as typecheck
# does), whichever checkout the venv's editable install points at: a fresh clone run with
# another venv still checks its own code.
lint: $(STAMP) ## ruff check, ruff format --check and the import contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@mkdir -p build/lint && ln -sfn "$(CURDIR)" build/lint/tickguard
	PYTHONPATH="$(CURDIR)/build/lint" $(BIN)/lint-imports --no-cache --config pyproject.toml

# mypy cannot follow the editable install's import hook, so it reads the package through a
# `tickguard` symlink to the repository (as the binary's spec does).
typecheck: $(STAMP) ## mypy --strict on the tickguard package
	@mkdir -p build/typecheck && ln -sfn "$(CURDIR)" build/typecheck/tickguard
	cd build/typecheck && "$(CURDIR)/$(BIN)/mypy" --strict --follow-imports=silent -p tickguard \
		--exclude '/(tests|bench|build|clients|deploy|node_modules|dist)/'

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

check: lint typecheck test test-browser test-binary ## everything CI runs

$(NPM_STAMP): $(REACT)/package.json $(REACT)/package-lock.json
	cd $(REACT) && npm ci --no-audit --no-fund
	@touch $@

demo-build: $(NPM_STAMP) ## build the demo dashboard (tickguard serve then serves it at /)
	cd $(REACT) && npm run build

demo: $(STAMP) $(NPM_STAMP) ## the dashboard against the simulator, in one command (Ctrl-C stops all)
	cd $(REACT) && npm run demo

# vitest against a real tickguard, then the dashboard in headless Chromium (playwright-core
# drives the system's Chromium; nothing downloads a browser).
test-browser: $(STAMP) $(NPM_STAMP) ## React client: typecheck, vitest, browser end-to-end test
	@test -x $(CHROMIUM) || { echo "test-browser: $(CHROMIUM) is missing (Debian: apt-get install chromium)" >&2; exit 1; }
	cd $(REACT) && npm run typecheck
	cd $(REACT) && npm test
	cd $(REACT) && npm run test:browser

# Builds the binary, then runs its tests against it (they skip when no binary exists, so they
# only ever run for real here). Exit 5 ("no tests collected") fails, as in `test`.
test-binary: binary ## build dist/tickguard, then run tests/test_binary.py against it
	@TICKGUARD_BINARY=$(CURDIR)/dist/tickguard $(BIN)/pytest tests/test_binary.py $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-binary: pytest collected no tests (exit 5): failing" >&2; fi; \
	exit $$rc

# PyInstaller is a build tool, not a dependency: installed here only, at constraints.txt's pin.
binary: $(STAMP) demo-build ## build dist/tickguard (one file, dashboard included) with PyInstaller
	$(BIN)/python -m pip install --quiet -c constraints.txt pyinstaller
	$(BIN)/pyinstaller --noconfirm --clean --distpath dist --workpath build/pyinstaller deploy/tickguard.spec

clean: ## remove build output and caches (keeps .venv)
	rm -rf build dist .pytest_cache .ruff_cache .mypy_cache .hypothesis test-artifacts \
		$(REACT)/demo/dist $(REACT)/test-artifacts

distclean: clean ## also remove .venv
	rm -rf $(VENV)
