"""The ``downstream`` workflow (``custom.engines.downstream``, ``bundle/configs/downstream.json``): the report's
arithmetic on hand-made examples, and a tiny end-to-end run on a tiny synthetic cohort."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_models
from custom.engines.downstream import (
    DownstreamStudy,
    average_precision,
    balanced_accuracy,
    bootstrap,
    box_iou,
    froc_sensitivity,
    image_readouts,
    roc_auc,
)
from custom.errors import MammoInputError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


# ------------------------------------------------------------------------------------------------ arithmetic
def test_auc_by_hand_and_against_monai():
    # pairs (pos, neg): (0.35 vs 0.1) win, (0.35 vs 0.4) loss, (0.8 vs 0.1) win, (0.8 vs 0.4) win -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert roc_auc([1, 1, 0], [0.2, 0.9, 0.5]) == pytest.approx(0.5)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))
    from monai.metrics import compute_roc_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    s = np.round(rng.random(40), 1)  # with ties
    assert roc_auc(y, s) == pytest.approx(float(compute_roc_auc(torch.tensor(s), torch.tensor(y))), abs=1e-9)


def test_balanced_accuracy_by_hand():
    # positives 0.9, 0.6 hit, 0.2 missed -> 2/3; negatives 0.7 false alarm, 0.1 correct -> 1/2
    assert balanced_accuracy([1, 1, 1, 0, 0], [0.9, 0.6, 0.2, 0.7, 0.1]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert np.isnan(balanced_accuracy([0, 0], [0.1, 0.9]))


def test_bootstrap_interval_by_hand():
    # mean of [0, 1]: a resample's mean is 0, 0.5, 1 with probability 1/4, 1/2, 1/4 -> 95 % interval [0, 1]
    x = np.array([0.0, 1.0])
    b = bootstrap(lambda idx: float(x[idx].mean()), 2, n_boot=2000, seed=1)
    assert b["value"] == 0.5 and b["low"] == 0.0 and b["high"] == 1.0
    # 100 coin flips: the mean's interval is close to 0.5 +- 1.96 sqrt(0.25 / 100) = +-0.098
    y = np.array([0.0, 1.0] * 50)
    b = bootstrap(lambda idx: float(y[idx].mean()), 100, n_boot=4000, seed=2)
    assert b["low"] == pytest.approx(0.5 - 0.098, abs=0.02) and b["high"] == pytest.approx(0.5 + 0.098, abs=0.02)
    # AUC on 4 images: a resample with one class only (probability 2 / 2^4 = 1/8) is undefined and left out
    lab, sc = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    b = bootstrap(lambda idx: roc_auc(lab[idx], sc[idx]), 4, n_boot=2000, seed=3)
    assert b["value"] == pytest.approx(0.75) and b["low"] <= 0.75 <= b["high"]
    assert b["n_undefined"] == pytest.approx(2000 / 8, rel=0.25) and b["n_boot"] + b["n_undefined"] == 2000


def test_detection_metrics_by_hand():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    truths = [[[0, 0, 10, 10]], [[20, 20, 30, 30]]]
    dets = [[(0.9, [0, 0, 10, 10]), (0.8, [40, 40, 50, 50])], [(0.7, [21, 20, 30, 30])]]
    # sorted: TP (0.9), FP (0.8), TP (0.7): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # all-point AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision(dets, truths) == pytest.approx(0.5 + 1 / 3)
    # FROC: 1 FP on 2 images = 0.5 FP/image -> every lesion found at <= 1 FP/image; at <= 0.25 only the first
    assert froc_sensitivity(dets, truths, 1.0) == pytest.approx(1.0)
    assert froc_sensitivity(dets, truths, 0.25) == pytest.approx(0.5)
    # a box overlapping below 0.5 IoU is a false positive
    assert average_precision([[(0.9, [5, 0, 15, 10])]], [[[0, 0, 10, 10]]]) == 0.0
    assert np.isnan(average_precision([[(0.9, [0, 0, 1, 1])]], [[]]))


def test_image_readouts_by_hand():
    p = torch.zeros(3, 16, 16)
    p[0] = 1.0
    p[:, 4:8, 2:5] = torch.tensor([0.1, 0.2, 0.7])[:, None, None]  # a malignant-looking blob
    r = image_readouts(p, threshold=0.3)
    assert r["lesion_score"] == pytest.approx(0.9)
    assert r["malignant_score"] == pytest.approx(0.7 / 0.9)
    assert r["detections"] == [(pytest.approx(0.9), [2.0, 4.0, 5.0, 8.0])]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def cohort(prepared_dir, tmp_path_factory) -> Path:
    """A 6-image synthetic cohort of the tiny model, mixed with the real prepared folder."""
    from monai.bundle import run

    models = build_tiny_models(Path(prepared_dir), tmp_path_factory.getbasetemp() / "gcdm_tiny_models")
    out = tmp_path_factory.mktemp("downstream_cohort") / "syn"
    run("synthesize", config_file=[str(CONFIGS / "synthesize.json"), str(REPO / "tests" / "configs" / "inf_tiny.json")],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, ckpt_dir=str(models), prepared_dir=str(prepared_dir),
        output_dir=str(out), num_images=6, ddim_steps=2, progress=False, mix_with=str(prepared_dir), seed=1,
        lesion_count_probs=[0.2, 0.6, 0.2])
    return out


def test_downstream_end_to_end(prepared_dir, cohort, tmp_path):
    from monai.bundle import run

    out = tmp_path / "ds"
    run("downstream", config_file=str(CONFIGS / "downstream.json"), meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False, prepared_dir=str(prepared_dir), synthetic_dir=str(cohort), output_dir=str(out),
        seeds=[0, 1], iterations=3, batch_size=4, channels=[4, 8], image_size=32, n_boot=40)
    metrics = json.loads((out / "metrics.json").read_text())
    real = json.loads((Path(prepared_dir) / "datalist.json").read_text())
    assert metrics["phantom"] is True and "phantom" in metrics["caveat"]
    assert metrics["train_images"] == {"real": len(real["training"]), "real+synthetic": len(real["training"]) + 6,
                                       "synthetic": 6}
    assert metrics["train_synthetic_images"] == {"real": 0, "real+synthetic": 6, "synthetic": 6}
    assert metrics["test_images"] == len(real["test"])
    for arm in ("real", "real+synthetic", "synthetic"):
        m = metrics["arms"][arm]
        assert len(m["per_seed"]["lesion_auc"]) == 2
        # the arm's value is the mean of its seeds' values
        seeds = [v for v in m["per_seed"]["detection_ap50"]]
        if all(v is not None for v in seeds):
            assert m["detection_ap50"]["value"] == pytest.approx(float(np.mean(seeds)))
    assert set(metrics["differences_vs_real"]) == {"real+synthetic", "synthetic"}
    report = (out / "report.md").read_text()
    assert "PHANTOM" in report and "real+synthetic - real" in report and (out / "downstream.png").is_file()


def test_downstream_refuses_missing_arm(prepared_dir, tmp_path):
    study = DownstreamStudy(real_dir=str(prepared_dir), synthetic_dir=str(tmp_path / "nothing"),
                            mixed_dir=str(tmp_path / "nothing" / "mixed"), output_dir=str(tmp_path / "o"))
    with pytest.raises(MammoInputError, match="synthesize"):
        study.run()
    assert not (tmp_path / "o").exists()
    with pytest.raises(MammoInputError, match="arms"):
        DownstreamStudy(real_dir=str(prepared_dir), arms=["real", "fake"], output_dir=str(tmp_path / "o")).run()
