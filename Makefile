# pmoves-e2b: one command to set up and start the stack (make e2b-up), one to test it (make test).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/pmoves-e2b
# The venv is created once from a real interpreter; everything after uses $(PY) (the pyenv shim is slow).
BOOTSTRAP_PYTHON ?= $(shell command -v python3.11 || command -v python3)
# libnss-myhostname: glibc (so Node and the JS SDK) resolves *.localhost to loopback, for host routing.
APT_PACKAGES := bubblewrap nftables iproute2 debootstrap libseccomp2 procps psmisc util-linux curl ca-certificates libnss-myhostname gcc libc6-dev
# `make images` and the deploy/compose.yaml tests: podman with runc (crun fails on this cgroup layout) and
# netavark + aardvark-dns (deploy/containers.conf says why not CNI).
# Defined before APT_TEST_PACKAGES: `:=` expands at once, so a later definition would be empty there.
IMAGE_APT_PACKAGES := podman runc catatonit netavark aardvark-dns debootstrap
# The optional isolation tiers (E2B_ISOLATION=gvisor|microvm): the stack runs without them, CI tests them.
TIER_APT_PACKAGES := runsc qemu-system-x86 qemu-utils linux-image-cloud-amd64 erofs-utils busybox
# Only the tests need these: a throwaway PostgreSQL server proves the store on Postgres; Chromium
# drives the viewers and runs the e2b-surf web UI tests (Playwright with executable_path, never `playwright install`).
# skopeo/umoci pull template images (from_image); docker-registry serves one on loopback in the tests.
APT_TEST_PACKAGES := postgresql chromium prometheus skopeo umoci docker-registry $(IMAGE_APT_PACKAGES) $(TIER_APT_PACKAGES)

.PHONY: sysdeps test-sysdeps venv novnc build-e2b images templates e2b-up e2b-down e2b-logs e2b-health check test test-fast bench proto proto-check

sysdeps: ## install the Debian packages the stack needs (idempotent, fast when present)
	@missing=$$(for p in $(APT_PACKAGES) $(EXTRA_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pmoves_e2b.desktop.assets
	@touch $@

venv: $(VENV)/.installed

templates: sysdeps venv ## build the sandbox templates (cached; rebuilt only when their inputs change)
	$(CLI) template build --all

novnc: venv ## noVNC's browser library for e2b-desktop's viewer, from the npm registry (pinned, checked)
	$(PY) -m pmoves_e2b.desktop.assets

build-e2b: sysdeps venv templates novnc

images: venv novnc ## the debootstrap base + the pmoves-e2b image in podman (rebuilt only when their inputs change)
	@$(MAKE) --no-print-directory sysdeps EXTRA_APT_PACKAGES="$(IMAGE_APT_PACKAGES)"
	PY=$(PY) images/build.sh

e2b-up: build-e2b
	$(CLI) up

e2b-down: venv
	$(CLI) down

e2b-logs: venv
	$(CLI) logs -f

e2b-health: venv ## exits non-zero unless NATS and the four services are healthy
	$(CLI) health

test-sysdeps:
	@$(MAKE) --no-print-directory sysdeps EXTRA_APT_PACKAGES="$(APT_TEST_PACKAGES)"

check: venv ## formatting, lint and types; CI runs it before the suite
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

test: test-sysdeps build-e2b
	$(PY) -m pytest

test-fast: venv ## the inner loop: every test that needs no running stack
	$(PY) -m pytest -m "not stack"

bench: build-e2b
	$(PY) -m bench

proto: venv
	$(PY) -m pmoves_e2b.envd.codegen

proto-check: venv
	$(PY) -m pmoves_e2b.envd.codegen --check
