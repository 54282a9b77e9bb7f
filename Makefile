# Two commands a fresh machine with only Python needs: `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 first (the CPU build the dev/CI machines carry), then the rest
# against the lock in constraints-dev.txt. `.ci/run` also runs test-tf4, wheel-smoke and docs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf-ema-installed

# transformers 4.x: a second environment on the 4.57 line, locked in constraints-tf4.txt.
TF4_VENV ?= .venv-tf4
TF4_PY := $(TF4_VENV)/bin/python
TF4_STAMP := $(TF4_VENV)/.hf-ema-installed
# What test-tf4 leaves out, to keep CI short: the demo (transformers 4.x ignores `optim_args` for optim="sgd", so it
# trains without momentum there and its "EMA beats training" assertion does not hold; nothing hf-ema does differs)
# and the distributed rows that exercise no other transformers code path than the ones kept (DDP through EMATrainer,
# FSDP2 through EMATrainer, ZeRO-3 through EMATrainer with its resume, the backend refusals), and the crash kills
# that run no Trainer code of their own (exports, the sharded loop, snapshots, the callback face of a kept kill).
TF4_DESELECT := \
	tests/test_demo.py::test_ema_digits_demo_fast \
	tests/test_distributed.py::test_ddp_two_processes[callback] \
	tests/test_distributed.py::test_fsdp2_shard_local_average \
	tests/test_distributed.py::test_deepspeed_zero[zero1-ema_trainer] \
	tests/test_distributed.py::test_deepspeed_zero[zero2-ema_trainer] \
	tests/test_distributed.py::test_deepspeed_zero[zero2-callback] \
	tests/test_distributed.py::test_deepspeed_zero[zero3-callback] \
	tests/test_distributed.py::test_deepspeed_zero[zero3-nopersist-ema_trainer] \
	tests/test_distributed.py::test_deepspeed_zero[zero3-init-ema_trainer] \
	tests/test_crash.py::test_kill_during_training_then_resume[callback \
	tests/test_crash.py::test_kill_during_training_then_resume[ema_trainer-snapshot \
	tests/test_crash.py::test_kill_during_training_then_resume[ema_trainer-sidecar-after \
	tests/test_crash.py::test_kill_while_a_tool_writes_its_folder \
	tests/test_crash.py::test_kill_during_the_sharded_write_then_resume

# The peers' EMA libraries (timm, ema-pytorch, diffusers, torch-ema) for benchmarks/bench_peers.py; never part of CI.
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.hf-ema-installed
BENCH_ARGS ?=

SITE ?= site

.PHONY: install install-tf4 demo test test-tf4 lint format bench bench-peers docs wheel-smoke clean

# $(call venv,DIR,LOCK,EXTRAS): a venv in DIR with torch==2.13.0 first, then this tree (editable) against LOCK.
define venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet torch==2.13.0
	$(1)/bin/python -m pip install --quiet -c $(2) -e ".[$(3)]"
	touch $(1)/.hf-ema-installed
endef

$(STAMP): pyproject.toml constraints-dev.txt
	$(call venv,$(VENV),constraints-dev.txt,dev)

$(TF4_STAMP): pyproject.toml constraints-tf4.txt
	$(call venv,$(TF4_VENV),constraints-tf4.txt,tests)

install: $(STAMP)

install-tf4: $(TF4_STAMP)

demo: $(STAMP)
	$(PY) examples/ema_digits.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

# The suite on transformers 4.57 (see TF4_DESELECT for what it leaves out and why).
test-tf4: $(TF4_STAMP)
	$(TF4_PY) -m pytest -q $(foreach test,$(TF4_DESELECT),--deselect '$(test)')

# Builds the sdist and the wheel, checks their metadata, installs the wheel into a fresh venv (torch first) and runs a
# smoke test from a folder outside the source tree, so that the installed package is what gets imported.
wheel-smoke: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/pip" install --quiet --upgrade pip && \
	"$$tmp/venv/bin/pip" install --quiet torch==2.13.0 && \
	"$$tmp/venv/bin/pip" install --quiet -c constraints-dev.txt dist/*.whl && \
	cp .ci/wheel_smoke.py "$$tmp/" && cd "$$tmp" && "$$tmp/venv/bin/python" wheel_smoke.py

# The documentation site: every mkdocs warning fails, then headless Chromium (Debian's `chromium`) renders the index
# and API pages and docs/check_site.py checks what they show; screenshots go to outputs/docs-screenshots.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir $(SITE)
	$(PY) docs/check_site.py $(SITE) --screenshots outputs/docs-screenshots

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_update.py

# As the venv macro, then torchvision out again: PyPI's torchvision wheels are CUDA builds whose ops cannot load against
# the CPU torch, and a torchvision that fails to import breaks transformers' and diffusers' imports as well. timm
# requires it, but timm's EMA module needs only torch; bench_peers.py loads that module without importing timm.
$(BENCH_STAMP): pyproject.toml constraints-dev.txt constraints-bench.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet torch==2.13.0
	$(BENCH_PY) -m pip install --quiet -c constraints-dev.txt -c constraints-bench.txt -e ".[bench]"
	$(BENCH_PY) -m pip uninstall --quiet --yes torchvision
	touch $(BENCH_STAMP)

# hf-ema's compute_ema against the peers, e.g. `make bench-peers BENCH_ARGS=--quick`.
bench-peers: $(BENCH_STAMP)
	$(BENCH_PY) benchmarks/bench_peers.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TF4_VENV) $(BENCH_VENV) $(SITE) dist build outputs .pytest_cache .ruff_cache
