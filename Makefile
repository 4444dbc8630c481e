PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench reproduce clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

demo: $(STAMP)
	$(VENV)/bin/hf-concept-ablation demo

# Split so that each run fits a 24 GB CPU machine (one run of every mode at 262k held 24 GB and was killed).
bench: $(STAMP)
	$(PY) benchmarks/ablation_overhead.py --modes latent projection
	$(PY) benchmarks/ablation_overhead.py --modes naive attribution --widths 16384 65536
	$(PY) benchmarks/ablation_overhead.py --layers all --widths 16384 65536 --modes latent projection attribution
	$(PY) benchmarks/leace_fit.py

# The paper's experiments (GPU: full size; CPU: reduced size). Resumable; e.g.
# make reproduce REPRODUCE_ARGS="--tasks gender_bias --seeds 0 1 2"
reproduce: $(STAMP)
	$(VENV)/bin/hf-concept-ablation reproduce --out results $(REPRODUCE_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
