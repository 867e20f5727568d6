# mammo_gcdm — one entry point for setting up, training, testing and benchmarking.
#   make train   environment + phantom dataset + prepare (+ training stages as they land)
#   make test    environment + the test suite (what CI runs)
#   make bench   throughput figures written to bundle/docs/benchmarks.md
# Point it at a real VinDr-Mammo download with: make prepare DATASET_DIR=/path/to/vindr-mammo

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mammo_gcdm-installed
TORCH_VERSION ?= 2.13.0

DATA_DIR ?= data
PHANTOM_DIR ?= $(DATA_DIR)/phantom
PHANTOM_STUDIES ?= 40
DATASET_DIR ?= $(PHANTOM_DIR)
PREPARED_DIR ?= $(DATA_DIR)/prepared
BUNDLE := $(BIN)/python -m monai.bundle

.PHONY: env train phantom prepare test bench clean

env: $(STAMP)

# torch first (a CPU wheel here) so nothing later pulls a CUDA build; pyradiomics builds from
# source and needs numpy/setuptools/versioneer present and no build isolation.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q numpy setuptools versioneer wheel
	$(BIN)/python -m pip install -q --no-build-isolation "pyradiomics==3.0.1"
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

$(PHANTOM_DIR)/finding_annotations.csv: | $(STAMP)
	$(BUNDLE) run phantom --config_file bundle/configs/prepare.json \
		--phantom_dir $(PHANTOM_DIR) --phantom_studies $(PHANTOM_STUDIES)

phantom: env $(PHANTOM_DIR)/finding_annotations.csv

prepare: env $(if $(filter $(PHANTOM_DIR),$(DATASET_DIR)),phantom)
	$(BUNDLE) run prepare --config_file bundle/configs/prepare.json \
		--dataset_dir $(DATASET_DIR) --output_dir $(PREPARED_DIR)

train: prepare

test: env
	$(BIN)/python -m pytest -q tests

bench: env
	$(BIN)/python -m custom.bench --output bundle/docs/benchmarks.md

clean:
	rm -rf $(DATA_DIR) .pytest_cache
