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
CATEGORY ?= wallplugs
# One stamp per category: `make run` generates only the category it runs (CATEGORY=walnuts make run for another).
DEMO_STAMP := $(DEMO_ROOT)/$(CATEGORY)/.generated

.PHONY: run install demo-data test test-fast lint format bench viz mlflow-ui ui serve serve-demo-model batch clean-demo

$(BIN)/kedro: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (pyproject: requires-python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(BIN)/kedro

install: $(BIN)/kedro

# Regenerated only when its parameters change; the stamp makes `make run` idempotent.
$(DEMO_STAMP): conf/base/parameters_demo_data.yml conf/base/parameters.yml | $(BIN)/kedro
	$(BIN)/kedro run --env demo --pipelines=demo_data --namespaces=$(CATEGORY)
	touch $(DEMO_STAMP)

demo-data: $(DEMO_STAMP)

# Preprocessing, training and scoring are incremental: a second run with nothing changed reuses images, models and
# maps (the log says which and why) and only recomputes metrics, figures and the MLflow run.
run: $(DEMO_STAMP) | $(BIN)/kedro
	$(BIN)/kedro run --env demo --pipelines=$(CATEGORY)

# Everything, as CI runs it: the knowledge-base suite also against a throw-away PostgreSQL server, and the review
# app's test in headless Chromium (both installed from Debian's packages when missing: needs root / apt).
test: $(BIN)/kedro
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	bash .ci/browser.sh
	bash .ci/postgres.sh $(BIN)/python -m pytest -q

# Without the end-to-end runs (marker `slow`); CI runs `make test`, i.e. everything.
test-fast: $(BIN)/kedro
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/kedro
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(BIN)/kedro
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: $(BIN)/kedro
	$(BIN)/python bench/preprocess.py

# kedro-viz needs HTTP: this serves it at http://127.0.0.1:4141 (a `kedro viz build` folder is blank opened as a file).
viz: $(BIN)/kedro
	$(BIN)/kedro viz run --env demo --host 127.0.0.1 --port 4141 --no-browser

# The operators' review app on the embedded knowledge base (after `make run` its queue holds wallplugs' inspections).
ui: $(BIN)/kedro
	$(BIN)/streamlit run src/madfh_pipeline/app/main.py --server.address 127.0.0.1 --server.port 8501 \
		--server.headless true --browser.gatherUsageStats false \
		-- --kb-url sqlite:///data/09_knowledge_base/knowledge_base.sqlite --data-root data/ \
		--feedback-command "$(BIN)/kedro run --env demo --pipelines=feedback_{category}"

SERVE_PORT ?= 5001
MLFLOW_URI ?= sqlite:///mlflow.db
WORKERS ?= 2
# The champion inspection model of CATEGORY over REST (POST /invocations; docs/serving.md). `make run` registers
# madfh-wallplugs. mlflow starts uvicorn through bash, so the venv's bin goes on PATH.
serve: $(BIN)/kedro
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI=$(MLFLOW_URI) $(BIN)/mlflow models serve \
		-m "models:/madfh-$(CATEGORY)@champion" --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

# A small fitted demo model registered as madfh-sheet_metal, without a pipeline run (then: make serve CATEGORY=sheet_metal)
serve-demo-model: $(BIN)/kedro
	MLFLOW_TRACKING_URI=$(MLFLOW_URI) $(BIN)/python -m madfh_pipeline.serving demo-model data/06_models/demo_inspection
	MLFLOW_TRACKING_URI=$(MLFLOW_URI) $(BIN)/python -m madfh_pipeline.serving register data/06_models/demo_inspection

# Batch inspection of FOLDER with the champion on a local Dask cluster (WORKERS workers)
batch: $(BIN)/kedro
	MLFLOW_TRACKING_URI=$(MLFLOW_URI) $(BIN)/python -m madfh_pipeline.serving batch "models:/madfh-$(CATEGORY)@champion" \
		$(FOLDER) --workers $(WORKERS) --out data/08_reporting/$(CATEGORY)/batch_inspection.parquet

mlflow-ui: $(BIN)/kedro
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean-demo:
	rm -rf $(DEMO_ROOT)
	find data/02_intermediate data/03_primary data/04_feature data/06_models data/07_model_output data/08_reporting \
		-mindepth 1 ! -name .gitkeep -delete
