# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make demo   install, start the embedded local stack, run a real deblur job
#   make test   install, start the services the tests need, run the whole suite
#
# The virtual environment lives outside the clone (torch with CUDA libraries is
# several GB) and is reused between clones; VENV=... puts it elsewhere.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= $(HOME)/.cache/deblur/venv
BIN := $(VENV)/bin
# Re-install when the dependencies or the checkout location change.
STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml; pwd) | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# The suite runs in one process per core (pytest-xdist), each with its own Redis
# and S3 endpoint; TEST_PROCESSES=0 runs it in this process alone.
TEST_PROCESSES ?= auto
PYTEST := $(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist worksteal

.PHONY: install services demo test test-fast bench-l0 clean-stack help

help:
	@echo "make demo   - install, start the local stack, run a real ensemble deblur job"
	@echo "make test   - install, start the services, run the whole test suite"
	@echo "             (one process per core; TEST_PROCESSES=0 for one process, PYTEST_ARGS=... for pytest)"

# Debian splits `python3 -m venv` off into python3.X-venv: installed first when missing. A venv
# that fails half-way is removed again, or the next make would skip this rule and lack pip.
$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || bash deploy/ensure-services.sh venv $(PYTHON)
	@echo "$(PYTHON) -m venv $(VENV)"
	@fresh=$$([ -e "$(VENV)" ] || echo 1); \
	if ! { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet --upgrade pip; }; then \
	  if [ -n "$$fresh" ]; then rm -rf "$(VENV)"; else rm -f "$(BIN)/python"; fi; \
	  echo "make: could not create the virtual environment $(VENV) with $(PYTHON); on Debian or Ubuntu" \
	    "install the venv module (sudo apt-get install python3-venv, or python3.X-venv for python3.X)" \
	    "and run make again" >&2; \
	  exit 1; \
	fi

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[all]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

services:
	bash deploy/ensure-services.sh $(SERVICES)

demo: install
	$(MAKE) --no-print-directory services SERVICES=demo
	$(BIN)/deblur demo

test: install
	$(MAKE) --no-print-directory services SERVICES=test
	$(PYTEST) $(PYTEST_ARGS)

test-fast: install
	$(PYTEST) -m "not integration and not slow" $(PYTEST_ARGS)

bench-l0: install
	$(BIN)/python bench/bench_l0_blind.py

clean-stack:
	-$(BIN)/deblur stack down
