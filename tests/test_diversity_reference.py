"""Diversity references: phantom texture siblings and real-pair MS-SSIM at the model's resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest

from custom.data.phantom import _render, phantom_image
from custom.metrics.diversity_reference import (
    load_model_frame,
    phantom_source,
    real_pairs_ms_ssim,
    sibling_frames,
    texture_sibling_ms_ssim,
)
from custom.metrics.image_quality import ms_ssim_diversity


def _with_mass(seed: int = 7) -> tuple[int, int]:
    for s in range(4):
        for i in range(4):
            if phantom_image(seed, s, i, (320, 256)).masses:
                return s, i
    raise AssertionError("no phantom image with a mass")


def test_texture_sibling_keeps_the_condition_and_changes_only_the_parenchyma():
    s, i = _with_mass()
    args = (7, s, i, (320, 256), "C", s * 4 + i)
    base = _render(*args)
    again = _render(*args, texture_seed=None)
    a, b = _render(*args, texture_seed=0), _render(*args, texture_seed=1)
    # None is the dataset's image, bit for bit (the texture draws are still consumed from the main generator)
    np.testing.assert_array_equal(base.display, again.display)
    for sib in (a, b):
        np.testing.assert_array_equal(sib.breast, base.breast)
        assert [m.box for m in sib.masses] == [m.box for m in base.masses]
        np.testing.assert_array_equal(sib.display[~sib.breast], base.display[~base.breast])
    inside = base.breast
    assert np.abs(a.display[inside] - b.display[inside]).mean() > 0.01
    assert np.abs(a.display[inside] - base.display[inside]).mean() > 0.01
    # the same sibling seed is reproducible
    np.testing.assert_array_equal(_render(*args, texture_seed=1).display, b.display)


def _raw_records(prepared_dir, split=None):
    d = json.loads((prepared_dir / "datalist.json").read_text())
    splits = [split] if split else ["training", "validation", "test"]
    return [r for sp in splits for r in d.get(sp, [])]


def test_phantom_source_finds_the_generating_indices(prepared_dir):
    rec = _raw_records(prepared_dir)[0]
    src = phantom_source(rec)
    assert src is not None and src["seed"] == 7 and src["image_shape"] == (320, 256)
    img = phantom_image(src["seed"], src["study_index"], src["image_index"], src["image_shape"])
    assert img.image_id in rec["source_image"] and img.study_id in rec["source_image"]
    assert phantom_source({"source_image": "/nonexistent/images/a/b.dicom"}) is None


def test_sibling_of_seed_none_reproduces_the_prepared_image(prepared_dir):
    rec = next(r for r in _raw_records(prepared_dir) if r["num_lesions"] > 0)
    frame = sibling_frames(rec, [None], image_size=64)[0, 0]
    prepared = load_model_frame(prepared_dir / rec["image"], 64)
    np.testing.assert_allclose(frame, prepared, atol=1e-6)


def test_sibling_reference_lies_between_identical_and_different_images(prepared_dir):
    ref = texture_sibling_ms_ssim(prepared_dir, 64, split="training", n_cases=1, n_siblings=3)
    assert ref["n_cases"] == 1 and ref["n_siblings"] == 3
    assert 0.0 < ref["ms_ssim_mean"] < 0.999  # siblings differ (identical images give 1.0) ...
    rec = next(r for r in _raw_records(prepared_dir, "training") if r["num_lesions"] > 0)
    frames = sibling_frames(rec, [0, 0], image_size=64)
    assert ms_ssim_diversity(frames)["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-5)  # ... a repeated seed does not


def test_real_pairs_reference_is_the_mean_over_all_pairs(prepared_dir):
    out = real_pairs_ms_ssim(prepared_dir, 32, split="training", max_images=3)
    assert out["n_images"] == 3 and out["ms_ssim_n_pairs"] == 3
    with pytest.raises(ValueError, match="need at least 2"):
        real_pairs_ms_ssim(prepared_dir, 32, split="training", max_images=1)


def test_roundtrip_reference_measures_what_survives_stage_1(prepared_dir):
    identity = texture_sibling_ms_ssim(prepared_dir, 32, split="training", n_cases=1, n_siblings=3,
                                       roundtrip=lambda x: x)
    assert identity["roundtrip_ms_ssim_mean"] == pytest.approx(identity["ms_ssim_mean"], abs=1e-6)
    flat = texture_sibling_ms_ssim(prepared_dir, 32, split="training", n_cases=1, n_siblings=3,
                                   roundtrip=lambda x: x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone() * 0 + 0.5)
    assert flat["roundtrip_ms_ssim_mean"] == pytest.approx(1.0, abs=1e-5)  # a stage 1 that erases everything


def test_diversity_figure_rows_from_an_evaluation_folder(prepared_dir, tmp_path):
    from PIL import Image

    from custom.engines.figures import diversity_figure

    rec = next(r for r in _raw_records(prepared_dir) if r["num_lesions"] > 0)
    gen = tmp_path / "eval" / "generated"
    gen.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray((rng.random((32, 32)) * 65535).astype(np.uint16)).save(gen / f"{rec['case_id']}_seed{k}.png")
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(gen / "other_seed0.png")  # one seed only: not a condition row
    out = diversity_figure(tmp_path / "eval", prepared_dir, tmp_path / "grid.png")
    with Image.open(out) as im:
        assert im.size[0] > im.size[1] > 100  # one row of 1 + 2 * 3 panels
    empty = tmp_path / "empty"
    (empty / "generated").mkdir(parents=True)
    with pytest.raises(ValueError, match="no condition with two or more seeds"):
        diversity_figure(empty, prepared_dir, tmp_path / "grid2.png")


def test_lesion_free_sibling_reproduces_the_truth_and_varies_the_texture(phantom_dir, tmp_path):
    import pydicom

    from custom.metrics.diversity_reference import write_lesion_free_sibling

    truth = sorted((phantom_dir / "lesion_free").glob("*/*.dicom"))[0]
    source = phantom_dir / "images" / truth.parent.name / truth.name
    own = pydicom.dcmread(write_lesion_free_sibling(source, None, tmp_path / "own.dicom")).pixel_array
    expected = pydicom.dcmread(truth).pixel_array
    np.testing.assert_array_equal(own, expected)  # texture_seed None: the phantom's own truth, pixel for pixel
    a = pydicom.dcmread(write_lesion_free_sibling(source, 1, tmp_path / "a.dicom")).pixel_array
    b = pydicom.dcmread(write_lesion_free_sibling(source, 1, tmp_path / "b.dicom")).pixel_array
    np.testing.assert_array_equal(a, b)  # reproducible
    assert a.shape == expected.shape and (a != expected).mean() > 0.05  # another parenchyma, same frame
    with pytest.raises(ValueError, match="not a phantom image"):
        write_lesion_free_sibling(tmp_path / "x" / "y" / "z.dicom", 1, tmp_path / "never.dicom")
