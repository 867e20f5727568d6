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
