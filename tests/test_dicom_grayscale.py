"""The DICOM grayscale pipeline against the standard's formulas, computed by hand here (PS3.3 C.11.2.1.2/3)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from custom.dicom import MammoDicomReader
from custom.errors import MammoInputError
from custom.transforms.loading import LoadMammogram, LoadMammogramd
from custom.transforms.intensity import DicomGrayscale, DicomGrayscaled, apply_dicom_grayscale

X = np.array([[60, 74, 75, 76, 100, 110], [124, 125, 126, 130, 200, 0]], dtype=np.uint16)


def _params(**kw):
    base = {"PhotometricInterpretation": "MONOCHROME2", "BitsStored": 12, "PixelRepresentation": 0}
    base.update(kw)
    return base


def test_linear_window_matches_standard():
    c, w = 100.0, 50.0
    out, info = apply_dicom_grayscale(X, _params(WindowCenter=[c], WindowWidth=[w], VOILUTFunction="LINEAR"))
    # C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> min; x > c - 0.5 + (w-1)/2 -> max; else ((x-(c-0.5))/(w-1) + 0.5)
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2  # 75.0, 124.0
    x = X.astype(float)
    expected = np.where(x <= lo, 0.0, np.where(x > hi, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 2] == 0.0 and out[1, 0] == pytest.approx((124 - 99.5) / 49 + 0.5) and out[1, 1] == 1.0
    assert info["voi"] == "window" and not info["inverted"]


def test_linear_exact_window_matches_standard():
    c, w = 100.0, 50.0
    out, _ = apply_dicom_grayscale(X, _params(WindowCenter=[c], WindowWidth=[w], VOILUTFunction="LINEAR_EXACT"))
    x = X.astype(float)
    expected = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 4] == pytest.approx(0.5)  # x == c maps to the middle


def test_sigmoid_window_matches_standard():
    c, w = 100.0, 40.0
    out, _ = apply_dicom_grayscale(X, _params(WindowCenter=[c], WindowWidth=[w], VOILUTFunction="SIGMOID"))
    expected = 1.0 / (1.0 + np.exp(-4.0 * (X.astype(float) - c) / w))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 4] == pytest.approx(0.5)


def test_rescale_is_applied_before_the_window():
    # modality value = 2 * stored - 100; the window sees modality values
    out, _ = apply_dicom_grayscale(X, _params(RescaleSlope=2.0, RescaleIntercept=-100.0, WindowCenter=[100.0],
                                              WindowWidth=[100.0], VOILUTFunction="LINEAR_EXACT"))
    m = 2.0 * X.astype(float) - 100.0
    expected = np.clip((m - 100.0) / 100.0 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_monochrome1_is_inverted_after_the_window():
    p = dict(WindowCenter=[100.0], WindowWidth=[40.0], VOILUTFunction="SIGMOID")
    mono2, _ = apply_dicom_grayscale(X, _params(**p))
    mono1, info = apply_dicom_grayscale(X, _params(PhotometricInterpretation="MONOCHROME1", **p))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert info["inverted"]


def test_window_index_selects_the_window():
    p = _params(WindowCenter=[100.0, 60.0], WindowWidth=[50.0, 20.0], VOILUTFunction="LINEAR_EXACT")
    second, _ = apply_dicom_grayscale(X, p, window_index=1)
    expected = np.clip((X.astype(float) - 60.0) / 20.0 + 0.5, 0, 1)
    np.testing.assert_allclose(second, expected, atol=1e-6)
    with pytest.raises(MammoInputError, match="window index 2"):
        apply_dicom_grayscale(X, p, window_index=2, source="f.dcm")


def test_voi_lut_sequence():
    # 4-entry LUT, first mapped value 70, 8-bit output: x <= 70 -> LUT[0], 71 -> LUT[1], 72 -> LUT[2], >= 73 -> LUT[3]
    lut = {"LUTDescriptor": [4, 70, 8], "LUTData": [0, 100, 200, 255]}
    x = np.array([[0, 70, 71, 72, 73, 1000]], dtype=np.uint16)
    out, info = apply_dicom_grayscale(x, _params(VOILUTSequence=[lut], WindowCenter=[5.0], WindowWidth=[2.0]))
    np.testing.assert_allclose(out, np.array([[0, 0, 100, 200, 255, 255]]) / 255.0, atol=1e-6)
    assert info["voi"] == "voi_lut"
    windowed, info = apply_dicom_grayscale(x, _params(VOILUTSequence=[lut], WindowCenter=[5.0], WindowWidth=[2.0]),
                                           prefer_voi_lut=False)
    assert info["voi"] == "window" and windowed.max() == 1.0


def test_pixel_padding_is_background_and_ignored_for_the_range():
    x = np.array([[0, 0, 100, 200, 300]], dtype=np.uint16)
    out, info = apply_dicom_grayscale(x, _params(PixelPaddingValue=0))  # no VOI: stretch the non-padding range
    np.testing.assert_allclose(out, [[0, 0, 0.0, 0.5, 1.0]], atol=1e-6)
    assert info["n_padding"] == 2 and info["voi"] == "data_range"
    # MONOCHROME1: padding must still end up dark (0), not inverted to white
    out1, _ = apply_dicom_grayscale(x, _params(PhotometricInterpretation="MONOCHROME1", PixelPaddingValue=0))
    np.testing.assert_allclose(out1, [[0, 0, 1.0, 0.5, 0.0]], atol=1e-6)


def test_keeps_more_than_8_bit_precision():
    x = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    out, _ = apply_dicom_grayscale(x, _params(WindowCenter=[2048.0], WindowWidth=[4096.0], VOILUTFunction="LINEAR_EXACT"))
    assert out.dtype == np.float32
    assert len(np.unique(out)) == 4096  # an 8-bit squeeze would leave 256 levels


# --------------------------------------------------------------------------- reading files through MONAI


def _write_mg(path, arr, transfer_syntax=ExplicitVRLittleEndian, **tags):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "MG"
    ds.PatientName, ds.PatientID = "Doe^Jane", "SECRET-ID-123"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.astype(np.uint16).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, arr.astype(np.uint16))
    ds.save_as(path, enforce_file_format=True)
    return path


def test_reader_through_loadimage_returns_stored_values_rows_first(tmp_path):
    arr = (np.arange(30 * 20).reshape(30, 20) % 4000).astype(np.uint16)
    f = _write_mg(tmp_path / "a.dcm", arr, WindowCenter=2000, WindowWidth=4000, ImageLaterality="R")
    img = LoadImage(reader=MammoDicomReader(), image_only=True, ensure_channel_first=True)(str(f))
    assert tuple(img.shape) == (1, 30, 20)
    np.testing.assert_array_equal(img[0].numpy(), arr)
    assert img.meta["laterality"] == "R"
    assert "SECRET-ID-123" not in repr(dict(img.meta)) and "Doe" not in repr(dict(img.meta))
    d = LoadMammogramd(keys="image")({"image": str(f)})
    out = DicomGrayscaled(keys="image")(d)["image"]
    expected = np.clip((arr.astype(float) - 1999.5) / 3999 + 0.5, 0, 1)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)
    assert out.meta["grayscale"]["voi"] == "window"


def test_compressed_transfer_syntax_decodes(tmp_path):
    arr = (np.random.default_rng(0).integers(0, 4096, size=(40, 32))).astype(np.uint16)
    f = _write_mg(tmp_path / "rle.dcm", arr, transfer_syntax=RLELossless)
    assert pydicom.dcmread(f).file_meta.TransferSyntaxUID == RLELossless
    img = LoadImage(reader=MammoDicomReader(), image_only=True)(str(f))
    np.testing.assert_array_equal(np.asarray(img), arr)


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_dicom", "not a DICOM file"),
        ("no_pixels", "no pixel data"),
        ("ct", "not a mammogram: Modality is 'CT'"),
        ("rgb", "unsupported PhotometricInterpretation 'RGB'"),
    ],
)
def test_bad_dicom_inputs_name_the_file_and_problem(tmp_path, case, message):
    f = tmp_path / f"{case}.dcm"
    arr = np.zeros((8, 8), dtype=np.uint16)
    if case == "not_dicom":
        f.write_text("this is not a DICOM file")
    elif case == "no_pixels":
        _write_mg(f, arr)
        ds = pydicom.dcmread(f)
        del ds.PixelData
        ds.save_as(f)
    elif case == "ct":
        _write_mg(f, arr, Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    elif case == "rgb":
        _write_mg(f, arr, PhotometricInterpretation="RGB")
    with pytest.raises(MammoInputError, match=message) as err:
        LoadMammogram()(str(f))
    assert str(f) in str(err.value)


def test_grayscale_without_tags_is_a_clear_error():
    import torch

    with pytest.raises(MammoInputError, match="no DICOM grayscale tags"):
        DicomGrayscale()(torch.zeros(1, 4, 4))
