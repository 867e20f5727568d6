"""The reconstruction loop's attribute classifier on hand-made images whose attributes are plainly visible."""

from __future__ import annotations

import numpy as np
import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _images(n: int, seed: int):
    """Density = brightness level, MLO = a bright top-left triangle, lesion = a bright square."""
    g = np.random.default_rng(seed)
    imgs, attrs = [], []
    yy, xx = np.mgrid[0:24, 0:24]
    for _ in range(n):
        d, v, les = int(g.integers(4)), int(g.integers(2)), int(g.integers(2))
        img = np.full((24, 24), 0.1 + 0.2 * d) + g.normal(0, 0.02, (24, 24))
        if v:
            img[(xx + yy) < 10] = 1.0
        if les:
            r, c = g.integers(12, 18, 2)
            img[r:r + 4, c:c + 4] = 1.0
        imgs.append(img)
        attrs.append({"density": "ABCD"[d], "view": ("CC", "MLO")[v], "lesion": ("no", "yes")[les]})
    return torch.tensor(np.stack(imgs)[:, None], dtype=torch.float32).clamp(0, 1), attrs


def test_attribute_classifier_reads_visible_attributes_and_fidelity_table(tmp_path):
    from custom.errors import MammoInputError
    from custom.metrics.attribute_classifier import (
        attribute_fidelity,
        load_classifier,
        predict_attributes,
        save_classifier,
        train_attribute_classifier,
    )

    train_x, train_a = _images(96, 0)
    model = train_attribute_classifier(train_x, train_a, epochs=25, batch_size=16, seed=0)
    test_x, test_a = _images(32, 1)
    # "generated" images that show the opposite view of what was requested: view accuracy must collapse
    wrong = [{**a, "view": "CC" if a["view"] == "MLO" else "MLO"} for a in test_a]
    fid = attribute_fidelity(model, test_x, wrong, test_x, test_a)
    assert fid["real"]["view"]["accuracy"] >= 0.8 and fid["real"]["lesion"]["accuracy"] >= 0.8  # chance: 0.5
    # binary head, every request flipped: accuracy on "generated" is exactly 1 - the real accuracy
    assert fid["generated"]["view"]["accuracy"] == pytest.approx(1.0 - fid["real"]["view"]["accuracy"])
    assert fid["generated"]["density"] == fid["real"]["density"]  # density was requested as shown
    save_classifier(model, tmp_path / "clf.pt")
    again = load_classifier(tmp_path / "clf.pt")
    assert predict_attributes(again, test_x) == predict_attributes(model, test_x)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MammoInputError, match="bad.pt"):
        load_classifier(tmp_path / "bad.pt")


def test_lesion_radiomics_fidelity_pairs_lesions_and_identical_images_correlate_perfectly():
    from custom.metrics.fidelity import lesion_radiomics_fidelity

    g = np.random.default_rng(0)
    b, s = 4, 40
    real = np.clip(0.3 + 0.05 * g.standard_normal((b, 1, s, s)), 0, 1)
    inst = np.zeros((b, s, s), dtype=np.uint8)
    yy, xx = np.mgrid[0:s, 0:s]
    for i in range(b):  # one disc per image, radius and brightness growing with i: features vary across lesions
        disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= (4 + 2 * i) ** 2
        inst[i][disc] = 1
        real[i, 0][disc] = np.clip(0.5 + 0.1 * i + 0.05 * g.standard_normal(disc.sum()), 0, 1)
    out = lesion_radiomics_fidelity(real, real.copy(), real[:, :, ::-1, :].copy(), inst)
    assert out["n_pairs"] == 4 and out["n_failed"] == 0
    assert out["generated"]["mean"] == pytest.approx(1.0)  # the same image measured twice: every defined rho = 1
    assert out["generated"]["n_undefined"] < 67
    few = lesion_radiomics_fidelity(real[:2], real[:2], real[:2], inst[:2])
    assert few["generated"]["mean"] is None and few["n_pairs"] == 2


def test_ring_fill_hand_made():
    from custom.metrics.fidelity import removal_error, ring_fill

    img = np.zeros((7, 7))
    img[2:5, 2:5] = [[1, 2, 3], [4, 100, 6], [7, 8, 9]]  # the 8 ring pixels around the centre: mean 5
    region = np.zeros((7, 7), bool)
    region[3, 3] = True
    out = ring_fill(img, region, width=1)
    assert out[3, 3] == 5.0 and np.array_equal(out[~region], img[~region])
    assert img[3, 3] == 100  # the input is not modified
    # width 2 adds the 16 zeros of the next ring: 40 / 24
    assert ring_fill(img, region, width=2)[3, 3] == pytest.approx(40 / 24)
    # restricted to a mask (e.g. the breast): only the top row of the ring counts, (1 + 2 + 3) / 3
    within = np.zeros((7, 7), bool)
    within[2, :] = True
    assert ring_fill(img, region, width=1, within=within)[3, 3] == pytest.approx(2.0)
    # as a removal reference: truth 5 everywhere in the region -> the ring fill's error is 0, the original's contrast 95
    truth = img.copy()
    truth[3, 3] = 5.0
    r = removal_error(out, truth, img, region)
    assert r == {"error": 0.0, "contrast": 95.0, "ratio": 0.0}
    for bad in (dict(region=np.zeros((7, 7), bool)), dict(region=region, width=0), dict(region=np.ones((3, 3), bool)),
                dict(region=region, within=np.zeros((7, 7), bool))):
        with pytest.raises(ValueError, match="ring_fill"):
            ring_fill(img, **bad)


def test_dense_fraction_and_density_reader_hand_made():
    from custom.metrics.attribute_classifier import DensityReader, dense_fraction

    # a 20x20 breast on air: 0.2 fat with a 0.8 glandular block of known size; Otsu splits the two levels
    img = np.zeros((32, 32))
    breast = np.zeros((32, 32), dtype=bool)
    breast[4:24, 4:24] = True
    img[breast] = 0.2
    img[4:14, 4:12] = 0.8  # 80 of 400 breast pixels
    assert dense_fraction(img, breast) == pytest.approx(80 / 400)
    assert dense_fraction(img) == pytest.approx(80 / 400)  # the breast mask found from the image itself
    assert np.isnan(dense_fraction(np.full((8, 8), 0.5), np.ones((8, 8), bool)))  # a flat breast has no split
    # thresholds: midpoints of the class medians
    fr = [0.1, 0.12, 0.3, 0.32, 0.34, 0.5, 0.52, 0.7, 0.9]
    lab = ["A", "A", "B", "B", "B", "C", "C", "D", "D"]
    reader = DensityReader.fit(fr, lab)
    assert reader.thresholds == pytest.approx([(0.11 + 0.32) / 2, (0.32 + 0.51) / 2, (0.51 + 0.8) / 2])
    assert reader.read([0.0, 0.2, 0.4, 0.6, 1.0, float("nan")]) == ["A", "A", "B", "C", "D", "?"]
    with pytest.raises(ValueError, match="no image of density D"):
        DensityReader.fit([0.1, 0.3, 0.5], ["A", "B", "C"])
    with pytest.raises(ValueError, match="not increasing"):
        DensityReader.fit([0.9, 0.3, 0.5, 0.7], ["A", "B", "C", "D"])
    with pytest.raises(ValueError, match="increasing finite thresholds"):
        DensityReader([0.5, 0.2, 0.7])


def test_the_module_runs_with_one_torch_thread():
    """The opt-in conftest fixture is active for a module that asks for it."""
    assert torch.get_num_threads() == 1
