"""Writing synthetic mammograms: DICOM (privacy, UIDs, pixels, tags), PNG / NIfTI round trips, sidecar, atomicity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from custom.data import export
from custom.data.conditions import build_conditions
from custom.data.export import export_sample, to_uint16, write_nifti, write_png16, write_sidecar, write_synthetic_dicom
from custom.data.mask_io import load_mask_file
from custom.data.prepare import load_display_image
from custom.errors import MammoInputError
from custom.features import FEATURE_NAMES, FeatureNormaliser, write_feature_csv

S = 64
H, W = 200, 160
SPACING = [0.085, 0.09]
SECRETS = ("Doe^Jane", "SECRET-1", "ACC-SECRET-9", "Secret Hospital", "19610203", "Dr^Who")


def _source_dicom(path: Path) -> Dataset:
    """A source MG file full of identifiers (right breast, MLO)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = SECRETS[0], SECRETS[1], SECRETS[4], "F"
    ds.AccessionNumber, ds.InstitutionName, ds.ReferringPhysicianName = SECRETS[2], SECRETS[3], SECRETS[5]
    ds.Modality, ds.ImageLaterality, ds.ViewPosition = "MG", "R", "MLO"
    ds.PixelSpacing = SPACING
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = H, W
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.full((H, W), 100, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_case")
    yy, xx = np.mgrid[:H, :W]
    breast = (((yy - H / 2) / (0.45 * H)) ** 2 + ((W - 1 - xx) / (0.75 * W)) ** 2 < 1)  # right breast
    Image.fromarray(breast.astype(np.uint8) * 255).save(d / "breast.png")
    src = _source_dicom(d / "source.dcm")
    rng = np.random.default_rng(0)
    norm = d / "norm.json"
    FeatureNormaliser().fit(rng.uniform(0, 100, (10, 67))).save(norm)
    write_feature_csv(d / "f.csv", [{"case_id": "c", "lesion_index": 0, **dict(zip(FEATURE_NAMES, rng.uniform(0, 100, 67)))}])
    cond = build_conditions(image_size=S, normaliser_file=norm, breast_mask_file=d / "breast.png",
                            lesion_box=[W - 70, 60, W - 40, 84], feature_file=d / "f.csv", source_image=d / "source.dcm",
                            case_id="demo")
    assert cond.geometry is not None and cond.geometry.flip
    image = np.clip(0.1 + 0.8 * rng.random((S, S)), 0, 1) * (cond.label > 0)
    params = {"model_version": "0.1.0", "checkpoint_sha256": "ab" * 32, "num_inference_steps": 50,
              "guidance_scale": 3.0, "sigma": 1.5, "seed": 1234}
    return {"dir": d, "src": src, "src_path": d / "source.dcm", "cond": cond, "image": image, "params": params}


def _strict_pydicom(monkeypatch):
    """Invalid values (too long, wrong VR) raise while the dataset is built instead of being written with a warning."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


def test_dicom_is_synthetic_new_and_carries_no_source_identifier(setup, tmp_path, monkeypatch):
    _strict_pydicom(monkeypatch)
    paths = export_sample(tmp_path, "s0", setup["image"], setup["cond"], setup["params"], source_dicom=setup["src_path"])
    assert set(paths) == {"dcm", "png", "nii", "json"} and all(p.is_file() for p in paths.values())
    raw = paths["dcm"].read_bytes()
    assert raw[128:132] == b"DICM"
    for secret in SECRETS:
        assert secret.encode() not in raw, secret
    src = setup["src"]
    for uid in (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID):
        assert uid.encode() not in raw
    ds = pydicom.dcmread(paths["dcm"])
    assert ds.Modality == "MG" and ds.SOPClassUID == export.SECONDARY_CAPTURE_IMAGE_STORAGE
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.ConversionType == "SYN"
    assert {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}.isdisjoint(
        {src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID})
    assert str(ds.PatientName) == "SYNTHETIC" and ds.PatientID == "SYNTHETIC" and ds.PatientIdentityRemoved == "YES"
    assert ds.AccessionNumber == "" and "InstitutionName" not in ds and "SourceImageSequence" not in ds
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.BurnedInAnnotation == "NO"
    assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.DerivationDescription
    assert "seed=1234" in ds.DerivationDescription and "guidance_scale=3.0" in ds.DerivationDescription
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16 and ds.BitsStored == 16
    assert ds.ImageLaterality == "R" and ds.ViewPosition == "MLO"
    # mapped back onto the source grid: source size and pixel spacing
    assert (ds.Rows, ds.Columns) == (H, W) and [float(v) for v in ds.PixelSpacing] == SPACING
    # full-range window by default: stored value = display value
    assert float(ds.WindowCenter) == 32768 and float(ds.WindowWidth) == 65536 and ds.VOILUTFunction == "LINEAR"
    png = np.asarray(Image.open(paths["png"]))
    assert png.dtype == np.uint16 and np.array_equal(ds.pixel_array, png)
    expected = to_uint16(setup["cond"].geometry.invert_image(setup["image"][None].astype(np.float32))[0].numpy())
    assert np.array_equal(png, expected)
    # the project's own reader and highdicom read it; the display values are the PNG's
    display, info = load_display_image(paths["dcm"])
    assert info["laterality"] == "R" and np.array_equal(np.round(display * 65535).astype(np.uint16), png)
    assert hd.imread(str(paths["dcm"])).SOPInstanceUID == ds.SOPInstanceUID
    sidecar = paths["json"].read_text()
    for secret in SECRETS:
        assert secret not in sidecar


def test_copy_patient_copies_the_patient_but_never_the_uids(setup, tmp_path, monkeypatch):
    _strict_pydicom(monkeypatch)
    path = write_synthetic_dicom(tmp_path / "p.dcm", setup["image"], source_dicom=setup["src_path"], copy_patient=True,
                                 conditions_summary=setup["cond"].summary(), parameters=setup["params"],
                                 window=(0.5, 0.5))
    ds = pydicom.dcmread(path)
    src = setup["src"]
    assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "SECRET-1" and ds.PatientBirthDate == "19610203"
    assert "PatientIdentityRemoved" not in ds
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ds.StudyInstanceUID != src.StudyInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
    assert ds.AccessionNumber == "" and "InstitutionName" not in ds  # study-level identifiers never travel
    # the user window: [0.25, 0.75] of the range
    assert float(ds.WindowCenter) == pytest.approx(0.5 * 65535 + 0.5) and float(ds.WindowWidth) == pytest.approx(0.5 * 65535 + 1)
    assert ds.WindowCenterWidthExplanation == "USER"
    # a model-size image does not get the source's pixel spacing
    assert (ds.Rows, ds.Columns) == (S, S) and "PixelSpacing" not in ds


def test_model_frame_export_derives_the_pixel_spacing(setup, tmp_path):
    paths = export_sample(tmp_path, "m", setup["image"], setup["cond"], setup["params"], formats="dcm,png",
                          source_dicom=setup["src_path"], map_to_source=False)
    assert set(paths) == {"dcm", "png", "json"}
    ds = pydicom.dcmread(paths["dcm"])
    g = setup["cond"].geometry
    y0, y1, x0, x1 = g.crop
    expected = [SPACING[0] * (y1 - y0) / g.resized_shape[0], SPACING[1] * (x1 - x0) / g.resized_shape[1]]
    assert (ds.Rows, ds.Columns) == (S, S)
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(Image.open(paths["png"])), to_uint16(setup["image"]))
    side = json.loads(paths["json"].read_text())
    assert side["outputs"]["png"]["frame"] == "model" and side["outputs"]["png"]["shape"] == [S, S]


def test_png_and_nifti_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.random((37, 23))
    img[0, 0], img[0, 1] = -0.2, 1.7  # clipped
    write_png16(tmp_path / "a.png", img)
    back = np.asarray(Image.open(tmp_path / "a.png"))
    assert back.dtype == np.uint16 and back.shape == (37, 23)
    assert np.array_equal(back, np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16))
    assert back[0, 0] == 0 and back[0, 1] == 65535
    write_nifti(tmp_path / "a.nii.gz", img, pixel_spacing=(0.1, 0.2))
    nii = nib.load(str(tmp_path / "a.nii.gz"))
    assert nii.shape == (23, 37) and nii.get_data_dtype() == np.float32  # first axis = columns
    np.testing.assert_array_equal(np.asarray(nii.dataobj).T, np.clip(img, 0, 1).astype(np.float32))
    np.testing.assert_allclose(np.diag(nii.affine)[:2], [0.2, 0.1])
    # the convention of mask_io: an integer image written here reads back as (H, W)
    mask = (rng.random((37, 23)) > 0.5).astype(np.float64)
    write_nifti(tmp_path / "m.nii", mask)
    assert np.array_equal(load_mask_file(tmp_path / "m.nii"), mask.astype(np.int64))
    with pytest.raises(ValueError, match="NaN"):
        write_png16(tmp_path / "nan.png", np.full((4, 4), np.nan))
    assert not (tmp_path / "nan.png").exists() and not list(tmp_path.glob(".*tmp*"))


def test_sidecar_holds_the_conditions_and_no_identifier(setup, tmp_path):
    cond = setup["cond"]
    params = {**setup["params"], "patient_name": "Doe^Jane", "source_dicom": "/data/Doe^Jane/1.dcm",
              "extra": {"PatientID": "SECRET-1", "eta": 0.0}}
    paths = export_sample(tmp_path, "s1", setup["image"], cond, params, formats=("png", "nii"))
    text = paths["json"].read_text()
    assert "Doe^Jane" not in text and "SECRET-1" not in text
    side = json.loads(text)
    assert side["synthetic"] is True and side["case_id"] == "demo"
    assert side["parameters"]["seed"] == 1234 and side["parameters"]["sigma"] == 1.5
    assert side["parameters"]["guidance_scale"] == 3.0 and side["parameters"]["num_inference_steps"] == 50
    assert side["parameters"]["checkpoint_sha256"] == "ab" * 32 and side["parameters"]["extra"] == {"eta": 0.0}
    c = side["conditions"]
    named = c["mask"]["breast_mask_file"]  # by content hash, not by the (possibly identifying) file name
    assert c["mask"]["mode"] == "breast_mask_and_box" and named["name"] == f"sha256-{named['sha256'][:16]}.png"
    assert c["geometry"] == cond.geometry.to_dict() and c["num_lesions"] == 1
    lesion = c["lesions"][0]
    assert lesion["features_raw"] == {n: cond.raw_features[0][n] for n in FEATURE_NAMES}
    np.testing.assert_array_equal(np.array([lesion["features_normalised"][n] for n in FEATURE_NAMES], dtype=np.float32),
                                  cond.features[0])
    for fmt in ("png", "nii"):
        out = side["outputs"][fmt]
        assert out["file"] == paths[fmt].name and out["frame"] == "source" and out["shape"] == [H, W]
        assert out["sha256"] == hashlib.sha256(paths[fmt].read_bytes()).hexdigest()
    # the stand-alone writer gives the same structure
    write_sidecar(tmp_path / "solo.json", cond, setup["params"], {"png": {"file": "x.png"}})
    solo = json.loads((tmp_path / "solo.json").read_text())
    assert solo["conditions"]["lesions"] == c["lesions"] and solo["outputs"] == {"png": {"file": "x.png"}}


def test_a_failing_writer_leaves_nothing_behind(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    old = out / "s2.png"
    old.write_bytes(b"previous run")

    def broken(path, image, pixel_spacing=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_save_nifti", broken)
    with pytest.raises(OSError, match="disk full"):
        export_sample(out, "s2", setup["image"], setup["cond"], setup["params"], source_dicom=setup["src_path"])
    assert sorted(p.name for p in out.iterdir()) == ["s2.png"]  # no new, partial or temporary file
    assert old.read_bytes() == b"previous run"  # the previous output is untouched
    monkeypatch.undo()
    paths = export_sample(out, "s2", setup["image"], setup["cond"], setup["params"])
    assert sorted(p.name for p in out.iterdir()) == ["s2.dcm", "s2.json", "s2.nii.gz", "s2.png"]
    assert np.asarray(Image.open(paths["png"])).shape == (H, W)


def test_unusable_output_folder_and_bad_arguments_are_reported(setup, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = (setup["image"], setup["cond"], setup["params"])
    with pytest.raises(MammoInputError) as err:
        export_sample(blocker / "sub", "s", *args)
    assert str(blocker / "sub") in str(err.value) and "cannot create the output folder" in str(err.value)
    with pytest.raises(MammoInputError) as err:
        export_sample(blocker, "s", *args)
    assert str(blocker) in str(err.value) and "not a folder" in str(err.value)

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(export.tempfile, "mkstemp", refuse)  # a read-only folder (the tests may run as root)
    with pytest.raises(MammoInputError) as err:
        export_sample(ro, "s", *args)
    assert str(ro) in str(err.value) and "not writable" in str(err.value) and "Permission denied" in str(err.value)
    monkeypatch.undo()
    assert not list(ro.iterdir())
    for bad_name in ("../up", "a/b", ""):
        with pytest.raises(MammoInputError, match="output name"):
            export_sample(tmp_path / "ok", bad_name, *args)
    with pytest.raises(MammoInputError, match="unknown output format 'jpg'"):
        export_sample(tmp_path / "ok", "s", *args, formats=("png", "jpg"))
    with pytest.raises(MammoInputError) as err:
        export_sample(tmp_path / "ok", "s", *args, source_dicom=tmp_path / "missing.dcm")
    assert "missing.dcm" in str(err.value) and "not found" in str(err.value)
    assert not (tmp_path / "ok").exists() or not list((tmp_path / "ok").iterdir())
