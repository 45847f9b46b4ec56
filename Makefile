# Two commands on a fresh machine (README): `make quickstart` and `make test`. Either creates the
# virtual environment on first use (torch pinned to the build this project is tested with, then the
# package with its dev extras) and again whenever pyproject.toml changes.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test venv

quickstart: $(STAMP)
	$(VENV)/bin/transfer-cli train

# the test command: README's and CI's (.ci/run)
test: $(STAMP)
	$(PY) -m pytest -q

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)
