# GRADE-MTF developer commands. Everything runs inside .venv at the repo root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel; a newer or unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
DEMO_OUT ?= demo-out
# The image: tag from the project version; BASE_IMAGE for air-gapped builds (any Python >= 3.10 with
# venv); TORCH_INDEX is where the CPU (or CUDA) torch wheel comes from; DOCKER_BUILD_FLAGS is passed on.
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
