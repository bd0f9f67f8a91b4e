# Two entry points (README): `make sample` (the main job) and `make test`. Each creates its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= digits 3 and 7 move slowly; then an 8 enters
OUT ?= out/sample

.PHONY: sample test venv-run venv-test clean

$(VENV)/.run-installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# torch==2.13.0 is the CPU build (an unpinned torch pulls a multi-GB CUDA build); it serves the parity tests.
$(VENV)/.test-installed: $(VENV)/.run-installed
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,convert]"
	touch $@

venv-run: $(VENV)/.run-installed
venv-test: $(VENV)/.test-installed

sample: $(VENV)/.run-installed
	$(VENV)/bin/dsa-jax sample --config configs/digits.py --out $(OUT) --prompt "$(PROMPT)"

test: $(VENV)/.test-installed
	$(PY) -m pytest tests -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) out
