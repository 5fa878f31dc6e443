# Two entry points that do all set-up from a fresh machine (see README):
#   make demo   venv + install + apt packages (as root) + synthetic dataset + participant + group
#   make test   venv + install + apt packages (as root) + the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
NPROCS ?= 2
PYTEST_ARGS ?=

.PHONY: demo test install system-deps clean ci-container ci-slurm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is installed first and pinned: an unpinned resolver would pull the CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Debian packages: the AAL atlas (mricron-data). Skipped with a note when not root.
system-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  if [ ! -d /usr/share/mricron/templates ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mricron-data; \
	  fi; \
	else \
	  [ -d /usr/share/mricron/templates ] || echo "note: not root, mricron-data not installed; pass --atlas LABELS.nii.gz:TABLE.txt"; \
	fi

install: system-deps $(VENV)/.installed

demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/bids_qmri-synth $(DEMO_DIR)/bids --participants 2 --sessions 2 --resolution 3 --seed 1
	$(BIN)/bids_qmri $(DEMO_DIR)/bids $(DEMO_DIR)/out participant -w $(DEMO_DIR)/work --nprocs $(NPROCS) --seed 1
	$(BIN)/bids_qmri $(DEMO_DIR)/bids $(DEMO_DIR)/out group -w $(DEMO_DIR)/work --seed 1
	@echo
	@echo "Demo finished. Participant reports: $$(ls $(DEMO_DIR)/out/sub-*.html | tr '\n' ' ')"
	@echo "Group report: $(DEMO_DIR)/out/group/report.html"

test: install
	$(BIN)/python -m pytest -n $(NPROCS) $(PYTEST_ARGS)

# Image from the Dockerfile (buildah + debootstrap base, no registry) and its offline,
# read-only end-to-end run (root; skipped with a message otherwise). See docs/containers.md.
ci-container:
	scripts/ci_container.sh all

# Private single-node Slurm: job array of participants + group job, nipype SLURM plugin
# (root; skipped with a message otherwise).
ci-slurm: install
	scripts/ci_slurm.sh all

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
