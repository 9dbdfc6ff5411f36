# Two entry points a fresh machine needs: `make run` (demo end to end) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# kedro-telemetry ships with kedro and tries the network; this project runs offline.
export DO_NOT_TRACK := 1
export KEDRO_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

DEMO_ROOT := data/01_raw/mvtec_ad_2_demo
DEMO_STAMP := $(DEMO_ROOT)/.generated
CATEGORY ?= wallplugs

.PHONY: run install demo-data test lint format bench viz mlflow-ui clean-demo

$(BIN)/kedro: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (pyproject: requires-python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(BIN)/kedro

install: $(BIN)/kedro

# Regenerated only when its parameters change; the stamp makes `make run` idempotent.
$(DEMO_STAMP): $(BIN)/kedro conf/base/parameters_demo_data.yml conf/base/parameters.yml
	$(BIN)/kedro run --env demo --pipeline=demo_data
	touch $(DEMO_STAMP)

demo-data: $(DEMO_STAMP)

run: $(DEMO_STAMP)
	$(BIN)/kedro run --env demo --pipeline=$(CATEGORY)

test: $(BIN)/kedro
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest -q

lint: $(BIN)/kedro
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(BIN)/kedro
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: $(BIN)/kedro
	$(BIN)/python bench/preprocess.py

viz: $(BIN)/kedro
	$(BIN)/kedro viz run --env demo

mlflow-ui: $(BIN)/kedro
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean-demo:
	rm -rf $(DEMO_ROOT)
	find data/02_intermediate data/03_primary data/04_feature data/06_models data/07_model_output data/08_reporting \
		-mindepth 1 ! -name .gitkeep -delete
