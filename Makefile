# cni-agent — the two commands that matter: `make demo` and `make test`.
# Every target installs what it needs, idempotently: a second run skips what is already there.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Debian's python3 (not a pyenv one): its dist-packages hold python3-nftables (libnftables binding).
PYTHON_SYS ?= /usr/bin/python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
BIN        := build/bin
PLUGIN     := $(BIN)/ambient-cni
GO         ?= $(shell command -v go 2>/dev/null || { test -x /usr/local/go/bin/go && echo /usr/local/go/bin/go; } || echo go)
APT_PKGS   := iptables nftables ipset iproute2 conntrack containernetworking-plugins python3-venv \
              python3-nftables libnftables1 containerd runc
PYTEST_ARGS ?=

.PHONY: help deps venv plugin proto proto-check lint test unit integration e2e demo bench clean

help:
	@echo "make demo    run the agent end to end on a throwaway node (root, no cluster)"
	@echo "make test    lint + every test (unit without root; integration and e2e as root)"
	@echo "make plugin  build the Go CNI shim to $(PLUGIN)"
	@echo "make bench   run the benchmarks"

## deps: Debian packages (skips the ones already installed) and Go if it is missing.
deps: build/.deps
build/.deps: Makefile
	@mkdir -p build
	@missing=""; for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if ! command -v go >/dev/null && ! test -x /usr/local/go/bin/go; then missing="$$missing golang-go"; fi; \
	if [ -n "$$missing" ]; then \
	  echo ">> apt-get install:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "error: missing packages ($$missing); run as root or install them" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	else echo ">> Debian packages: all present"; fi
	@touch $@

## venv: Python 3.11 venv with pinned dependencies; links Debian's nftables binding in (PyPI's copy is broken).
venv: $(VENV)/.stamp
$(VENV)/.stamp: requirements.lock pyproject.toml build/.deps
	@echo ">> creating $(VENV) from $(PYTHON_SYS)"
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  ln -sfn /usr/lib/python3/dist-packages/nftables "$$site/nftables"
	@touch $@

## plugin: the CNI shim, static, standard library only.
plugin: $(PLUGIN)
$(PLUGIN): plugin/*.go plugin/go.mod build/.deps
	@mkdir -p $(BIN)
	@echo ">> building $(PLUGIN)"
	@cd plugin && CGO_ENABLED=0 GOFLAGS=-trimpath $(GO) build -ldflags='-s -w' -o ../$(PLUGIN) .

## proto: regenerate the committed Python code from proto/ (proto-check fails on drift).
proto: $(VENV)/.stamp
	$(PY) -m cni_agent.protogen --write
proto-check: $(VENV)/.stamp
	$(PY) -m cni_agent.protogen --check

lint: $(VENV)/.stamp
	@echo ">> ruff";         $(VENV)/bin/ruff check cni_agent tests bench
	@echo ">> mypy";         $(VENV)/bin/mypy cni_agent
	@echo ">> go vet";       cd plugin && $(GO) vet ./...
	@echo ">> import-linter"; $(VENV)/bin/lint-imports

test: lint plugin
	@echo ">> go test";      cd plugin && $(GO) test ./...
	@echo ">> pytest";       $(PY) -m pytest $(PYTEST_ARGS)

unit: $(VENV)/.stamp
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)
integration: $(VENV)/.stamp plugin
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)
e2e: $(VENV)/.stamp plugin
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

demo: $(VENV)/.stamp plugin
	$(VENV)/bin/cni-agent demo --plugin $(PLUGIN)

bench: $(VENV)/.stamp plugin
	$(PY) -m bench

clean:
	rm -rf build $(VENV)
