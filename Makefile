# Two commands a fresh machine with only Python needs: `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 first (the CPU build the dev/CI machines carry), then the rest
# against the lock in constraints-dev.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf-ema-installed

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints-dev.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/ema_digits.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_update.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
