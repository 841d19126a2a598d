# Two commands do all the set-up on a fresh machine with only Python 3.10+:
#   make run    run the main job (synthetic data -> notebooks 01..04 -> scored submission.csv)
#   make test   run the test suite (.ci/run calls this)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv run test clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m kernel_lib.main

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf data runs cache .pytest_cache

# Offline bundle for the submission kernel: rebuild after every change to kernel_lib/ (a test
# fails while wheels/ is stale). Kaggle metadata for OWNER (default: $KAGGLE_USERNAME).
.PHONY: wheels kernel-metadata
wheels: $(STAMP)
	$(PY) scripts/build_wheels.py

kernel-metadata: $(STAMP)
	$(PY) scripts/kaggle_metadata.py $(if $(OWNER),--owner $(OWNER),)
