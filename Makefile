# veiltrain: `make demo` and `make test` work on a fresh clone; `make venv` is their common base.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU build from local disk here; a GPU cluster image installs its CUDA torch before `make venv`
# TORCH_SPEC may carry pip flags, e.g. an --index-url for a CUDA build (see README).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: venv demo test lint typecheck unit bench clean up deploy down schedule-on schedule-off

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile src/veiltrain/_ringkernels.c src/veiltrain/_recordkernels.c
	@command -v $(PY) >/dev/null || { echo "need $(PY) (set PY=python3.x, 3.11+)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	# crypten 0.4.1's metadata requires the dead `sklearn` package and torchvision: install it
	# alone; its real runtime needs are declared in pyproject.toml.
	$(BIN)/pip install -q --no-deps crypten==0.4.1
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: venv
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/veiltrain run

# Deployment mode (README "Run it for real"): state and keys in $$VEILTRAIN_STATE_DIR, default
# ~/.local/state/veiltrain; PREFECT_PORT overrides the UI/API port 4200 on the first `make up`.
PREFECT_PORT ?= 4200

up: venv
	$(BIN)/veiltrain stack up --prefect-port $(PREFECT_PORT)

deploy: venv
	$(BIN)/veiltrain deploy

down: venv
	$(BIN)/veiltrain stack down

schedule-on: venv
	$(BIN)/veiltrain schedule on

schedule-off: venv
	$(BIN)/veiltrain schedule off

lint: venv
	$(BIN)/ruff check src flows tasks tests bench scripts
	$(BIN)/ruff format --check src flows tasks tests bench scripts

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest -q

test: lint typecheck unit

# BENCH_MODELS=small-cnn,resnet-style adds the ResNet-style CNN (1-4 more minutes on 2 cores);
# resnet18 adds 5-17 minutes, most of them stock CrypTen's. dispatch_s starts a private stack (~2 min).
BENCH_MODELS ?= small-cnn

bench: venv
	$(BIN)/python bench/bench_sharing.py --out bench/results/sharing.json
	$(BIN)/python bench/bench_rng.py --out bench/results/rng.json
	$(BIN)/python bench/bench_summary.py --models $(BENCH_MODELS) --out bench/results

clean:
	rm -rf $(VENV) .prefect .mypy_cache .ruff_cache .pytest_cache .hypothesis
