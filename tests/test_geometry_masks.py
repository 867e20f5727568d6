"""Breast geometry (flip, crop, resize, pad) applied identically to image, masks and boxes, and inverted;
breast/lesion masks, the label map and the soft mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from custom.transforms import (
    MammoGeometry,
    MammoGeometryd,
    SoftMask,
    SoftMaskd,
    breast_mask,
    compute_geometry,
    label_map,
    lesion_instances_from_boxes,
    lesion_instances_from_mask,
    soft_mask,
)


def _phantom_breast(h=300, w=200, side="left", seed=0):
    """A half-ellipse breast against one edge with fatty (0.3) and dense (0.85) tissue; air is 0."""
    yy, xx = np.mgrid[0:h, 0:w]
    cx = 0 if side == "left" else w - 1
    inside = ((xx - cx) / (0.7 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 <= 1
    rng = np.random.default_rng(seed)
    tissue = ndimage.gaussian_filter(rng.random((h, w)), 6)
    img = np.where(inside, np.where(tissue > np.median(tissue), 0.85, 0.3), 0.0).astype(np.float32)
    return img, inside


def iou(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return (a & b).sum() / max((a | b).sum(), 1)


def test_breast_mask_finds_tissue_not_just_dense_tissue_and_ignores_edge_artefacts():
    img, truth = _phantom_breast()
    img[:3, 150:] = 1.0  # a bright artefact line at the top edge, away from the breast
    img[250:260, 170:185] = 0.9  # a detached marker
    mask = breast_mask(img)
    assert iou(mask, truth) > 0.97
    assert not mask[:3, 150:].any() and not mask[250:260, 170:185].any()


def test_breast_mask_fills_holes():
    img, truth = _phantom_breast()
    img[140:160, 20:40] = 0.0  # a dark hole inside the breast
    assert breast_mask(img)[150, 30]


def test_geometry_flips_right_breasts_crops_and_pads_to_square():
    img, truth = _phantom_breast(side="right")
    geom, info = compute_geometry(truth, "R", size=64, margin=0.0)
    assert geom.flip and info["laterality_source"] == "tag" and not info["laterality_conflict"]
    out = geom.apply_image(img[None])[0].numpy()
    assert out.shape == (64, 64)
    # after the flip the chest wall is on the left: the leftmost column is tissue, the right padding is air
    assert out[:, 0].max() > 0.2 and out[:, -1].max() == 0.0
    rows, cols = geom.crop[1] - geom.crop[0], geom.crop[3] - geom.crop[2]
    assert geom.resized_shape[0] == 64  # the taller side fills the output
    assert geom.resized_shape[1] == pytest.approx(64 * cols / rows, abs=1)  # aspect ratio kept


def test_laterality_fallback_and_conflict():
    img, truth = _phantom_breast(side="right")
    geom, info = compute_geometry(truth, None, size=32)
    assert geom.flip and info["laterality_source"] == "intensity"
    geom, info = compute_geometry(truth, "L", size=32)  # tag says left, tissue is on the right
    assert not geom.flip and info["laterality_conflict"]


def test_image_and_mask_get_identical_geometry_and_invert_back():
    img, truth = _phantom_breast(h=400, w=260, side="right")
    lesion = lesion_instances_from_boxes(img.shape, [[150, 180, 200, 230]])  # xmin, ymin, xmax, ymax
    geom, _ = compute_geometry(truth, "R", size=128, margin=0.02)
    g_img = geom.apply_image(img[None], "image")[0].numpy()
    g_breast = geom.apply_image(truth.astype(np.float32)[None], "mask")[0].numpy() > 0
    g_lesion = geom.apply_image((lesion > 0).astype(np.float32)[None], "mask")[0].numpy() > 0
    # the same geometry: the transformed mask matches the transformed image's tissue
    assert iou(g_breast, g_img > 0.15) > 0.95
    # round trip back to the source grid
    back = geom.invert_image(g_breast.astype(np.float32)[None], "mask")[0].numpy() > 0
    assert back.shape == truth.shape and iou(back, truth) > 0.97
    back_lesion = geom.invert_image(g_lesion.astype(np.float32)[None], "mask")[0].numpy() > 0
    assert iou(back_lesion, lesion > 0) > 0.85
    back_img = geom.invert_image(g_img[None], "image")[0].numpy()
    assert np.abs(back_img - img)[truth & ndimage.binary_erosion(truth, iterations=4)].mean() < 0.1


def test_boxes_follow_the_mask_and_invert():
    img, truth = _phantom_breast(h=400, w=260, side="right")
    box = np.array([[150.0, 180.0, 200.0, 230.0]])
    geom, _ = compute_geometry(truth, "R", size=128, margin=0.02)
    out_box = geom.apply_boxes(box)[0]
    # the box transformed as coordinates equals the bounding box of the box transformed as a mask (within a pixel)
    m = geom.apply_image(lesion_instances_from_boxes(img.shape, box, kind="box").astype(np.float32)[None], "mask")[0].numpy()
    r, c = np.nonzero(m > 0)
    np.testing.assert_allclose(out_box, [c.min(), r.min(), c.max() + 1, r.max() + 1], atol=1.0)
    np.testing.assert_allclose(geom.invert_boxes(out_box[None])[0], box[0], atol=1e-6)


def test_geometry_serialises():
    _, truth = _phantom_breast()
    geom, _ = compute_geometry(truth, "L", size=32)
    assert MammoGeometry.from_dict(geom.to_dict()) == geom


def test_dictionary_form_applies_to_every_key():
    img, truth = _phantom_breast(side="right")
    lesion = lesion_instances_from_boxes(img.shape, [[150, 120, 180, 160]])
    d = MammoGeometryd(keys=["image", "breast", "lesions"], modes=["image", "mask", "nearest"], size=48,
                       laterality_key="lat", boxes_key="boxes")(
        {"image": img[None], "breast": truth[None], "lesions": lesion[None], "lat": "R", "boxes": [[150, 120, 180, 160]]}
    )
    assert all(tuple(d[k].shape) == (1, 48, 48) for k in ("image", "breast", "lesions"))
    assert d["geometry"].flip and d["boxes"].shape == (1, 4)
    assert set(np.unique(d["lesions"].numpy())) <= {0.0, 1.0}


def test_lesion_instances_from_boxes_and_masks():
    inst = lesion_instances_from_boxes((100, 100), [[10, 10, 50, 30], [60, 60, 90, 90]])
    assert set(np.unique(inst)) == {0, 1, 2}
    assert (inst == 1).sum() == pytest.approx(np.pi / 4 * 40 * 20, rel=0.05)  # ellipse inscribed in the box
    box = lesion_instances_from_boxes((100, 100), [[10, 10, 50, 30]], kind="box")
    assert (box == 1).sum() == 40 * 20
    binary = np.zeros((50, 50), np.uint8)
    binary[5:10, 5:10] = 255
    binary[30:40, 30:40] = 255
    assert lesion_instances_from_mask(binary).max() == 2  # two connected components
    assert lesion_instances_from_mask(np.where(binary > 0, 3, 0)).max() == 2
    instances = np.zeros((10, 10), np.uint8)
    instances[1, 1], instances[5, 5] = 1, 2
    np.testing.assert_array_equal(lesion_instances_from_mask(instances), instances)


def test_label_map_lesion_wins_over_breast():
    breast = np.zeros((4, 4), bool)
    breast[:, :2] = True
    lesion = np.zeros((4, 4), np.uint8)
    lesion[0, 1:3] = 1
    np.testing.assert_array_equal(label_map(breast, lesion)[0], [1, 2, 2, 0])


def _labels():
    lab = np.zeros((1, 40, 40), np.uint8)
    lab[0, :, :25] = 1
    lab[0, 10:20, 8:18] = 2
    return lab


def test_soft_mask_sigma_zero_is_the_hard_one_hot():
    lab = _labels()
    hard = soft_mask(lab, sigma=0)
    assert hard.shape == (3, 40, 40) and hard.dtype == torch.float32
    for c in range(3):
        np.testing.assert_array_equal(hard[c].numpy(), (lab[0] == c).astype(np.float32))


def test_soft_mask_blurs_only_the_lesion_channel():
    lab = _labels()
    hard, soft = soft_mask(lab, 0), SoftMask(1.5)(lab)
    torch.testing.assert_close(soft[:2], hard[:2])  # background and breast unchanged
    assert not torch.equal(soft[2], hard[2])
    assert float(soft[2].min()) >= 0 and float(soft[2].max()) <= 1
    # a Gaussian keeps the lesion's mass (lesion far from the border) and spreads it beyond the hard edge
    assert float(soft[2].sum()) == pytest.approx(float(hard[2].sum()), rel=1e-3)
    assert float(soft[2][9, 12]) > 0 and float(soft[2][15, 12]) < 1
    # more blur -> wider spread
    assert (SoftMask(2.5)(lab)[2] > 1e-3).sum() > (soft[2] > 1e-3).sum()


def test_soft_mask_dict_form_and_bad_labels():
    out = SoftMaskd(keys="label", sigma=1.0, output_key="soft")({"label": _labels()})
    assert out["soft"].shape == (3, 40, 40) and out["label"].shape == (1, 40, 40)
    with pytest.raises(ValueError, match="values must be in"):
        soft_mask(np.full((1, 4, 4), 3))
    with pytest.raises(ValueError, match="sigma"):
        SoftMask(-1)
