# ihehub — make run / make test work on a brand-new machine with nothing but the repo.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-embedded test-scaleout bench lint check clean peers

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: install
	$(BIN)/ihehub serve

# Real DICOM peers for the tests and benchmarks (Debian's DCMTK); non-interactive, idempotent, as root.
peers:
	@command -v storescu >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk)

test: install peers
	$(BIN)/python -m pytest

test-embedded: install
	$(BIN)/python -m pytest -m "not scaleout"

test-scaleout: install
	$(BIN)/python -m pytest -m scaleout

bench: install
	$(BIN)/python bench/mllp_ingest.py

lint: install
	$(BIN)/ruff check ihehub tests bench
	$(BIN)/mypy ihehub

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
