# mammo_gcdm — one entry point for setting up, training, testing and benchmarking.
#   make train   environment + phantom dataset + prepare + stage 1 (autoencoder) + stage 2 (diffusion)
#                + lesion segmenter + presets + inference on a few test masks + evaluation (CPU-sized default)
#   make test    environments + the test suite (what CI runs: .ci/run)
#   make label   MONAI Label server on the phantom datastore with the trained default model
#   make pacs    Orthanc PACS (DICOMweb) with the phantom studies + MONAI Label on it, OHIF at /ohif/ (make pacs-stop)
#   make bench   throughput figures written to bundle/docs/benchmarks.md
#   make gpu-check  paper-scale check on a CUDA machine (random SD-shaped weights), table into benchmarks.md;
#                runs with the GPU machine's own python (GPU_PYTHON) + pure-python monai/diffusers from `make gpu-site`
#   make synthesize  after make train: a synthetic cohort (prepare's layout) + a real+synthetic datalist
#   make downstream  after make synthesize: task model on real / real+synthetic / synthetic, tested on real
#   make edit-study  after training model.pt (with attributes), model_inpaint.pt and segmenter.pt: keep vs inpaint,
#                removal vs the phantom's lesion-free truth, attribute fidelity, figures (custom.engines.edit_study)
# Point it at a real VinDr-Mammo download with: make train DATASET_DIR=/path/to/vindr-mammo

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
MODELS_DIR ?= bundle/models
RUNS_DIR ?= runs
SYNTHETIC_DIR ?= $(DATA_DIR)/synthetic
SYN_IMAGES ?= 120
SYN_DDIM_STEPS ?= 20
SYN_NPROC ?= 1
BUNDLE := $(BIN)/python -m monai.bundle
STAGE1_CONFIGS := "['bundle/configs/common.json','bundle/configs/train_autoencoder.json']"
STAGE2_CONFIGS := "['bundle/configs/common.json','bundle/configs/train_diffusion.json']"

LABEL_VENV ?= .venv-label
LABEL_BIN := $(LABEL_VENV)/bin
LABEL_STAMP := $(LABEL_VENV)/.mammo_gcdm-label-installed
LABEL_STUDIES ?= $(DATA_DIR)/label_studies
LABEL_HOST ?= 127.0.0.1
LABEL_PORT ?= 8000
PACS_DIR ?= $(DATA_DIR)/pacs
PACS_PORT ?= 8042
# system packages: Orthanc + its DICOMweb plugin (make pacs, tests), Chromium + its driver (the viewer test)
SYSTEM_PACKAGES := orthanc orthanc-dicomweb chromium chromium-driver
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)

.PHONY: env label-env phantom prepare train train-autoencoder train-diffusion train-segmenter presets \
	infer evaluate test bench figures label label-studies clean gpu-site gpu-check synthesize downstream edit-study system-deps pacs pacs-stop

env: $(STAMP)

# torch first (a CPU wheel here) so nothing later pulls a CUDA build; pyradiomics builds from
# source and needs numpy/setuptools/versioneer present and no build isolation.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q numpy setuptools versioneer wheel
	$(BIN)/python -m pip install -q --no-build-isolation "pyradiomics==3.0.1"
	$(BIN)/python -m pip install -q -e ".[test,tracking,frd]"
	@touch $(STAMP)

# monailabel needs pydicom 2 (the product keeps pydicom 3), so it gets its own environment; torch first
# (CPU wheel); monailabel and pydicom-seg without their declared dependencies, which would pull sam2,
# torchvision and a CUDA torch. pip's resolver prints a dependency note here: this combination is the tested one.
label-env: $(LABEL_STAMP)

$(LABEL_STAMP): custom/label_app/requirements-label.txt custom/label_app/requirements-label-nodeps.txt
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_BIN)/python -m pip install -q --upgrade pip
	$(LABEL_BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(LABEL_BIN)/python -m pip install -q --no-deps -r custom/label_app/requirements-label-nodeps.txt
	$(LABEL_BIN)/python -m pip install -q -r custom/label_app/requirements-label.txt
	$(LABEL_BIN)/python -c "import monailabel.main, monailabel.interfaces.app"
	@touch $@

$(PHANTOM_DIR)/finding_annotations.csv: | $(STAMP)
	$(BUNDLE) run phantom --config_file bundle/configs/prepare.json \
		--phantom_dir $(PHANTOM_DIR) --phantom_studies $(PHANTOM_STUDIES)

phantom: env $(PHANTOM_DIR)/finding_annotations.csv

prepare: env $(if $(filter $(PHANTOM_DIR),$(DATASET_DIR)),phantom)
	$(BUNDLE) run prepare --config_file bundle/configs/prepare.json \
		--dataset_dir $(DATASET_DIR) --output_dir $(PREPARED_DIR)

train-autoencoder: prepare
	$(BUNDLE) run training --config_file $(STAGE1_CONFIGS) --prepared_dir $(PREPARED_DIR) --output_root $(RUNS_DIR)

train-diffusion: env
	$(BUNDLE) run training --config_file $(STAGE2_CONFIGS) --prepared_dir $(PREPARED_DIR) --output_root $(RUNS_DIR)

train-segmenter: env
	$(BUNDLE) run training --config_file bundle/configs/train_segmenter.json --prepared_dir $(PREPARED_DIR)

presets: env
	$(BIN)/python -m custom.features.presets --prepared_dir $(PREPARED_DIR) --output_dir $(MODELS_DIR)

infer: env
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BUNDLE) run inference --config_file bundle/configs/inference.json \
		--datalist $(PREPARED_DIR)/datalist.json --split test --max_cases 3 --output_dir $(RUNS_DIR)/inference

evaluate: env
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BUNDLE) run evaluate --config_file bundle/configs/evaluate.json \
		--prepared_dir $(PREPARED_DIR) --results_dir $(RUNS_DIR)/evaluation --published_frd true

train: train-autoencoder
	$(MAKE) train-diffusion train-segmenter presets infer evaluate

# SYN_NPROC > 1 runs the same command under torchrun (gloo on CPU, nccl on GPUs); a re-run resumes
synthesize: env
	@test -f $(MODELS_DIR)/model.pt || { echo "ERROR: $(MODELS_DIR)/model.pt: no trained model: run 'make train' first"; exit 1; }
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(if $(filter-out 1,$(SYN_NPROC)),$(BIN)/torchrun --standalone --nproc_per_node $(SYN_NPROC) -m monai.bundle,$(BUNDLE)) \
		run synthesize --config_file bundle/configs/synthesize.json --ckpt_dir $(MODELS_DIR) \
		--prepared_dir $(PREPARED_DIR) --output_dir $(SYNTHETIC_DIR) --num_images $(SYN_IMAGES) \
		--ddim_steps $(SYN_DDIM_STEPS) --mix_with $(PREPARED_DIR)

downstream: env
	@test -f $(SYNTHETIC_DIR)/mixed/datalist.json || $(MAKE) synthesize
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BUNDLE) run downstream --config_file bundle/configs/downstream.json \
		--prepared_dir $(PREPARED_DIR) --synthetic_dir $(SYNTHETIC_DIR) --output_dir $(RUNS_DIR)/downstream

EDIT_STUDY_CASES ?= 8
EDIT_STUDY_STEPS ?= 20
edit-study: env
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python -m custom.engines.edit_study --prepared_dir $(PREPARED_DIR) \
		--phantom_dir $(PHANTOM_DIR) --ckpt_dir $(MODELS_DIR) --output $(RUNS_DIR)/edit_study \
		--max_cases $(EDIT_STUDY_CASES) --ddim_steps $(EDIT_STUDY_STEPS)

# Debian packages, installed only when one is missing
system-deps:
	@test -x /usr/sbin/Orthanc -a -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so -a -x /usr/bin/chromium \
		-a -x /usr/bin/chromedriver || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		$(SUDO) apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); }

test: env label-env system-deps
	$(BIN)/python -m pytest -q tests

bench: env
	$(BIN)/python -m custom.bench --output bundle/docs/benchmarks.md

# pure-python copies of monai, pytorch-ignite and diffusers from this venv, to carry to a GPU machine that has torch
# and transformers but not the project's environment (no venv rebuild here: it only reads the installed packages)
GPU_SITE ?= .gpu_site
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-site:
	@test -x $(BIN)/python || { echo "ERROR: $(BIN)/python: no project environment to copy from (make env)"; exit 1; }
	$(BIN)/python -m custom.gpu_check --make-site $(GPU_SITE)

gpu-check:
	PYTHONPATH=$(CURDIR):$(CURDIR)/$(GPU_SITE) $(GPU_PYTHON) -m custom.gpu_check $(GPU_CHECK_ARGS)

# refresh the docs pictures (loss curves, sample/reconstruction/evaluation grids) from the last make train
figures: env
	$(BIN)/python -m custom.engines.figures --runs $(RUNS_DIR) --output bundle/docs/images

label-studies: env
	$(BIN)/python custom/label_app/make_studies.py --prepared_dir $(PREPARED_DIR) --output_dir $(LABEL_STUDIES)

label: env label-env presets label-studies
	@case "$(LABEL_HOST)" in 127.*|localhost|::1) ;; *) test "$$MONAI_LABEL_AUTH_ENABLE" = true || { \
		echo "ERROR: LABEL_HOST=$(LABEL_HOST): serving beyond loopback needs MONAI Label's authentication" \
			"(MONAI_LABEL_AUTH_ENABLE=true, MONAI_LABEL_AUTH_REALM_URI=<Keycloak realm>; see custom/label_app/README.md)"; \
		exit 1; } ;; esac
	@test -f $(MODELS_DIR)/model.pt || { echo "no trained model in $(MODELS_DIR): run 'make train' first"; exit 1; }
	$(LABEL_BIN)/python -m monailabel.main start_server --app custom/label_app --studies $(LABEL_STUDIES) \
		--uvicorn_app custom.label_app.asgi:app \
		--conf models mammo_gcdm --conf product_python $(BIN)/python --conf ckpt_dir $(MODELS_DIR) \
		--host $(LABEL_HOST) --port $(LABEL_PORT) --log_config custom/label_app/logging.json

# a PACS as a hospital runs it: Orthanc (loopback, config custom/label_app/pacs/orthanc.json) with the phantom
# studies, MONAI Label on it (DICOMweb datastore, MG filter), OHIF at http://127.0.0.1:$(LABEL_PORT)/ohif/
pacs: env label-env system-deps presets label-studies
	@test -f $(MODELS_DIR)/model.pt || { echo "no trained model in $(MODELS_DIR): run 'make train' first"; exit 1; }
	$(LABEL_BIN)/python custom/label_app/pacs/pacs.py start --dir $(PACS_DIR) --port $(PACS_PORT)
	$(BIN)/python custom/label_app/pacs/pacs.py upload --dir $(PACS_DIR) --port $(PACS_PORT) --studies $(LABEL_STUDIES) \
		--decompress
	$(LABEL_BIN)/python custom/label_app/pacs/pacs.py serve --dir $(PACS_DIR) --port $(PACS_PORT) \
		--label_port $(LABEL_PORT) --label_python $(LABEL_BIN)/python --product_python $(BIN)/python --ckpt_dir $(MODELS_DIR)

pacs-stop:
	$(PYTHON) custom/label_app/pacs/pacs.py stop --dir $(PACS_DIR)

clean:
	rm -rf $(DATA_DIR) $(RUNS_DIR) .pytest_cache
