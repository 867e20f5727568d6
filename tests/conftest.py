"""Shared fixtures: a small phantom dataset and its prepared version, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
RADIOMICS_PARAMS = BUNDLE / "configs" / "radiomics_params.yaml"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from custom.data.phantom import generate_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    generate_phantom_dataset(out, n_studies=4, seed=7, image_shape=(320, 256), progress=False)
    return out


@pytest.fixture(scope="session")
def prepared_dir(phantom_dir, tmp_path_factory) -> Path:
    from custom.data.prepare import PrepareWorkflow

    out = tmp_path_factory.mktemp("prepared")
    PrepareWorkflow(
        dataset_dir=str(phantom_dir), output_dir=str(out), params_file=str(RADIOMICS_PARAMS), image_size=64,
        num_workers=2, progress=False, preview_cases=4,
    ).run()
    return out
