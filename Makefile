# CXR Detect — one Makefile for the one-machine loop. `make help` lists the targets.
SHELL = /usr/bin/env bash -o pipefail
.SHELLFLAGS = -ec
.DEFAULT_GOAL := help

##@ Settings (override on the command line: make up GATEWAY_PORT=9080)
PYTHON_BOOT ?= python3.11
VENV ?= .venv
TRITON_VENV ?= .venv-triton
LINT_VENV ?= .venv-lint
PY := $(VENV)/bin/python
CXR := $(VENV)/bin/cxr
PYTEST_ARGS ?=
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
TRITON_PINS := nvidia-pytriton==0.7.0 "numpy<2" onnxruntime==1.32.0
# checkov and ansible-lint pin versions of boto3/networkx/packaging the main env cannot take.
LINT_PINS := checkov==3.3.30 ansible-lint==26.10.1 ansible-core==2.19.14
# The one project image every pod, workflow step and compose service runs (k8s/, workflows/config.py,
# docker-compose.yaml); the cluster-fit check (cxr cluster check) holds them to this name.
IMAGE ?= ghcr.io/cxr-detect/cxr-detect
IMAGE_TAG ?= 0.1.0
DOCKER ?= docker
LOCUST_USERS ?= 16
LOCUST_SPAWN_RATE ?= 4
LOCUST_TIME ?= 5m
export CXR_TRITON_VENV := $(abspath $(TRITON_VENV))
export CXR_LINT_VENV := $(abspath $(LINT_VENV))

##@ General
.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "\nUsage: make \033[36m<target>\033[0m\n"} /^[a-zA-Z_-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Environment
.PHONY: venv
venv: $(VENV)/.installed $(TRITON_VENV)/.installed $(LINT_VENV)/.installed ## Create the environments (idempotent).

$(VENV)/.installed: pyproject.toml requirements/lock.txt
	@command -v $(PYTHON_BOOT) >/dev/null || { echo "Python 3.11 is required ($(PYTHON_BOOT) not found)"; exit 1; }
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_PINS) -c requirements/lock.txt
	$(PY) -m pip install --quiet -e '.[dev]' -c requirements/lock.txt
	touch $@

# Triton's Python-backend stub returns EMPTY outputs with numpy 2, so Triton gets its own env.
$(TRITON_VENV)/.installed:
	test -x $(TRITON_VENV)/bin/python || $(PYTHON_BOOT) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet $(TRITON_PINS)
	touch $@

$(LINT_VENV)/.installed:
	test -x $(LINT_VENV)/bin/python || $(PYTHON_BOOT) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install --quiet $(LINT_PINS)
	touch $@

##@ Stack
.PHONY: up
up: venv ## Start the one-machine stack (S3, MLflow, 3 Tritons, gateway, Prometheus) and serve a model.
	$(CXR) stack up

.PHONY: down
down: ## Stop every stack process.
	@test -x $(CXR) && $(CXR) stack down || echo "no environment: nothing to stop"

.PHONY: status
status: ## Show each stack component's state and health.
	$(CXR) stack status

.PHONY: logs
logs: ## Tail the stack's logs (make logs C=gateway for one component).
	$(CXR) stack logs $(C)

##@ Image (needs a Docker engine: CI, or an operator's machine; none on the development machines)
.PHONY: image
image: ## Build the project image $(IMAGE):$(IMAGE_TAG).
	$(DOCKER) build --pull -t $(IMAGE):$(IMAGE_TAG) .

.PHONY: image-push
image-push: image ## Build and push the project image (log in to the registry first).
	$(DOCKER) push $(IMAGE):$(IMAGE_TAG)

##@ Development
.PHONY: test
# The unit tests hold no server and run on both cores (pytest-xdist): 4 min instead of 6 here.
# Everything else starts real servers that use both cores themselves, one test at a time.
# PYTEST_ARGS goes to both runs; to run one file, call pytest on it directly.
test: venv ## Run the whole test suite (unit on 2 processes, then integration, e2e, browser).
	$(PY) -m pytest -m unit -n 2 $(PYTEST_ARGS)
	$(PY) -m pytest -m "not unit" $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: venv ## Unit tests only (about 4 minutes on 2 cores).
	$(PY) -m pytest -m unit -n 2 -q $(PYTEST_ARGS)

.PHONY: lint
lint: venv ## ruff and mypy on the packages.
	$(VENV)/bin/ruff check core data_pipeline training serving delivery workflows stack cxr tests benchmarks
	$(VENV)/bin/ruff format --check core data_pipeline training serving delivery workflows stack cxr tests benchmarks
	$(VENV)/bin/mypy core data_pipeline training serving delivery workflows stack cxr

.PHONY: bench
bench: venv ## Measure side-by-side ratios; prints a table and writes benchmarks/results.json.
	$(PY) -m benchmarks.run

GPU_WHEELS ?= .gpu-wheels
.PHONY: bench-gpu
bench-gpu: ## On a GPU machine: model-only, serving-path and training-step figures -> benchmarks/results-gpu.json (PY=python3 where there is no venv; wheels from GPU_WHEELS).
	$(PY) -m benchmarks.gpu_bench --wheels $(GPU_WHEELS) --out benchmarks/results-gpu.json

.PHONY: gpu-wheels
gpu-wheels: venv ## Fetch the pure-Python wheels bench-gpu installs on a GPU machine (into GPU_WHEELS).
	$(PY) -m pip download --quiet --no-deps -d $(GPU_WHEELS) ultralytics==8.4.190 ultralytics-thop==2.2.3 pydicom==3.0.2

.PHONY: demo
demo: venv ## Send synthetic studies through the running stack; outputs in demo-out/.
	$(CXR) demo --out demo-out

.PHONY: pipeline
pipeline: venv ## Run the retrain DAG's steps in order against the running stack.
	$(CXR) pipeline run

.PHONY: loadtest
loadtest: venv ## Locust load test against the running stack (LOCUST_USERS, LOCUST_TIME).
	$(VENV)/bin/locust -f tests/load/locustfile.py --headless -u $(LOCUST_USERS) -r $(LOCUST_SPAWN_RATE) -t $(LOCUST_TIME) --host http://127.0.0.1:8080 --csv benchmarks/locust --html benchmarks/locust.html

.PHONY: clean
clean: down ## Stop the stack and remove its state and caches (keeps the environments).
	rm -rf .stack demo-out .pytest_cache .mypy_cache .ruff_cache .hypothesis

.PHONY: distclean
distclean: clean ## clean, and remove the three environments.
	rm -rf $(VENV) $(TRITON_VENV) $(LINT_VENV)
