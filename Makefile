# `make pretrain` and `make test` set up .venv on first use (about 2-3 minutes), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: venv pretrain finetune test test-slow test-all bench lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Main job: SimMIM pretraining of a small SwinV2 on the built-in digits (configs/pretrain/default.yaml).
pretrain: venv
	$(PY) -m simmim.pretrain

# Stage 2 on the built-in digits, from the newest `make pretrain` export.
finetune: venv
	$(PY) -m simmim.finetune

# The suite without the tests marked slow (multi-process runs, kill-and-resume, compilation, the training notebooks).
test: venv
	$(PY) -m pytest -q -m "not slow"

# The slow tests alone; CI runs `make test` and then these.
test-slow: venv
	$(PY) -m pytest -q -m slow

test-all: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/encoder.py

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs runs
