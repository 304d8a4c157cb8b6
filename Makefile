# GRADE-MTF developer commands. Everything runs inside .venv at the repo root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel; a newer or unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# pytest's exit status 5 (no test collected) is a failure, not a pass.
test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: install
	$(PY) -m pipeline.run_local --config configs/demo.yaml --out $(DEMO_OUT)

lint: install
	$(PY) -m ruff check grade components pipeline tests benchmarks

bench: install
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
