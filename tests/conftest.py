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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the tests' tensors are tiny, and one thread is faster and immune to oversubscription on a loaded 2-core machine.
    Opt-in, not autouse: the bench smoke test sets its own thread counts."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


INFERENCE_TINY_CONFIG = REPO / "tests" / "configs" / "inf_tiny.json"
COMMON_CONFIG = BUNDLE / "configs" / "common.json"


def build_tiny_models(prepared: Path, root: Path, segmenter: bool = False) -> Path:
    """Stage 1 + stage 2 (+ the lesion segmenter) trained by the real bundle configs with tiny overrides, once per
    session (marker files under ``root``: whichever test module runs first trains, the others reuse). Returns the model folder."""
    from monai.bundle import run

    models = root / "models"
    common = dict(meta_file=str(BUNDLE / "configs" / "metadata.json"), logging_file=False, prepared_dir=str(prepared),
                  ckpt_dir=str(models))
    if not (root / "STAGES_READY").is_file():
        run("training", config_file=[str(COMMON_CONFIG), str(BUNDLE / "configs" / "train_autoencoder.json"), str(INFERENCE_TINY_CONFIG)], log_dir=str(root / "ae"),
            max_epochs=1, batch_size=4, checkpoint_interval=0, num_grid_images=2, discriminator_channels=8,
            discriminator_layers=2, adversarial_weight=0.0, amp=False, **common)
        run("training", config_file=[str(COMMON_CONFIG), str(BUNDLE / "configs" / "train_diffusion.json"), str(INFERENCE_TINY_CONFIG)],
            dm_output_dir=str(root / "dm"), latent_cache_dir=str(root / "cache"), train_limit=2, val_limit=2, batch_size=2,
            max_epochs=1, warmup_steps=1, val_interval=1, save_interval=1, sample_interval=0, num_sample_cases=2,
            sample_ddim_steps=2, cache_workers=0, **common)
        (root / "STAGES_READY").write_text("ok")
    if segmenter and not (root / "SEGMENTER_READY").is_file():
        run("training", config_file=[str(BUNDLE / "configs" / "train_segmenter.json"), str(INFERENCE_TINY_CONFIG)], log_dir=str(root / "seg"),
            segmenter_channels=[4, 8], max_epochs=1, batch_size=4, **common)
        (root / "SEGMENTER_READY").write_text("ok")
    return models
