# GRADE-MTF developer commands. Everything runs inside .venv at the repo root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch comes from TORCH_INDEX (the CPU build, as in the image): PyPI's torch for Linux x86-64 is the
# multi-GB CUDA build. Where TORCH_INDEX cannot be reached, pip's own configuration decides (a local
# wheel folder or mirror; on a plain machine, PyPI, which a warning then names).
TORCH  := torch==2.13.0
# make test: parallel workers (pytest-xdist; auto = one per core) and the slowest tests it prints.
TEST_WORKERS ?= auto
DEMO_OUT ?= demo-out
# The image: tag from the project version; BASE_IMAGE for air-gapped builds (any Python >= 3.10 with
# venv); TORCH_INDEX is where the CPU (or CUDA) torch wheel comes from (make install's too);
# DOCKER_BUILD_FLAGS is passed on.
VERSION     := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_TAG   ?= grade-mtf:$(VERSION)
BASE_IMAGE  ?= python:3.11-slim
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DOCKER_BUILD_FLAGS ?=

.PHONY: install test demo lint bench clean image image-tag

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=20)" \
			"$(TORCH_INDEX)" 2>/dev/null; then \
		echo "installing $(TORCH) from $(TORCH_INDEX)"; \
		$(PY) -m pip install -q --index-url "$(TORCH_INDEX)" "$(TORCH)"; \
	else \
		echo "warning: $(TORCH_INDEX) cannot be reached: installing $(TORCH) through pip's configuration" \
			"(pip config list); from PyPI on Linux x86-64 that is the CUDA build, several GB" >&2; \
		$(PY) -m pip install -q "$(TORCH)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# pytest's exit status 5 (no test collected) is a failure, not a pass.
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: install
	$(PY) -m pipeline.run_local --config configs/demo.yaml --out $(DEMO_OUT)

lint: install
	$(PY) -m ruff check grade components pipeline tests benchmarks

image:
	docker build -f containers/Dockerfile -t $(IMAGE_TAG) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg TORCH_INDEX=$(TORCH_INDEX) $(DOCKER_BUILD_FLAGS) .
	@docker image inspect -f '{{.Size}}' $(IMAGE_TAG) | awk '{printf "image $(IMAGE_TAG): %.0f MB\n", $$1 / 1e6}'

image-tag:
	@echo $(IMAGE_TAG)

bench: install
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
