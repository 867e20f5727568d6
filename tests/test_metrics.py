"""Evaluation metrics (custom.metrics): controllability, Fréchet distances (FD-radiomics67, FID/FSD), diversity, reconstruction.

Everything runs on small synthetic arrays; no phantom data set is needed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from skimage.draw import disk, ellipse

from custom.errors import MammoInputError
from custom.metrics import (
    ConfusionAccumulator,
    FeatureDistance,
    RadiomicsScaler,
    SegmenterEncoder,
    controllability_metrics,
    extract_radiomic_features,
    fd_radiomics67_metrics,
    feature_contributions,
    frechet_distance,
    frechet_distance_from_features,
    frechet_radiomics_distance,
    gaussian_fit,
    lesion_box_roi,
    lesion_dice,
    ms_ssim_diversity,
    ms_ssim_settings,
    reconstruction_metrics,
    saturated_fraction,
    segment_generated,
    summarise,
)

torch.set_num_threads(1)  # on a shared 2-core machine one thread is much faster than two (no OpenMP waits)


# ----------------------------------------------------------------------------------------------- controllability
def test_confusion_matrix_iou_and_accuracy_by_hand():
    true = np.array([[0, 1, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 2], [1, 2, 1]])
    acc = ConfusionAccumulator().update(pred, true)
    # rows = truth, columns = prediction:
    #   truth 0 at (0,0): predicted 0                         -> M[0,0] = 1
    #   truth 1 at (0,1),(0,2),(1,0): predicted 1, 2, 1       -> M[1,1] = 2, M[1,2] = 1
    #   truth 2 at (1,1),(1,2): predicted 2, 1                -> M[2,2] = 1, M[2,1] = 1
    np.testing.assert_array_equal(acc.matrix, [[1, 0, 0], [0, 2, 1], [0, 1, 1]])
    assert acc.iou(0) == pytest.approx(1 / (1 + 1 - 1))      # 1.0
    assert acc.iou(1) == pytest.approx(2 / (3 + 3 - 2))      # 0.5
    assert acc.iou(2) == pytest.approx(1 / (2 + 2 - 1))      # 1/3
    assert acc.pixel_accuracy() == pytest.approx(4 / 6)
    rep = acc.report()
    assert rep["mass_iou"] == pytest.approx(1 / 3) and rep["breast_iou"] == pytest.approx(0.5)
    assert rep["pixel_accuracy"] == pytest.approx(4 / 6)
    assert rep["mass_dice_pooled"] == pytest.approx(2 * 1 / (2 + 2))
    assert rep["n_images"] == 1 and rep["n_pixels"] == 6
    json.dumps(rep, allow_nan=False)
    # batched input and torch tensors give the same counts
    acc2 = ConfusionAccumulator().update(torch.as_tensor(np.stack([pred, pred])), torch.as_tensor(np.stack([true, true])))
    np.testing.assert_array_equal(acc2.matrix, 2 * acc.matrix)
    assert acc2.n_images == 2


def test_accumulator_pools_instead_of_averaging_images():
    # image A: one lesion pixel, found exactly             -> per-image lesion IoU 1
    true_a = np.array([[2, 1], [1, 0]])
    pred_a = true_a.copy()
    # image B: 8 lesion pixels, 4 of them found, the other 4 called breast -> per-image lesion IoU 4/8
    true_b = np.ones((4, 4), dtype=int)
    true_b[:2] = 2
    pred_b = true_b.copy()
    pred_b[1] = 1
    per_image = [ConfusionAccumulator().update(p, t).iou(2) for p, t in ((pred_a, true_a), (pred_b, true_b))]
    assert per_image == [pytest.approx(1.0), pytest.approx(0.5)]
    pooled = ConfusionAccumulator().update(pred_a, true_a).update(pred_b, true_b)
    # pooled: TP = 1 + 4, FP = 0, FN = 0 + 4  ->  5 / 9, not the mean 0.75
    assert pooled.iou(2) == pytest.approx(5 / 9)
    assert pooled.iou(2) != pytest.approx(np.mean(per_image))
    merged = ConfusionAccumulator().update(pred_a, true_a).merge(ConfusionAccumulator().update(pred_b, true_b))
    np.testing.assert_array_equal(merged.matrix, pooled.matrix)


def test_accumulator_rejects_bad_input_and_reports_undefined_as_none():
    acc = ConfusionAccumulator()
    with pytest.raises(ValueError, match="class indices"):
        acc.update(np.array([[3, 0]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        acc.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="integer"):
        acc.update(np.full((2, 2), 0.5), np.zeros((2, 2)))
    acc.update(np.zeros((2, 2), int), np.ones((2, 2), int))  # no lesion anywhere
    rep = acc.report()
    assert rep["mass_iou"] is None and rep["breast_iou"] == 0.0 and rep["pixel_accuracy"] == 0.0
    json.dumps(rep, allow_nan=False)


def test_per_image_lesion_dice_and_summary():
    true = np.zeros((3, 4, 4), bool)
    pred = np.zeros((3, 4, 4), bool)
    true[0, :2, :2] = True          # 4 px
    pred[0, :2, 1:3] = True         # 4 px, overlap 2  -> 2*2/(4+4) = 0.5
    true[1, 0, 0] = pred[1, 0, 0] = True               # exact        -> 1.0
    pred[2, 3, 3] = True            # no true lesion                 -> undefined (NaN)
    d = lesion_dice(pred, true)
    assert d[0] == pytest.approx(0.5) and d[1] == pytest.approx(1.0) and math.isnan(d[2])
    s = summarise(d, prefix="dice_")
    assert s["dice_mean"] == pytest.approx(0.75) and s["dice_median"] == pytest.approx(0.75)
    assert s["dice_std"] == pytest.approx(0.25) and s["dice_n"] == 2 and s["dice_n_undefined"] == 1
    assert summarise([float("nan")])["mean"] is None


def _disc_image(size=64, lesion_at=(32, 32), lesion_r=5):
    img = np.zeros((size, size), np.float32)
    rr, cc = disk((size // 2, size // 2), size * 0.4, shape=img.shape)
    img[rr, cc] = 0.5
    rr, cc = disk(lesion_at, lesion_r, shape=img.shape)
    img[rr, cc] = 0.8
    return img


def test_segment_generated_keeps_the_lesion_inside_the_breast():
    img = _disc_image()
    prob = np.zeros_like(img)
    prob[28:37, 28:37] = 0.9       # inside the breast
    prob[0:4, 0:4] = 0.9           # in the air: must be dropped
    lab = segment_generated(img, prob)
    assert lab.shape == img.shape and lab.dtype == np.uint8
    assert (lab == 2).sum() == 81 and not (lab[0:4, 0:4] == 2).any()
    assert (lab[0:4, 0:4] == 0).all() and lab[32, 10] == 1
    roi = np.zeros(img.shape, bool)
    roi[28:33, :] = True
    assert ((segment_generated(img, prob, roi=roi) == 2).sum()) == 5 * 9
    assert ((segment_generated(img, prob, threshold=0.95) == 2).sum()) == 0


def test_lesion_box_roi_grows_and_clamps_each_box():
    m = np.zeros((20, 20), np.uint8)
    m[5:8, 6:9] = 1                   # 3x3 lesion
    m[18:20, 0:2] = 1                 # 2x2 lesion in the corner
    roi = lesion_box_roi(m, margin=2)
    expected = np.zeros((20, 20), bool)
    expected[3:10, 4:11] = True       # grown by 2 on each side
    expected[16:20, 0:4] = True       # clamped at the image border
    np.testing.assert_array_equal(roi, expected)
    assert not lesion_box_roi(np.zeros((4, 4))).any()


def test_controllability_metrics_on_a_perfect_and_a_missed_lesion():
    img = _disc_image()
    truth = segment_generated(img, np.zeros_like(img))
    rr, cc = disk((32, 32), 5, shape=img.shape)
    truth[rr, cc] = 2
    hit = (truth == 2).astype(np.float32)
    miss = np.zeros_like(hit)
    res = controllability_metrics(np.stack([img, img])[:, None], np.stack([hit, miss]), np.stack([truth, truth]))
    assert res["mass_dice_mean"] == pytest.approx(0.5) and res["mass_dice_median"] == pytest.approx(0.5)
    assert res["mass_iou"] == pytest.approx(0.5)       # pooled: TP = n, FN = n
    assert res["breast_iou"] < 1.0 and res["n_images"] == 2
    json.dumps(res, allow_nan=False)


# ------------------------------------------------------------------------------------------------ Fréchet distance
def test_frechet_distance_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    mu = rng.standard_normal(6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    # = (1 + 0 + 6.25) + ((1 + 9 - 6) + (4 + 1 - 4) + 0) = 7.25 + 5 = 12.25
    assert expected == pytest.approx(12.25)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(12.25, rel=1e-9)
    # symmetric
    assert frechet_distance(mu2, np.diag(v2), mu1, np.diag(v1)) == pytest.approx(12.25, rel=1e-9)


def test_frechet_distance_from_features_agrees_with_monai_and_handles_singular_covariances():
    from monai.metrics.fid import get_fid_score

    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((200, 5)), 0.5 + 2.0 * rng.standard_normal((150, 5))
    ours = frechet_distance_from_features(x, y)
    theirs = float(get_fid_score(torch.as_tensor(x), torch.as_tensor(y)))
    assert ours == pytest.approx(theirs, rel=1e-6)
    mu, s = gaussian_fit(x)
    assert mu.shape == (5,) and s.shape == (5, 5)
    # fewer samples than features: singular covariances, still a finite non-negative number
    few = frechet_distance_from_features(rng.standard_normal((4, 20)), rng.standard_normal((4, 20)))
    assert math.isfinite(few) and few >= 0
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance_from_features(x, y[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_from_features(x[:1], y)


def _scipy_path(x, y) -> float:
    """The D x D matrix-root path (as before the low-rank path): Gaussian fits, then ``frechet_distance``."""
    return frechet_distance(*gaussian_fit(x), *gaussian_fit(y))


def _eigen_reference(x, y) -> float:
    """An independent tr((S1 S2)^(1/2)): the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2)."""
    (mu1, s1), (mu2, s2) = gaussian_fit(x), gaussian_fit(y)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


@pytest.mark.parametrize("n1, n2, d, rank", [(12, 9, 64, None), (30, 25, 60, None), (5, 40, 48, None),
                                             (10, 8, 40, 3), (20, 20, 64, 1)])
def test_low_rank_frechet_path_equals_the_matrix_root_path(n1, n2, d, rank):
    """``N1 + N2 <= D``: the nuclear-norm path gives the matrix-root value. Tolerance: 1e-7 of the terms the distance
    subtracts (``tr S1 + tr S2 + |mu1 - mu2|^2``) against the eigenvalue reference, 1e-5 against SciPy's ``sqrtm`` of
    the singular product (its tiny round-off eigenvalues each add ~sqrt(1e-16 |S|) to the trace)."""
    from custom.metrics import frechet

    rng = np.random.default_rng(n1 * 1000 + d)
    if rank is None:
        x, y = rng.standard_normal((n1, d)) ** 2, 0.3 + rng.standard_normal((n2, d))
    else:  # rank-deficient features: rank-`rank` loadings (plus a constant offset) in D dimensions
        w = rng.standard_normal((rank, d))
        x, y = rng.standard_normal((n1, rank)) @ w, 1.0 + 0.5 * rng.standard_normal((n2, rank)) @ w
    fast = frechet_distance_from_features(x, y)
    assert fast == frechet._frechet_distance_low_rank(np.asarray(x, float), np.asarray(y, float))  # dispatched
    (mu1, s1), (mu2, s2) = gaussian_fit(x), gaussian_fit(y)
    scale = float(np.trace(s1) + np.trace(s2) + (mu1 - mu2) @ (mu1 - mu2))
    assert fast == pytest.approx(_eigen_reference(x, y), abs=1e-7 * scale)
    assert fast == pytest.approx(_scipy_path(x, y), abs=1e-5 * scale)
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-9 * scale)  # identical sets: 0


def test_more_samples_than_features_keep_the_matrix_root_path(monkeypatch):
    from custom.metrics import frechet

    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((50, 16)), 0.2 + rng.standard_normal((40, 16))
    monkeypatch.setattr(frechet, "_frechet_distance_low_rank", lambda *a: pytest.fail("low-rank path used"))
    assert frechet_distance_from_features(x, y) == _scipy_path(x, y)
    monkeypatch.undo()
    # the low-rank formula is exact for any N (here N > D) and agrees with the matrix root
    assert frechet._frechet_distance_low_rank(x, y) == pytest.approx(_scipy_path(x, y), rel=1e-9)


# ------------------------------------------------------------------------------------------------- FD-radiomics67
def _lesion_set(n=12, seed=0, size=64):
    rng = np.random.default_rng(seed)
    imgs, masks = np.zeros((n, 1, size, size)), np.zeros((n, 1, size, size), np.uint8)
    for i in range(n):
        img = 0.3 + 0.04 * rng.standard_normal((size, size))
        rr, cc = ellipse(rng.uniform(20, 44), rng.uniform(20, 44), rng.uniform(4, 9), rng.uniform(4, 9), shape=(size, size))
        img[rr, cc] += rng.uniform(0.2, 0.4)
        masks[i, 0, rr, cc] = 1
        imgs[i, 0] = np.clip(img, 0, 1)
    return imgs, masks


def test_fd_radiomics67_self_is_zero_and_grows_with_noise():
    imgs, masks = _lesion_set()
    real, info = extract_radiomic_features(imgs, masks)
    assert real.shape == (12, 67) and info["n_regions"] == 12 and info["n_failed"] == 0
    assert frechet_radiomics_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(5)
    values = []
    for level in (0.01, 0.03, 0.1):
        noisy = np.clip(imgs + level * rng.standard_normal(imgs.shape), 0, 1)
        gen, _ = extract_radiomic_features(noisy, masks)
        values.append(frechet_radiomics_distance(real, gen))
    assert values[0] > 0 and values[0] < values[1] < values[2], values


def test_fd_radiomics67_metrics_dict_regions_and_scaler():
    imgs, masks = _lesion_set(n=4, seed=3)
    res = fd_radiomics67_metrics(imgs, masks, imgs, masks)
    assert res["fd_radiomics67"] == pytest.approx(0.0, abs=1e-6) and res["fd_radiomics67_n_real"] == 4 and res["fd_radiomics67_normalisation"] == "zscore_real"
    json.dumps(res, allow_nan=False)
    # whole-breast region: one vector per image
    feats, info = extract_radiomic_features(np.stack([_disc_image()] * 2), region="breast")
    assert feats.shape == (2, 67) and info["n_regions"] == 2
    # two lesions in one binary mask -> two vectors; an empty mask -> counted, no vector; a 1-px lesion fails
    m = np.zeros((3, 64, 64), np.uint8)
    m[0, 10:16, 10:16] = 1
    m[0, 40:47, 40:47] = 1
    m[2, 30, 30] = 1
    feats, info = extract_radiomic_features(np.full((3, 64, 64), 0.4) + np.random.default_rng(0).random((3, 64, 64)) * 0.1, m)
    assert feats.shape == (2, 67) and info["n_empty"] == 1 and info["n_failed"] == 1
    # a feature constant in the real set neither divides by zero nor vanishes
    real = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    scaler = RadiomicsScaler().fit(real, real + [0.0, 1.0])
    assert np.all(np.isfinite(scaler.transform(real))) and scaler.scale_[1] > 0
    assert frechet_radiomics_distance(real, real + [0.0, 1.0]) > 0
    with pytest.raises(MammoInputError, match="missing.yaml"):
        extract_radiomic_features(imgs, masks, params_file="/nonexistent/missing.yaml")


def test_feature_contributions_name_the_shifted_and_the_spread_feature_by_hand():
    """Random raw features. In the generated set one column is shifted by 6 of its own standard deviations (z-units:
    mean term 36, std term 0) and another is spread 3x about its mean (mean term 0, std term (3 - 1)^2 = 4). Those
    are the two largest one-dimensional distances, in that order; the rest are 0."""
    from custom.features import FEATURE_NAMES

    rng = np.random.default_rng(0)
    real = rng.normal(5.0, 2.0, size=(40, 67))
    gen = real.copy()
    gen[:, 17] += 6 * real[:, 17].std()
    gen[:, 30] = real[:, 30].mean() + 3 * (real[:, 30] - real[:, 30].mean())
    total = frechet_radiomics_distance(real, gen)
    top = feature_contributions(real, gen, total, top=3)
    assert [t["feature"] for t in top[:2]] == [FEATURE_NAMES[17], FEATURE_NAMES[30]]
    assert top[0]["squared_mean_difference"] == pytest.approx(36.0, rel=1e-9)
    assert top[0]["squared_std_difference"] == pytest.approx(0.0, abs=1e-18)
    assert top[1]["squared_mean_difference"] == pytest.approx(0.0, abs=1e-18)
    assert top[1]["distance"] == pytest.approx(4.0, rel=1e-9)
    assert top[2]["distance"] == pytest.approx(0.0, abs=1e-18) and len(top) == 3
    assert top[0]["share"] == pytest.approx(36.0 / total, rel=1e-9)
    assert [t["share"] for t in feature_contributions(real, gen)] == [None, None, None]
    # one column shifted alone: the distance is that column's term (same covariance: FD = the mean term)
    shifted = real.copy()
    shifted[:, 17] += 6 * real[:, 17].std()
    assert feature_contributions(real, shifted, frechet_radiomics_distance(real, shifted))[0]["share"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="feature sets"):
        feature_contributions(real[:, :5], gen[:, :5])


def test_fd_radiomics67_metrics_carry_the_top_features():
    imgs, masks = _lesion_set(n=6, seed=4)
    brighter = np.clip(imgs * 1.5, 0, 1)  # lesions pushed towards white, some clipped
    res = fd_radiomics67_metrics(imgs, masks, brighter, masks)
    top = res["fd_radiomics67_top_features"]
    assert len(top) == 3 and res["fd_radiomics67"] > 0
    assert top[0]["distance"] >= top[1]["distance"] >= top[2]["distance"] > 0
    json.dumps(res, allow_nan=False)


def test_saturated_fraction_by_hand():
    img = np.zeros((2, 1, 8, 8))
    mask = np.zeros((2, 8, 8), np.uint8)
    mask[0, :2, :] = 1                  # 16 px region in image 0
    img[0, 0, 0, :] = 1.0               # 8 of them at white
    img[0, 0, 1, :4] = 0.995            # 4 exactly at the level (counted)
    img[0, 0, 1, 4:] = 0.99             # 4 below
    img[1, 0] = 1.0                     # image 1: white everywhere but no region
    res = saturated_fraction(img, mask)
    assert res["fraction"] == pytest.approx(12 / 16) and res["n_pixels"] == 16 and res["n_images_with_region"] == 1
    assert saturated_fraction(img, mask, level=1.0)["fraction"] == pytest.approx(8 / 16)
    assert saturated_fraction(torch.from_numpy(img), torch.from_numpy(mask)[:, None])["fraction"] == pytest.approx(12 / 16)
    assert saturated_fraction(img, np.zeros_like(mask))["fraction"] is None
    with pytest.raises(ValueError, match="differ in shape"):
        saturated_fraction(img, mask[:, :4])
    with pytest.raises(ValueError, match="level"):
        saturated_fraction(img, mask, level=1.5)


# ----------------------------------------------------------------------------------------------------- FID / FSD
class _TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))  # (B, 8, H, W): pooled to (B, 8) by the metric


def _smooth_and_noise(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    smooth = torch.stack([(0.3 + 0.4 * xx * torch.rand(1, generator=g) + 0.2 * yy)[None] for _ in range(n)])
    noise = torch.rand((n, 1, size, size), generator=g)
    return smooth.clamp(0, 1), noise


def test_fid_with_a_torchscript_network_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.trace(_TinyFeatures().eval(), torch.rand(1, 1, 32, 32)), str(path))
    metric = FeatureDistance(feature_network=path)
    assert metric.name == "fid"
    smooth, noise = _smooth_and_noise()
    same = metric(smooth, smooth)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["fid_feature_dim"] == 8 and "fsd" not in same
    diff = metric(smooth, noise)
    assert diff["fid"] > 1e-3 and diff["fid_n_real"] == 8 and diff["fid_feature_network"] == str(path)
    json.dumps(diff, allow_nan=False)
    # 3-channel network input with resizing: the 1-channel image is repeated
    net3 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    p3 = tmp_path / "features3.pt"
    torch.jit.save(torch.jit.trace(net3.eval(), torch.rand(1, 3, 48, 48)), str(p3))
    r3 = FeatureDistance(feature_network=p3, in_channels=3, input_size=48, input_range="imagenet")(smooth, noise)
    assert r3["fid_feature_dim"] == 4 and r3["fid"] > 0


def test_fid_state_dict_file_and_bad_paths(tmp_path):
    net = _TinyFeatures()
    sd = tmp_path / "features_state.pt"
    torch.save({"model": net.state_dict()}, sd)
    with pytest.raises(MammoInputError, match="needs the network architecture") as err:
        FeatureDistance(feature_network=sd)
    assert str(sd) in str(err.value)
    metric = FeatureDistance(feature_network=sd, network=_TinyFeatures())
    smooth, noise = _smooth_and_noise(n=4)
    assert metric(smooth, noise)["fid"] > 0
    missing = tmp_path / "no_such_inception.pt"
    with pytest.raises(MammoInputError, match="not found") as err:
        FeatureDistance(feature_network=missing)
    assert str(missing) in str(err.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MammoInputError) as err:
        FeatureDistance(feature_network=junk, network=_TinyFeatures())
    assert str(junk) in str(err.value)
    with pytest.raises(ValueError, match="feature_network file"):
        FeatureDistance()


def test_without_a_feature_network_the_metric_is_fsd():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    enc = SegmenterEncoder(unet)
    assert enc(torch.rand(2, 1, 32, 32)).shape == (2, 4 + 8 + 16)
    metric = FeatureDistance(feature_network=None, segmenter=unet)
    assert metric.name == "fsd"
    smooth, noise = _smooth_and_noise()
    res = metric(smooth, noise)
    assert set(res) >= {"fsd", "fsd_feature_dim", "fsd_feature_network"} and not any(k.startswith("fid") for k in res)
    assert res["fsd"] > 0 and res["fsd_feature_network"] == "segmenter encoder"
    assert metric(smooth, smooth)["fsd"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(TypeError, match="UNet"):
        SegmenterEncoder(torch.nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------------------------------- diversity / reconstruction
def test_ms_ssim_settings_fit_small_images():
    assert ms_ssim_settings(64)["n_scales"] == 4 and ms_ssim_settings(32)["n_scales"] == 3
    assert ms_ssim_settings(256)["n_scales"] == 5
    assert sum(ms_ssim_settings(64)["weights"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_settings(8)


def test_ms_ssim_diversity_identical_vs_independent_noise():
    img = torch.as_tensor(_disc_image())[None]
    same = ms_ssim_diversity(torch.stack([img] * 4))
    assert same["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-4) and same["ms_ssim_n_pairs"] == 6
    assert same["ms_ssim_n_scales"] == 4
    noise = torch.rand((5, 1, 64, 64), generator=torch.Generator().manual_seed(0))
    div = ms_ssim_diversity(noise)
    assert div["ms_ssim_mean"] < 0.2 and div["ms_ssim_n_pairs"] == 10
    assert ms_ssim_diversity(noise, max_pairs=3)["ms_ssim_n_pairs"] == 3
    json.dumps(div, allow_nan=False)
    with pytest.raises(ValueError, match="at least 2"):
        ms_ssim_diversity(noise[:1])


def test_reconstruction_ssim_psnr():
    target = torch.full((2, 1, 32, 32), 0.5)
    perfect = reconstruction_metrics(target, target)
    assert perfect["ssim_mean"] == pytest.approx(1.0, abs=1e-6) and perfect["psnr_mean"] == 100.0
    off = reconstruction_metrics(target + 0.1, target)     # MSE 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert off["psnr_mean"] == pytest.approx(20.0, abs=1e-3) and off["n_images"] == 2
    noisy = (target + 0.2 * torch.rand(target.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert reconstruction_metrics(noisy, target)["ssim_mean"] < 0.9
    json.dumps(perfect, allow_nan=False)


# ---------------------------------------------------------------------------------------- published FRD (frd-score)
def test_published_frd_runs_frd_score_on_8bit_png_folders(tmp_path, monkeypatch):
    """The published FRD is the frd-score package on PNG folders: the folders hold the 8-bit images, the value is
    frd-score's own on those folders, and it differs from the project's fd_radiomics67 key (never the same name)."""
    from PIL import Image

    from custom.metrics.frd_published import published_frd, write_png_folder

    rng = np.random.default_rng(0)
    imgs = np.zeros((4, 1, 24, 24))
    imgs[:, :, 4:20, 2:14] = 0.5 + 0.3 * rng.random((4, 1, 16, 12))
    paths = write_png_folder(imgs[:2], tmp_path / "a")
    with Image.open(paths[0]) as im:
        arr = np.asarray(im)
    assert im.mode == "L" and np.array_equal(arr, (imgs[0, 0] * 255).round().astype(np.uint8))
    write_png_folder(imgs[2:], tmp_path / "b")
    from frd_score import compute_frd

    direct = float(compute_frd([str(tmp_path / "a"), str(tmp_path / "b")], num_workers=1))
    res = published_frd(imgs[:2], imgs[2:])
    assert res["frd"] == pytest.approx(direct) and res["package"].startswith("frd-score ")
    assert res["n_real"] == res["n_generated"] == 2
    import frd_score

    monkeypatch.setattr(frd_score, "compute_frd", lambda *a, **k: float("-inf"))  # what it returns for identical sets
    same = published_frd(imgs[:2], imgs[:2])
    assert same["frd"] is None and "identical" in same["note"]  # log(0) is reported, not written as -inf


def test_batch_2d_shapes_and_errors():
    from custom.metrics.arrays import as_numpy, batch_2d

    a = np.arange(12).reshape(3, 4)
    assert batch_2d(a, "x").shape == (1, 3, 4) and np.array_equal(batch_2d(a, "x")[0], a)
    assert batch_2d(torch.zeros(2, 1, 3, 4), "x").shape == (2, 3, 4)
    assert batch_2d(np.zeros((2, 3, 4), np.uint8), "x").dtype == np.uint8  # dtype kept
    with pytest.raises(ValueError, match=r"^masks: expected \(H, W\), \(B, H, W\) or \(B, 1, H, W\)"):
        batch_2d(np.zeros((2, 2, 3, 4)), "masks")
    from monai.data import MetaTensor

    assert isinstance(as_numpy(MetaTensor(torch.ones(2))), np.ndarray)
