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

# Real peers for the interoperability tests and benchmarks, from Debian: DCMTK (storescu, findscu, movescu,
# getscu, storescp), Orthanc (C-MOVE destination / forwarding target; its DICOMweb plugin takes STOW-RS),
# OpenSSH server (sftp:// connector) and rsyslog with its GnuTLS driver (ATNA interop, TCP and TLS).
# Non-interactive, idempotent; needs root (or sudo) only when something is missing.
PEER_CMDS := storescu Orthanc sshd rsyslogd
PEER_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/lib/$(shell uname -m)-linux-gnu/rsyslog/lmnsd_gtls.so
PEER_PKGS := dcmtk orthanc orthanc-dicomweb openssh-server rsyslog rsyslog-gnutls
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
peers:
	@missing=""; for c in $(PEER_CMDS); do command -v $$c >/dev/null || [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	for f in $(PEER_FILES); do [ -e $$f ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then echo "installing test peers (missing:$$missing)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(PEER_PKGS); fi

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
