# The README's commands. Each one builds .venv first if it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup test clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/check_env.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -e '.[test]'
	# t5 without its pins: they pull seqio-nightly/tfds-nightly over seqio.
	$(PIP) install --no-deps t5==0.9.4
	$(PY) scripts/check_env.py
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
