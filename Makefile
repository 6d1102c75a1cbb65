# The README's commands. Each one builds .venv first if it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/check_env.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -e '.[test,lmeval]'
	# t5 without its pins: they pull seqio-nightly/tfds-nightly over seqio.
	$(PIP) install --no-deps t5==0.9.4
	$(PY) scripts/check_env.py
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m pytest

# The embedded default: train and evaluate a small LLaMA on the synthetic
# mixture (gin/runs/demo.gin); results, charts and the model go to runs/demo/.
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/mtllama-demo --gin_file=runs/demo.gin --gin.DEMO_DIR="'runs/demo'"

# CPU benchmarks (each prints its reference side by side); GPU ones are run by
# hand on a GPU machine: see benchmarks/RESULTS.md for their commands.
bench: $(STAMP)
	$(PY) benchmarks/bench_compile.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_packing.py
	$(PY) benchmarks/bench_data_cache.py
	$(PY) benchmarks/bench_decoding.py
	$(PY) benchmarks/bench_lm_eval.py
	$(PY) benchmarks/bench_attention.py --smoke

clean:
	rm -rf $(VENV) build *.egg-info
