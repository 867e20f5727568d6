"""Speed changes of real-size preprocessing that claim the same output, checked against the slower reference:

- the breast mask found at reduced resolution and mapped back vs the full-resolution mask (breast IoU >= 0.99);
- the grayscale pipeline as one float32 look-up table vs pydicom's LUT functions run on every pixel;
- the GPU JPEG 2000 decoder (MONAI's nvImageCodec reader) falls back to pydicom's decoders when absent.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from custom.dicom import header_from_params
from custom.transforms.intensity import apply_dicom_grayscale
from custom.transforms.masks import breast_mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ------------------------------------------------------------------------------------ reduced-resolution mask
@pytest.fixture(scope="module")
def large_phantoms():
    """Display images of phantom mammograms at half the real size (2042 x 1664): CC and MLO, both sides, with
    the phantom's artefacts (markers, edge lines) and noisy air."""
    from custom.dicom import grayscale_params
    from custom.data.phantom import phantom_image

    out = []
    for study, index in ((0, 0), (0, 1), (1, 2), (2, 3)):
        ph = phantom_image(5, study, index, (2042, 1664))
        out.append(apply_dicom_grayscale(ph.stored, grayscale_params(ph.dataset))[0])
    return out


@pytest.mark.parametrize("reduce", [None, 4, 8])
def test_reduced_resolution_breast_mask_matches_full_resolution(large_phantoms, reduce):
    for display in large_phantoms:
        full = breast_mask(display, reduce=1)
        fast = breast_mask(display, reduce=reduce)
        assert fast.shape == full.shape and fast.dtype == bool
        assert full.mean() > 0.2  # a real breast, not an empty mask
        assert _iou(fast, full) >= 0.99, (reduce, _iou(fast, full))


def test_reduced_mask_keeps_the_edge_at_full_resolution():
    """A disc with a sharp edge on noisy air, 4084 x 3328 (real size): the mapped-back mask is not blocky — it
    agrees with the exact disc to within a few pixels along its edge, and with the full-resolution mask."""
    rng = np.random.default_rng(0)
    h, w = 4084, 3328
    yy, xx = np.ogrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.35 * w) ** 2  # inside the ignored 1 % border
    img = np.where(disc, 0.6, 0.02).astype(np.float32) + rng.normal(0, 0.01, (h, w)).astype(np.float32)
    fast = breast_mask(img)  # auto: 6 x 6 blocks
    full = breast_mask(img, reduce=1)
    assert _iou(fast, full) >= 0.999
    assert _iou(fast, disc) >= 0.999
    wrong = fast ^ disc
    assert wrong.sum() < 0.001 * disc.sum()


def test_small_images_keep_the_full_resolution_mask():
    rng = np.random.default_rng(1)
    img = rng.random((640, 512)).astype(np.float32) * 0.05
    img[100:500, :300] += 0.6
    assert np.array_equal(breast_mask(img), breast_mask(img, reduce=1))
    with pytest.raises(ValueError, match="reduce"):
        breast_mask(img, reduce=0)


# ------------------------------------------------------------------------------------------ float32 LUT table
CASES = {
    "linear rescaled": {"PhotometricInterpretation": "MONOCHROME2", "RescaleSlope": 0.75, "RescaleIntercept": -12.0,
                        "WindowCenter": [1800.0], "WindowWidth": [2600.0], "VOILUTFunction": "LINEAR"},
    "linear exact mono1": {"PhotometricInterpretation": "MONOCHROME1", "WindowCenter": [2047.5],
                           "WindowWidth": [3000.0], "VOILUTFunction": "LINEAR_EXACT"},
    "sigmoid with padding": {"PhotometricInterpretation": "MONOCHROME2", "WindowCenter": [2100.0, 900.0],
                             "WindowWidth": [1900.0, 700.0], "VOILUTFunction": "SIGMOID", "PixelPaddingValue": 0},
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_table_path_equals_pydicom_per_pixel(name, dtype):
    params = CASES[name]
    rng = np.random.default_rng(2)
    stored = rng.integers(0, 4096, (300, 200)).astype(dtype)
    stored[:5] = 0
    fast, info_fast = apply_dicom_grayscale(stored, params)
    slow, info_slow = apply_dicom_grayscale(stored, params, use_table=False)
    assert fast.dtype == np.float32 and fast.shape == stored.shape
    np.testing.assert_array_equal(fast, slow)  # the table holds the per-pixel pipeline's own values
    assert info_fast == info_slow
    # and independently against pydicom's functions on the whole image (float64), within 3e-8 relative
    # (the project windows the modality values onto an unsigned 16-bit output range: a VOI-only dataset)
    mod_ds = header_from_params({k: v for k, v in params.items() if k in ("RescaleSlope", "RescaleIntercept")})
    voi_ds = header_from_params({"PhotometricInterpretation": "MONOCHROME2", "BitsStored": 16, "PixelRepresentation": 0,
                                 "WindowCenter": params["WindowCenter"][:1], "WindowWidth": params["WindowWidth"][:1],
                                 "VOILUTFunction": params["VOILUTFunction"]})
    ref = apply_voi_lut(np.asarray(apply_modality_lut(stored, mod_ds), dtype=np.float64), voi_ds, index=0) / 65535.0
    ref = np.clip(ref, 0, 1)
    if params["PhotometricInterpretation"] == "MONOCHROME1":
        ref = 1.0 - ref
    if "PixelPaddingValue" in params:
        ref[stored == params["PixelPaddingValue"]] = 0.0
    np.testing.assert_allclose(fast, ref, rtol=3e-8, atol=3e-8)


def test_table_path_with_a_voi_lut_sequence_and_negative_values():
    lut = {"LUTDescriptor": [8, -4, 8], "LUTData": [0, 10, 50, 100, 200, 250, 255, 255]}
    params = {"PhotometricInterpretation": "MONOCHROME2", "VOILUTSequence": [lut], "PixelRepresentation": 1}
    stored = np.random.default_rng(3).integers(-8, 8, (64, 64)).astype(np.int16)
    fast, _ = apply_dicom_grayscale(stored, params)
    slow, _ = apply_dicom_grayscale(stored, params, use_table=False)
    np.testing.assert_array_equal(fast, slow)
    expected = np.asarray(lut["LUTData"], dtype=np.float64)[np.clip(stored.astype(int) + 4, 0, 7)] / 255.0
    np.testing.assert_allclose(fast, expected, atol=3e-8)


# ------------------------------------------------------------------------------------- GPU decoding fallback
def _j2k_file(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    from custom.data.phantom import _write_dicom, phantom_image

    ph = phantom_image(4, 0, 1, (96, 80))
    path = tmp_path / "j2k.dcm"
    assert _write_dicom(ph.dataset, ph.stored, JPEG2000Lossless, path) == JPEG2000Lossless
    return path, ph.stored


@pytest.mark.parametrize("failure", ["unavailable", "raises", "not registered"])
def test_gpu_decoding_falls_back_to_the_cpu_decoders(tmp_path, monkeypatch, failure):
    """Without nvImageCodec (or when its plugin fails to register) JPEG 2000 still decodes, on the CPU, exactly."""
    from monai.data import nvimgcodec_pydicom_plugin as plugin

    from custom.transforms import loading

    def boom():
        raise RuntimeError("CUDA driver not found")

    monkeypatch.setattr(loading, "_GPU_DECODING", None)
    if failure == "unavailable":
        monkeypatch.setattr(plugin, "is_nvimgcodec_available", lambda: False)
    elif failure == "raises":
        monkeypatch.setattr(plugin, "is_nvimgcodec_available", lambda: True)
        monkeypatch.setattr(plugin, "register_as_decoder_plugin", lambda *a: boom())
    else:
        monkeypatch.setattr(plugin, "is_nvimgcodec_available", lambda: True)
        monkeypatch.setattr(plugin, "register_as_decoder_plugin", lambda *a: False)
    assert loading.enable_gpu_decoding() is False
    assert loading.enable_gpu_decoding(True) is False  # asked for but unavailable: still the CPU, with a warning
    monkeypatch.undo()  # MONAI's own LoadImage probes the plugin too: decode with the real (CPU-only) environment
    path, stored = _j2k_file(tmp_path)
    loader = loading.LoadMammogram(ensure_channel_first=False)
    assert loader.gpu_decoding is False
    np.testing.assert_array_equal(loader(str(path)).numpy(), stored)
    assert loading.LoadMammogram(gpu_decoding=False).gpu_decoding is False


def test_gpu_decoding_registers_the_plugin_once(monkeypatch):
    from monai.data import nvimgcodec_pydicom_plugin as plugin

    from custom.transforms import loading

    calls = []
    monkeypatch.setattr(loading, "_GPU_DECODING", None)
    monkeypatch.setattr(plugin, "is_nvimgcodec_available", lambda: True)
    monkeypatch.setattr(plugin, "register_as_decoder_plugin", lambda *a: calls.append(1) or True)
    assert loading.enable_gpu_decoding() is True and loading.enable_gpu_decoding() is True
    assert calls == [1]
    assert loading.enable_gpu_decoding(False) is False


def test_table_path_takes_float_stored_values_from_loadimage():
    """MONAI's LoadImage hands the stored integers over as float32: same table result; non-integral floats take
    the per-pixel path."""
    params = CASES["linear rescaled"]
    stored = np.random.default_rng(4).integers(0, 4096, (120, 90)).astype(np.uint16)
    ref, _ = apply_dicom_grayscale(stored, params, use_table=False)
    np.testing.assert_array_equal(apply_dicom_grayscale(stored.astype(np.float32), params)[0], ref)
    frac = stored.astype(np.float32) + 0.25
    np.testing.assert_array_equal(apply_dicom_grayscale(frac, params)[0], apply_dicom_grayscale(frac, params, use_table=False)[0])


# ------------------------------------------------------------------------ crop-first geometry, block mapping
def _apply_image_reference(geom, arr, mode):
    """The previous formulation: the whole source converted to float32 and flipped, then cropped, resized, padded."""
    import torch
    import torch.nn.functional as F

    from custom.transforms.geometry import _resize

    x = torch.as_tensor(np.ascontiguousarray(arr)).float()
    if geom.flip:
        x = torch.flip(x, dims=[-1])
    y0, y1, x0, x1 = geom.crop
    x = _resize(x[:, y0:y1, x0:x1], geom.resized_shape, mode)
    top, bottom, left, right = geom.pad
    return F.pad(x, (left, right, top, bottom), value=0.0)


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_crop_before_flip_equals_flip_then_crop(laterality):
    """The geometry crops the source before flipping and converting it: bit-identical to converting and flipping the
    whole image first, for a float image, a bool mask (converted on the crop) and an instance map."""
    import torch

    from custom.transforms.geometry import compute_geometry

    rng = np.random.default_rng(5)
    h, w = 301, 233
    breast = np.zeros((h, w), bool)
    breast[40:260, 150:] = True  # chest wall on the right
    geom, _ = compute_geometry(breast, laterality, 64, 0.05)
    assert geom.flip == (laterality == "R") and geom.crop[3] - geom.crop[2] < w // 2  # a real crop window
    image = rng.random((1, h, w), dtype=np.float32)
    inst = rng.integers(0, 3, (1, h, w)).astype(np.uint8)
    for arr, mode in ((image, "image"), (breast[None], "mask"), ((inst == 1), "mask"), (inst, "nearest")):
        got = geom.apply_image(arr, mode)
        assert torch.equal(got, _apply_image_reference(geom, arr, mode)), mode


def _mapped_mask_reference(img, f, border=0.01):
    """The previous mapping of the low-resolution mask back to full resolution: repeated blocks, then a full-size
    band of edge blocks thresholded by boolean indexing."""
    from scipy import ndimage

    from custom.transforms import masks

    small = masks._block_mean(img, f)
    sy, sx = int(round(border * small.shape[0])), int(round(border * small.shape[1]))
    small[:sy], small[-sy:], small[:, :sx], small[:, -sx:] = 0, 0, 0, 0
    low, t = masks._breast_mask_at(small, None, 1000 // (f * f))
    edge = ndimage.binary_dilation(low) & ~ndimage.binary_erosion(low)
    hf, wf = low.shape
    full = np.repeat(np.repeat(low, f, axis=0), f, axis=1)
    band = np.repeat(np.repeat(edge, f, axis=0), f, axis=1)
    full[band] = img[: hf * f, : wf * f][band] > t
    full = np.pad(full, ((0, img.shape[0] - hf * f), (0, img.shape[1] - wf * f)), mode="edge")
    by, bx = int(round(border * img.shape[0])), int(round(border * img.shape[1]))
    full[:by], full[-by:], full[:, :bx], full[:, -bx:] = False, False, False, False
    return full


@pytest.mark.parametrize("reduce", [4, 6])
def test_edge_block_mapping_equals_the_band_reference(large_phantoms, reduce):
    for display in large_phantoms[:2]:
        got = breast_mask(display, reduce=reduce)
        np.testing.assert_array_equal(got, _mapped_mask_reference(display, reduce))


def test_block_mean_matches_average_pooling():
    """The row-then-column block sums equal torch's average pooling up to float32 summation order."""
    import torch

    from custom.transforms.masks import _block_mean

    img = np.random.default_rng(6).random((605, 419), dtype=np.float32)
    for f in (1, 3, 6):
        ref = torch.nn.functional.avg_pool2d(torch.from_numpy(img[: 605 // f * f, : 419 // f * f])[None, None], f)[0, 0]
        got = _block_mean(img, f)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref.numpy(), rtol=2e-6, atol=1e-7)


def test_direct_table_index_for_unsigned_values_above_zero():
    """uint16 stored values whose minimum is above 0 index a table built from 0 (no shifted int64 copy): the same
    float32 values as the per-pixel pipeline."""
    params = CASES["sigmoid with padding"]
    stored = np.random.default_rng(7).integers(300, 4000, (200, 150)).astype(np.uint16)
    fast, info = apply_dicom_grayscale(stored, params)
    slow, info_slow = apply_dicom_grayscale(stored, params, use_table=False)
    np.testing.assert_array_equal(fast, slow)
    assert info == info_slow


def test_integer_loading_gives_the_float_hand_over_values(tmp_path):
    """``load_display_image`` keeps the stored integers (LoadImage dtype None): the display values equal those of
    the float32 hand-over through DicomGrayscale."""
    from pydicom.uid import ExplicitVRLittleEndian

    from custom.data.phantom import _write_dicom, phantom_image
    from custom.data.prepare import load_display_image
    from custom.transforms.intensity import DicomGrayscale
    from custom.transforms.loading import LoadMammogram

    ph = phantom_image(8, 0, 2, (160, 128))
    path = tmp_path / "plain.dcm"
    _write_dicom(ph.dataset, ph.stored, ExplicitVRLittleEndian, path)
    got, info = load_display_image(path)
    ref = DicomGrayscale()(LoadMammogram(ensure_channel_first=False)(str(path))).numpy()
    assert got.dtype == np.float32 and info["j2k_reduce"] == 0 and info["full_shape"] == (160, 128)
    np.testing.assert_array_equal(got, ref)


# ------------------------------------------------------------------------- JPEG 2000 at reduced resolution
def _psnr16(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(65535.0**2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def j2k_case(tmp_path_factory):
    """A 1024 x 832 phantom mammogram with a mass, written uncompressed and as JPEG 2000 (lossless)."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from custom.data.phantom import _write_dicom, phantom_image

    folder = tmp_path_factory.mktemp("j2k")
    ph = next(p for p in (phantom_image(21, s, i, (1024, 832)) for s in range(4) for i in range(4)) if p.masses)
    paths = {}
    for kind, ts in (("plain", ExplicitVRLittleEndian), ("j2k", JPEG2000Lossless)):  # compress last (shared file_meta)
        paths[kind] = folder / f"{kind}.dcm"
        assert _write_dicom(ph.dataset.copy(), ph.stored, ts, paths[kind]) == ts
    return paths, ph


def _prepare(path, ph, out, j2k_reduce, size=64):
    from PIL import Image

    from custom.data.cases import Finding, MammoCase
    from custom.data.prepare import PreprocessSettings, preprocess_case

    case = MammoCase(case_id="c", image_path=str(path), study_id="s", laterality=ph.laterality,
                     findings=[Finding(box=list(m["box"])) for m in ph.masses])
    rec = preprocess_case(case, str(out), PreprocessSettings(image_size=size, j2k_reduce=j2k_reduce))
    return rec, *(np.asarray(Image.open(out / rec[k])) for k in ("image", "label", "lesions"))


def test_j2k_reduced_decoding_agrees_with_full_decoding(j2k_case, tmp_path):
    """``j2k_reduce="auto"`` against full decoding + the same preprocessing, at a 128-pixel output (1 level here:
    1024 x 832 -> 512 x 416, the shorter side kept >= 2 x the output). Metric on the prepared 16-bit image: PSNR
    >= 40 dB (the reduced image is OpenJPEG's low-pass band, not a box average, and the LUT is applied after that
    filtering instead of before: small differences everywhere, larger at the skin line); breast IoU >= 0.99 and
    lesion IoU >= 0.9 on the 128-pixel label maps; the record's geometry is on the full-resolution grid.
    (At real size, 4084 x 3328 -> 256 px with 2 levels: PSNR 46 dB, breast IoU 0.999, ``make bench``.)"""
    paths, ph = j2k_case
    rec0, img0, lab0, les0 = _prepare(paths["j2k"], ph, tmp_path / "full", "off", 128)
    rec, img, lab, les = _prepare(paths["j2k"], ph, tmp_path / "reduced", "auto", 128)
    assert "j2k_reduce" not in rec0 and rec["j2k_reduce"] == 1
    assert _psnr16(img, img0) >= 40.0, _psnr16(img, img0)
    assert _iou(lab >= 1, lab0 >= 1) >= 0.99
    assert _iou(les > 0, les0 > 0) >= 0.9
    g0, g = rec0["geometry"], rec["geometry"]
    assert g["source_shape"] == g0["source_shape"] == [1024, 832] and g["output_shape"] == g0["output_shape"]
    assert g["flip"] == g0["flip"] and np.abs(np.subtract(g["crop"], g0["crop"])).max() <= 8  # within 2 blocks
    assert abs(g["scale"] / g0["scale"] - 1) < 0.02
    assert rec["settings_digest"] != rec0["settings_digest"]  # a reduced dataset is never reused as a full one


def test_j2k_reduce_levels_and_the_decoder_against_block_means(j2k_case):
    """An explicit level is honoured; the reduced stored values are close to block means of the full image (OpenJPEG's
    low-pass band: mean absolute difference below 2 % of the stored range) and ``auto`` keeps >= min_side."""
    import pydicom

    from custom.dicom import decode_j2k_reduced, j2k_reduce_level

    paths, ph = j2k_case
    ds = pydicom.dcmread(paths["j2k"])
    for level in (1, 3):
        arr, got, reason = decode_j2k_reduced(ds, str(paths["j2k"]), level)
        f = 2**level
        assert got == level and reason == "" and arr.shape == (1024 // f, 832 // f) and arr.dtype == np.uint16
        blocks = ph.stored.astype(np.float64).reshape(1024 // f, f, 832 // f, f).mean((1, 3))
        assert np.abs(arr - blocks).mean() < 0.02 * float(np.ptp(ph.stored)), level
    assert j2k_reduce_level(1024, 832, 128, 5) == 2 and j2k_reduce_level(4084, 3328, 512, 5) == 2
    assert j2k_reduce_level(4084, 3328, 512, 1) == 1 and j2k_reduce_level(400, 300, 512, 5) == 0
    plain = pydicom.dcmread(paths["plain"])
    arr, got, reason = decode_j2k_reduced(plain, str(paths["plain"]), "auto", 128)
    assert got == 0 and reason == "not JPEG 2000"
    np.testing.assert_array_equal(arr, ph.stored)


def test_j2k_reduce_leaves_other_files_unchanged_and_is_checked(j2k_case, tmp_path):
    """``auto`` on an uncompressed file decodes it in full: byte-identical outputs to ``off``; a bad value is refused
    before any work, naming the option."""
    from custom.data.prepare import PrepareWorkflow
    from custom.errors import MammoInputError

    paths, ph = j2k_case
    off = _prepare(paths["plain"], ph, tmp_path / "off", "off")
    auto = _prepare(paths["plain"], ph, tmp_path / "auto", "auto")
    assert "j2k_reduce" not in auto[0]
    for a, b in zip(off[1:], auto[1:]):
        np.testing.assert_array_equal(a, b)
    for bad in ("sometimes", 0.5, 99, True):
        with pytest.raises(MammoInputError, match="j2k_reduce"):
            PrepareWorkflow(str(tmp_path), str(tmp_path / "o"), "p.yaml", j2k_reduce=bad)
    assert PrepareWorkflow(str(tmp_path), str(tmp_path / "o"), "p.yaml", j2k_reduce="2").settings.j2k_reduce == "2"
    assert PrepareWorkflow(str(tmp_path), str(tmp_path / "o"), "p.yaml", j2k_reduce=None).settings.j2k_reduce == "off"


def test_gpu_decoding_fallback_logs_one_info_line(monkeypatch, caplog):
    """No nvImageCodec here: the CPU decoders stay, and the reason is one info line per process."""
    import logging

    from monai.data import nvimgcodec_pydicom_plugin as plugin

    from custom.transforms import loading

    monkeypatch.setattr(loading, "_GPU_DECODING", None)
    monkeypatch.setattr(plugin, "is_nvimgcodec_available", lambda: False)
    with caplog.at_level(logging.INFO, logger=loading.__name__):
        assert loading.enable_gpu_decoding() is False
        loading.LoadMammogram()
        loading.LoadMammogram()
    lines = [r for r in caplog.records if r.name == loading.__name__]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "CPU decoders" in lines[0].getMessage()


# ------------------------------------------------------------------------------------- decoding in workers
def test_prepare_workers_give_the_single_process_outputs(tmp_path, monkeypatch):
    """``num_workers=2`` decodes and preprocesses in a pool of 2 processes (checked) and writes byte-identical
    images, labels, lesion maps and records to one worker's."""
    from custom.data import prepare
    from custom.data.phantom import generate_phantom_dataset

    data = tmp_path / "phantom"
    generate_phantom_dataset(data, n_studies=1, seed=3, image_shape=(320, 256), progress=False)
    pools = []

    class Pool(prepare.ProcessPoolExecutor):
        def __init__(self, max_workers, **kw):
            pools.append(max_workers)
            super().__init__(max_workers, **kw)

    monkeypatch.setattr(prepare, "ProcessPoolExecutor", Pool)
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        wf = prepare.PrepareWorkflow(str(data), str(out), "p.yaml", image_size=48, num_workers=workers,
                                     progress=False, preview_cases=0)
        records, skipped, _ = wf.preprocess(wf.load_cases()[0])
        assert records and not skipped
        outs[workers] = out
    assert pools == [2]
    files = sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[2]) for p in outs[2].rglob("*") if p.is_file())
    assert len(files) == 4 * 4  # image, label, lesions, record per case
    for rel in files:
        assert (outs[1] / rel).read_bytes() == (outs[2] / rel).read_bytes(), rel
